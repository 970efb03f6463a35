"""Where generator training runs write, and what a checkpoint folder says about its origin (`lineage.json`).

A training stage writes its finished model into the artifact's staging folder (published under its weights' data
version) and its resumable step checkpoints into a work folder keyed like the staging folder. On local storage
both are plain folders. On S3 training happens in a local folder and every step checkpoint is uploaded as it is
made (`_COMPLETE` last), by one background thread with at most one upload in flight, so training does not wait for
the network unless a checkpoint comes before the previous one is up. At most `checkpoints_total_limit` complete
checkpoints are kept remotely. A run resumes from the newest complete checkpoint, local or remote: a fresh machine,
or one whose local copy is older, downloads the remote one.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from synfer_pipeline.generation.checkpoints import list_checkpoints
from synfer_pipeline.io.storage import REF_FILE, ArtifactRef, ArtifactWriter

COMPLETE = "_COMPLETE"


class TrainingWorkspace:
    """Local `state_dir` and `output_dir` for one training materialization, mirrored to the storage.

    keep: complete checkpoints kept remotely (None: all), usually the training's `checkpoints_total_limit`.
    """

    def __init__(self, writer: ArtifactWriter, work_root: str | os.PathLike | None = None, keep: int | None = None):
        self.writer, self.storage, self.keep = writer, writer.storage, keep
        key = posixpath.basename(writer.staging)
        self.remote_state = posixpath.join(writer.base, "_work", key)
        self._uploads: queue.Queue | None = None
        self._failed: list[BaseException] = []
        if self.storage.is_local:
            self.state_dir, self.output_dir = Path(self.remote_state), Path(writer.staging)
        else:
            root = Path(work_root or os.environ.get("SYNFER_WORK", Path(tempfile.gettempdir()) / "synfer-work"))
            local = root / writer.asset / writer.partition / key
            self.state_dir, self.output_dir = local / "state", local / "model"
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._download_newer_state()
            self._uploads = queue.Queue(maxsize=1)
            threading.Thread(target=self._upload_loop, name="checkpoint-upload", daemon=True).start()
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_checkpoint(self, folder: Path) -> None:
        """Queue a finished step checkpoint for upload (object stores only) and return; blocks only while the
        previous upload is still waiting to start (one in flight, one queued)."""
        if self._uploads is None:
            return
        self._raise_failed()
        snapshot = folder.parent / f".upload-{folder.name}"
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(folder, snapshot, copy_function=os.link)  # hard links: survives local pruning, no copy
        self._uploads.put(snapshot)

    def flush(self) -> None:
        """Wait until every queued checkpoint is uploaded; raise the first upload error."""
        if self._uploads is not None:
            self._uploads.join()
        self._raise_failed()

    def _upload_loop(self) -> None:
        while True:
            snapshot = self._uploads.get()
            try:
                self._upload(snapshot)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread at its next checkpoint
                self._failed.append(e)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                self._uploads.task_done()

    def _upload(self, snapshot: Path) -> None:
        name = snapshot.name.removeprefix(".upload-")
        target = posixpath.join(self.remote_state, name)
        self.storage.put_folder(snapshot, target)
        self.storage.write_bytes(posixpath.join(target, COMPLETE), b"")
        self._prune_remote()

    def _remote_checkpoints(self) -> list[tuple[int, str]]:
        """Complete remote checkpoints as (step, uri), oldest first."""
        done = [posixpath.dirname(p) for p in self.storage.list(self.remote_state, f"checkpoint-*/{COMPLETE}")]
        return sorted((int(p.rsplit("-", 1)[1]), p) for p in done)

    def _prune_remote(self) -> None:
        if self.keep is None:
            return
        for _, uri in self._remote_checkpoints()[:-self.keep] if self.keep > 0 else []:
            self.storage.fs.rm(posixpath.join(uri, COMPLETE))  # first: never a half-deleted "complete" one
            self.storage.fs.rm(uri, recursive=True)

    def _download_newer_state(self) -> None:
        remote = self._remote_checkpoints()
        local = list_checkpoints(self.state_dir)
        if not remote or (local and local[-1][0] >= remote[-1][0]):
            return
        step, uri = remote[-1]
        cached = self.storage.local_folder(uri)
        target = self.state_dir / f"checkpoint-{step}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(cached, target, ignore=shutil.ignore_patterns(COMPLETE, ".complete"))

    def _raise_failed(self) -> None:
        if self._failed:
            raise RuntimeError(f"uploading a step checkpoint to {self.remote_state} failed") from self._failed[0]

    # -- the finished model ----------------------------------------------------------------------------------------
    def publish(self, ref: ArtifactRef) -> ArtifactRef:
        """Put the finished model into the staging folder (S3: upload), publish it, drop the step checkpoints."""
        self.flush()
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

