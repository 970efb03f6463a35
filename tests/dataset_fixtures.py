"""Small datasets in real layouts for asset tests (independent of the demo data generator)."""

from __future__ import annotations

from pathlib import Path

from conftest import face_like, jpeg_bytes, png_bytes

from synfer_pipeline.demo.data import RAFDB_CODES as RAFDB_CODE


def write_rafdb(root: Path, labels: list[str], test_labels: list[str] = (), corrupt: int = 0, seed: int = 0) -> Path:
    """RAF-DB basic layout with the given train/test labels; `corrupt` extra labelled files that are truncated."""
    img_dir = root / "Image" / "aligned"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for split, items in (("train", labels), ("test", test_labels)):
        for i, label in enumerate(items, 1):
            name = f"{split}_{i:05d}" if split == "train" else f"{split}_{i:04d}"
            (img_dir / f"{name}_aligned.jpg").write_bytes(jpeg_bytes(face_like(100, seed * 1000 + i + (500 if split == "test" else 0))))
            lines.append(f"{name}.jpg {RAFDB_CODE[label]}")
    for j in range(corrupt):
        name = f"train_{900 + j:05d}"
        (img_dir / f"{name}_aligned.jpg").write_bytes(jpeg_bytes(face_like(100, 7000 + j))[:200])
        lines.append(f"{name}.jpg 4")
    (root / "EmoLabel").mkdir(exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


def write_unlabelled(root: Path, n: int, size: int = 128, seed: int = 0) -> Path:
    for i in range(n):
        path = root / f"{i // 1000 * 1000:05d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(face_like(size, seed * 1000 + i)))
    return root
