"""The demo's built-in datasets: toy faces written in real dataset layouts (RAF-DB basic, an FFHQ-like folder).

Each dataset folder is written into a hidden sibling and renamed when complete: it appears whole or not at all.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import Field

from synfer_pipeline.curation.readers import RAFDB_CODES as _RAFDB_NAMES
from synfer_pipeline.demo.base_model import BaseModelSettings, build_base_model, training_faces
from synfer_pipeline.demo.toyfaces import draw_toy_face
from synfer_pipeline.fer.training import FERTrainSettings, save_trained, train_fer_classifier
from synfer_pipeline.io.storage import atomic_folder
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS_7

RAFDB_CODES: dict[str, int] = {name: code for code, name in _RAFDB_NAMES.items()}


def _balanced_labels(n: int, rng: np.random.Generator) -> list[str]:
    """`n` expression names cycling over the 7 classes, then shuffled: class counts differ by at most one."""
    labels = [EXPRESSIONS_7[i % len(EXPRESSIONS_7)] for i in range(n)]
    return [labels[i] for i in rng.permutation(n)]


def _write_au_csv(path: Path, rows: list[tuple[str, str, tuple[str, ...]]]) -> None:
    """The drawn ground truth: `image,expression,aus` with AUs space-separated (empty for none)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "expression", "aus"])
        writer.writerows([image, expression, " ".join(aus)] for image, expression, aus in rows)


def write_rafdb_layout(root: Path, n_train: int, n_test: int, size: int = 100, seed: int = 0) -> Path:
    """Write toy faces in the RAF-DB "basic" layout under `root` (new or empty; filled atomically); returns `root`.

    `Image/aligned/train_00001_aligned.jpg` (train numbered with 5 digits, test with 4), labels in
    `EmoLabel/list_patition_label.txt` as `train_00001.jpg 5` (codes 1..7 = surprise, fear, disgust, happiness,
    sadness, anger, neutral), classes balanced per split; `synfer_toy_aus.csv` holds the drawn AUs per image.
    Images are `size` px JPEG (quality 90); face i of a split is drawn from default_rng([seed, 1 train / 2 test, i]),
    so the same seed gives byte-identical files.
    """
    with atomic_folder(root, if_exists="error") as out:
        (out / "Image" / "aligned").mkdir(parents=True)
        (out / "EmoLabel").mkdir()
        label_rng = np.random.default_rng([seed, 0])
        lines, rows = [], []
        for stream, (split, n, digits) in enumerate((("train", n_train, 5), ("test", n_test, 4)), start=1):
            for i, expression in enumerate(_balanced_labels(n, label_rng), start=1):
                name = f"{split}_{i:0{digits}d}"
                face = draw_toy_face(expression, np.random.default_rng([seed, stream, i]), size)
                face.image.save(out / "Image" / "aligned" / f"{name}_aligned.jpg", quality=90)
                lines.append(f"{name}.jpg {RAFDB_CODES[expression]}\n")
                rows.append((f"{name}.jpg", expression, face.aus))
        (out / "EmoLabel" / "list_patition_label.txt").write_text("".join(lines))
        _write_au_csv(out / "synfer_toy_aus.csv", rows)
    return Path(root)


def write_unlabelled_folder(root: Path, n: int, size: int = 256, seed: int = 1, ext: str = "png") -> Path:
    """Write `n` unlabelled toy faces FFHQ-style: `root/00000/00000.png`, ... (1000 per sub-folder); returns `root`.

    `root` must be new or empty and is filled atomically, as in `write_rafdb_layout`. Expressions are balanced
    over the 7 classes in shuffled order; face i is drawn from default_rng([seed, 3, i]). `root/synfer_toy_aus.csv`
    (image = relative path) keeps the drawn truth for evaluation only; the pipeline treats the images as unlabelled.
    """
    if ext not in ("png", "jpg"):
        raise ValueError(f"ext must be 'png' or 'jpg', not {ext!r}")
    with atomic_folder(root, if_exists="error") as out:
        rows = []
        for i, expression in enumerate(_balanced_labels(n, np.random.default_rng([seed, 0]))):
            relative = f"{i // 1000 * 1000:05d}/{i:05d}.{ext}"
            (out / relative).parent.mkdir(exist_ok=True)
            face = draw_toy_face(expression, np.random.default_rng([seed, 3, i]), size)
            face.image.save(out / relative, **({"quality": 90} if ext == "jpg" else {"compress_level": 1}))
            rows.append((relative, expression, face.aus))
        _write_au_csv(out / "synfer_toy_aus.csv", rows)
    return Path(root)


