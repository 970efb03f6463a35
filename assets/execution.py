"""Where steps run: the executor chosen by the profile's `execution` section, and the tags of GPU steps.

- `in_process`: one process (the tests and `synfer demo` run jobs in process whatever is configured);
- `multiprocess` (default): a process per step, at most `max_concurrent` at once, started from a forkserver that has
  imported torch, diffusers and transformers once (`preload_modules`), so a step does not pay seconds of imports;
- `docker`: a container per step from `image`, with `env_vars` passed through and every GPU of the host requested
  (`device_requests`; Docker's executor has one configuration for all steps);
- `k8s`: a Kubernetes Job per step from `image`. GPU steps carry a `dagster-k8s/config` tag that requests
  `gpus_per_step` x `nvidia.com/gpu` with the configured node selector and tolerations; CPU steps request none.

Every GPU asset also takes part in the `gpu` concurrency pool (dagster.yaml), so one GPU step owns a device.
"""

from __future__ import annotations

from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor

from synfer_pipeline.config import ExecutionSection, load_profile

GPU_DEVICE_REQUEST = {"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}


def k8s_gpu_config(section: ExecutionSection) -> dict:
    """The `dagster-k8s/config` of a GPU step: GPU limits, node selector, tolerations."""
    limits = {"nvidia.com/gpu": str(section.gpus_per_step), **section.gpu_limits}  # quantities are strings
    pod = {}
    if section.node_selector:
        pod["node_selector"] = dict(section.node_selector)
    if section.tolerations:
        pod["tolerations"] = [dict(t) for t in section.tolerations]
    return {"container_config": {"resources": {"limits": limits, "requests": dict(limits)}},
            **({"pod_spec_config": pod} if pod else {})}


def gpu_op_tags(section: ExecutionSection) -> dict:
    """op_tags of every asset that needs a GPU."""
    return {"synfer/gpu": "required", "dagster-k8s/config": k8s_gpu_config(section)}


def executor_config(section: ExecutionSection) -> dict:
    """The configuration the chosen executor is given (empty for in-process)."""
    if section.executor == "in_process":
        return {}
    if section.executor == "multiprocess":
        return {"max_concurrent": section.max_concurrent,
                "start_method": {"forkserver": {"preload_modules": list(section.preload_modules)}}}
    common = {"env_vars": list(section.env_vars), "max_concurrent": section.max_concurrent}
    if section.executor == "docker":
        return {"image": section.image, **common, "container_kwargs": {"device_requests": [GPU_DEVICE_REQUEST]}}
    return {"job_image": section.image, **common, **({"job_namespace": section.namespace} if section.namespace else {})}


def executor_for(section: ExecutionSection) -> ExecutorDefinition:
    """The executor of every job, configured by `executor_config`."""
    if section.executor == "in_process":
        return in_process_executor
    if section.executor == "multiprocess":
        base = multiprocess_executor
    elif section.executor == "docker":
        from dagster_docker import docker_executor as base
    else:
        from dagster_k8s import k8s_job_executor as base
    return base.configured(executor_config(section), name=f"synfer_{section.executor}")


GPU_TAGS = gpu_op_tags(load_profile().execution)
