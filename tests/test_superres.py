"""Super-resolution: low-resolution faces reach the training resolution; native high-resolution ones are untouched."""

import io
import json

import numpy as np
import pytest
from conftest import face_like, jpeg_bytes
from PIL import Image
from tiny_models import save_tiny_swin2sr

from synfer_pipeline.curation.superres import (
    LanczosUpscaler,
    SuperResSettings,
    TransformersUpscaler,
    load_upscaler,
    superresolve_samples,
)
from synfer_pipeline.io.versions import model_fingerprint


def _samples(n, size, labelled=True):
    out = []
    for i in range(n):
        meta = {"sample_id": f"s-{i}", "source": "src", "split": "train", "label": "happy" if labelled else None,
                "label_index": 1 if labelled else -1}
        members = {"jpg": jpeg_bytes(face_like(size, i)), "json": json.dumps(meta).encode()}
        if labelled:
            members["cls"] = b"1"
        out.append((f"s-{i}", members))
    return out


@pytest.fixture(scope="module")
def tiny_swin2sr(tmp_path_factory):
    return str(save_tiny_swin2sr(tmp_path_factory.mktemp("swin2sr") / "model", upscale=2))


def test_transformers_upscaler_with_a_tiny_swin2sr_doubles_the_size_batched(tiny_swin2sr):
    upscaler = TransformersUpscaler(tiny_swin2sr)
    out = upscaler.upscale([face_like(16, i) for i in range(3)])
    assert [im.size for im in out] == [(32, 32)] * 3
    assert upscaler.describe() == {"kind": "transformers", "model": tiny_swin2sr, "scale": 2, "dtype": "torch.float32",
                                   "weights": model_fingerprint(tiny_swin2sr)}
    assert upscaler.describe()["weights"].startswith("sha256:")  # the weights' content, not the path


def test_low_resolution_faces_are_upscaled_to_the_configured_resolution(tiny_swin2sr):
    upscaler = load_upscaler({"kind": "transformers", "id": tiny_swin2sr})
    out = superresolve_samples(_samples(5, 24), upscaler, SuperResSettings(resolution=64, batch_size=2), native_hr=False)
    assert len(out) == 5
    for key, members, row in out:
        assert Image.open(io.BytesIO(members["jpg"])).size == (64, 64)
        assert row["superres"] == "transformers" and row["input_px"] == 24 and row["output_px"] == 64
        assert json.loads(json.dumps(members["json"]))["superres_model"] == tiny_swin2sr
        assert members["cls"] == b"1"


def test_native_high_resolution_faces_pass_through_byte_for_byte(tiny_swin2sr):
    samples = _samples(3, 64, labelled=False)
    out = superresolve_samples(samples, load_upscaler({"kind": "transformers", "id": tiny_swin2sr}),
                               SuperResSettings(resolution=64), native_hr=True)
    for (_, original), (_, members, row) in zip(samples, out):
        assert members["jpg"] == original["jpg"] and row["superres"] == "untouched" and row["native_hr"]


def test_larger_native_faces_are_only_resized_down():
    out = superresolve_samples(_samples(2, 128), LanczosUpscaler(), SuperResSettings(resolution=64), native_hr=True)
    assert {row["superres"] for _, _, row in out} == {"lanczos-down"}
    assert Image.open(io.BytesIO(out[0][1]["jpg"])).size == (64, 64)


def test_lanczos_fallback_is_recorded_as_lanczos():
    out = superresolve_samples(_samples(2, 32), load_upscaler({"kind": "lanczos"}), SuperResSettings(resolution=64), native_hr=False)
    assert {row["superres"] for _, _, row in out} == {"lanczos"}
    big = np.asarray(Image.open(io.BytesIO(out[0][1]["jpg"])))
    assert big.shape == (64, 64, 3)


def test_unknown_upscaler_kind_and_missing_model_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="'bicubic'.*expected tags: 'lanczos', 'transformers', 'diffusers'"):
        load_upscaler({"kind": "bicubic"})
    with pytest.raises(OSError, match=str(tmp_path / "nope")):
        load_upscaler({"kind": "transformers", "id": str(tmp_path / "nope"), "local_files_only": True})
