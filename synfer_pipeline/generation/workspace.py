"""Where generator training runs write, and what a checkpoint folder says about its origin (`lineage.json`).

A training stage writes its finished model into the artifact's staging folder (published under its weights' data
version) and its resumable step checkpoints into a work folder keyed like the staging folder. On local storage
both are plain folders. On S3 training happens in a local folder; every step checkpoint is uploaded as it is made
(`_COMPLETE` last) and a fresh machine downloads the newest complete one, so a killed pod resumes elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

from synfer_pipeline.io.storage import REF_FILE, ArtifactRef, ArtifactWriter

COMPLETE = "_COMPLETE"


class TrainingWorkspace:
    """Local `state_dir` and `output_dir` for one training materialization, mirrored to the storage."""

    def __init__(self, writer: ArtifactWriter, work_root: str | os.PathLike | None = None):
        self.writer, self.storage = writer, writer.storage
        key = posixpath.basename(writer.staging)
        self.remote_state = posixpath.join(writer.base, "_work", key)
        if self.storage.is_local:
            self.state_dir, self.output_dir = Path(self.remote_state), Path(writer.staging)
        else:
            root = Path(work_root or os.environ.get("SYNFER_WORK", Path(tempfile.gettempdir()) / "synfer-work"))
            local = root / writer.asset / writer.partition / key
            self.state_dir, self.output_dir = local / "state", local / "model"
            self._download_latest_state()
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def on_checkpoint(self, folder: Path) -> None:
        """Upload a finished step checkpoint (object stores only); `_COMPLETE` marks it usable."""
        if self.storage.is_local:
            return
        target = posixpath.join(self.remote_state, folder.name)
        self.storage.put_folder(folder, target)
        self.storage.write_bytes(posixpath.join(target, COMPLETE), b"")

    def _download_latest_state(self) -> None:
        done = [posixpath.dirname(p) for p in self.storage.list(self.remote_state, f"checkpoint-*/{COMPLETE}")]
        if not done or any(self.state_dir.glob("checkpoint-*")):
            return
        newest = max(done, key=lambda p: int(p.rsplit("-", 1)[1]))
        local = self.storage.local_folder(newest)
        shutil.copytree(local, self.state_dir / posixpath.basename(newest), dirs_exist_ok=True)

    def publish(self, ref: ArtifactRef) -> ArtifactRef:
        """Put the finished model into the staging folder (S3: upload), publish it, drop the step checkpoints."""
        if not self.storage.is_local:
            self.storage.put_folder(self.output_dir, self.writer.staging)
        published = self.writer.publish(ref)
        if self.storage.exists(self.remote_state):
            self.storage.fs.rm(self.remote_state, recursive=True)
        if self.storage.is_local:
            with contextlib.suppress(OSError):
                os.rmdir(posixpath.dirname(self.remote_state))  # `_work`, once no other training is in progress
        return published


def lineage_record(storage, asset: str, run_id: str, inputs: dict[str, ArtifactRef], base_model: str,
                   settings: dict, settings_hash: str, extra: dict | None = None) -> dict[str, Any]:
    """What `lineage.json` says: the FEText version trained on, the captions behind it (versions, captioner, model,
    prompt) read from the artifacts' own ref.json files, and the lineage of an upstream checkpoint, so the chain is
    traceable without the Dagster instance."""
    record = {"asset": asset, "run_id": run_id, "base_model": base_model, "training_config_hash": settings_hash,
              "training_config": settings, "inputs": {}}
    for name, ref in inputs.items():
        entry = ref.summary()
        if ref.asset == "fetext":
            record["fetext"] = ref.summary()
            record["captions"] = _captions_of(storage, ref)
        upstream_lineage = posixpath.join(ref.uri, "lineage.json")
        if storage.exists(upstream_lineage):
            entry["lineage"] = json.loads(storage.read_bytes(upstream_lineage))
        record["inputs"][name] = entry
    record.update(extra or {})
    return record


def _captions_of(storage, fetext: ArtifactRef) -> dict[str, dict]:
    """Per dataset: the captions data version FEText was built from, its captioner, model and prompt."""
    out = {}
    for name, summary in sorted(fetext.inputs.items()):
        if not (isinstance(summary, dict) and summary.get("asset") == "mllm_captions"):
            continue
        ref = ArtifactRef.from_json(storage.read_bytes(posixpath.join(summary["uri"], REF_FILE)).decode())
        captioner = ref.inputs.get("captioner", {})
        out[summary["partition"]] = {"data_version": summary["data_version"], "run_id": summary["run_id"],
                                     "uri": summary["uri"], "captioner": captioner.get("name") or captioner.get("kind"),
                                     "model": captioner.get("model"), "prompt": captioner.get("prompt"),
                                     "prompt_hash": captioner.get("prompt_hash")}
    return out