def write_demo_data(root: Path, seed: int = 0, n_train: int = 140, n_test: int = 70,
                    n_hr: int = 112) -> dict[str, Path]:
    """Write the demo's built-in data: `root/rafdb` (RAF-DB layout, 100 px) and `root/ffhq` (unlabelled, 256 px).

    Returns {"rafdb": path, "ffhq": path}. Defaults (20/10/16 faces per class) take ~3 s on one core.
    Each dataset folder must be new or empty; it appears complete or not at all.
    """
    root = Path(root)
    return {"rafdb": write_rafdb_layout(root / "rafdb", n_train, n_test, size=100, seed=seed),
            "ffhq": write_unlabelled_folder(root / "ffhq", n_hr, size=256, seed=seed + 1)}


@settings
class ReferenceFERSettings:
    """The demo's stand-in for an off-the-shelf FER model (what FER2013's mini-Xception is for real photos, which it
    cannot read on toy faces): a classifier trained on its own toy faces (never the demo datasets' faces, and never
    the judge), that tells the expression of the unlabelled source for captions and their validation (`fer-reference/`,
    loaded with `{kind: checkpoint, path: ...}`)."""

    faces: int = 700
    train: FERTrainSettings = FERTrainSettings(architecture="resnet", image_size=64, epochs=25, lr=5e-3, seed=7)


@settings
class DemoDataSettings:
    """The profile's `demo_data` section: where the toy data goes, its seed, its sizes (faces per split), the demo's
    base diffusion model (built once, with an autoencoder trained on toy faces) and its reference FER model."""

    root: str
    seed: int = 0
    rafdb_train: int = Field(140, ge=7)
    rafdb_test: int = Field(70, ge=7)
    ffhq: int = Field(112, ge=7)
    base_model: BaseModelSettings = BaseModelSettings()
    reference: ReferenceFERSettings | None = ReferenceFERSettings()


def ensure_demo_data(spec: DemoDataSettings, force: bool = False, log: Callable[[str], None] = lambda s: None,
                     progress: Callable[[int, int, float], None] | None = None) -> dict[str, Path]:
    """Write the demo data and build the demo's base model, unless they are already complete (a COMPLETE marker
    records the settings they were made with: other settings build them again)."""
    root = Path(spec.root)
    marker = root / "COMPLETE"
    made_with = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=list)
    paths = {"rafdb": root / "rafdb", "ffhq": root / "ffhq", "base-sd": root / "base-sd"}
    if spec.reference is not None:
        paths["fer-reference"] = root / "fer-reference"
    if marker.exists() and marker.read_text() == made_with and not force:
        return paths
    shutil.rmtree(root, ignore_errors=True)  # forced, changed settings, or an incomplete earlier write
    paths = write_demo_data(root, seed=spec.seed, n_train=spec.rafdb_train, n_test=spec.rafdb_test, n_hr=spec.ffhq)
    log(f"demo data written under {root}; training the base model's autoencoder on toy faces")
    steps = spec.base_model.autoencoder.steps
    paths["base-sd"], report = build_base_model(root / "base-sd", spec.base_model,
                                                lambda step, loss: (progress or _every(log))(step, steps, loss))
    ae, text = report["autoencoder"], report["text_encoder"]
    log(f"base model: autoencoder {ae['psnr_db']} dB PSNR after {ae['steps']} steps ({ae['seconds']} s); text encoder "
        f"pretrained {text['steps']} steps")
    if spec.reference is not None:
        paths["fer-reference"], accuracy = build_reference_fer(root / "fer-reference", spec.reference,
                                                               spec.base_model.face_crop, spec.seed)
        log(f"reference FER model: {accuracy:.1%} on held-out toy faces")
    marker.write_text(made_with)
    return paths


def build_reference_fer(path: Path, cfg: ReferenceFERSettings, crop, seed: int = 0) -> tuple[Path, float]:
    """Train the reference FER model on its own toy faces (cropped as ingest crops the demo's sources) and save it;
    returns (path, accuracy on 140 held-out toy faces)."""
    resolution = cfg.train.image_size
    faces = training_faces(cfg.faces + 140, seed + 1000, resolution, crop)
    labels = [EXPRESSIONS_7[i % len(EXPRESSIONS_7)] for i in range(len(faces))]
    clf, _ = train_fer_classifier(faces[:cfg.faces], labels[:cfg.faces], cfg.train, "fer-reference")
    accuracy = float(np.mean([p == t for p, t in zip(clf.predict(faces[cfg.faces:]), labels[cfg.faces:])]))
    save_trained(clf, path, cfg.train, {"held_out_accuracy": accuracy})
    return path, accuracy


def _every(log: Callable[[str], None]) -> Callable[[int, int, float], None]:
    def progress(step: int, steps: int, loss: float) -> None:
        if step % max(1, steps // 10) == 0 or step == steps:
            log(f"  autoencoder step {step}/{steps}: loss {loss:.4f}")
    return progress
