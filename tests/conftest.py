"""Shared fixtures: an isolated SYNFER_HOME per test session, small images of every kind, test profiles."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("SYNFER_FIXTURES", REPO / ".synfer" / "fixtures"))
os.environ.setdefault("SYNFER_FIXTURES", str(FIXTURES))


def face_like(size: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture with structure (distinct per seed), standing in for an aligned face crop."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), x * y], axis=-1)
    arr = (base * 0.5 + 0.5) * 200 + rng.integers(0, 40, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every model in the tests is tiny: threads only add hand-offs, and on a shared 2-core machine two torch threads
    waiting on each other made tiny-model steps up to 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def synfer_home(tmp_path, monkeypatch) -> Path:
    """A private SYNFER_HOME (storage, demo data) and DAGSTER_HOME for one test."""
    home = tmp_path / "synfer_home"
    home.mkdir()
    monkeypatch.setenv("SYNFER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    return home


def write_profile(path: Path, storage_root: str, datasets: dict, **sections) -> Path:
    """A profile YAML for tests: the demo profile's sections with the given storage root and datasets."""
    import yaml

    base = yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text())
    base["fer_classifiers"] = {}  # the demo's roles train on its rafdb; a test with other datasets names its own
    base.update({"name": "test", "storage": {"root": storage_root}, "datasets": datasets}, **sections)
    path.write_text(yaml.safe_dump(base))
    return path
