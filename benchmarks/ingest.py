"""Ingest throughput per core against a bare PIL loop, and peak memory at 1x and 5x the image count.

    python benchmarks/ingest.py [--n 2000]

Synthesizes N distinct 512-px JPEG photos (the astronaut photo from scikit-image, randomly shifted, scaled, tilted
and colour-jittered, so every file is unique and holds a real face). In the same process, on one core each:
  baseline  -- PIL open + resize to the crop size + JPEG save to a file, per image
  aligned   -- ingest as for aligned sources (FFHQ, CelebA-HQ, RAF-DB aligned, FER2013; AffectNet's known boxes):
               decode, pixel hash, crop, resize, JPEG encode, shard write, manifest
  detect    -- the same with face detection (in-the-wild sources such as SFEW): BlazeFace (the default), then
               OpenCV Haar for comparison, each against a baseline run right after it
Peak memory is the max RSS of a fresh process ingesting N and 5N images (aligned path).
The last lines are `ingest_ratio: X` (aligned / baseline) and `memory_growth: Y` (peak at 5N / peak at N).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synfer_pipeline.curation.ingest import IngestSettings, ingest, listing_fingerprint  # noqa: E402
from synfer_pipeline.curation.readers import read_source  # noqa: E402
from synfer_pipeline.io.storage import Storage, stage_key  # noqa: E402

FACE_SIZE = 128
DETECTOR = "blazeface"  # the pipeline's default detector; Haar is measured beside it


def synthesize(folder: Path, n: int, seed: int = 0, start: int = 0) -> None:
    """n distinct 512x512 JPEGs of a real face with random shift, scale, tilt and colour."""
    rng = np.random.default_rng(seed + start)
    photo = data.astronaut()
    (folder / "happy").mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        m = cv2.getRotationMatrix2D((230 + rng.uniform(-30, 30), 130 + rng.uniform(-30, 30)), rng.uniform(-10, 10),
                                    rng.uniform(0.9, 1.3))
        img = cv2.warpAffine(photo, m, (512, 512), borderMode=cv2.BORDER_REFLECT)
        img = np.clip(img * rng.uniform(0.8, 1.2, size=3) + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "happy" / f"{i:06d}.jpg", quality=90)


def baseline(files: list[Path], out: Path) -> float:
    """Images per second of a bare PIL open + resize + save loop."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for f in files:
        Image.open(f).convert("RGB").resize((FACE_SIZE, FACE_SIZE)).save(out / f.name, quality=95)
    return len(files) / (time.perf_counter() - start)


def pipeline(folder: Path, root: Path, settings: IngestSettings) -> tuple[float, int]:
    """Images per second of the whole ingest (listing, shards, manifest, publish included) and samples kept."""
    start = time.perf_counter()
    listing = read_source("folder", str(folder), "bench")
    store = Storage(str(root))
    result = ingest(listing, settings, store.artifact("raw_faces", "bench", stage_key(listing_fingerprint(listing))))
    return len(listing.records) / (time.perf_counter() - start), len(result.manifest)


def _peak_child(folder: str, root: str, queue) -> None:
    pipeline(Path(folder), Path(root), IngestSettings(face_size=FACE_SIZE, aligned=True))
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_memory_mb(folder: Path, root: Path) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(str(folder), str(root), queue))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=int(os.environ.get("BENCH_N", 2000)))
    args = parser.parse_args()
    cv2.setNumThreads(1)  # per core: OpenCV would otherwise use every core
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = tmp / "n1", tmp / "n5"
        synthesize(small, args.n)
        files = sorted((small / "happy").glob("*.jpg"))
        pipeline(small, tmp / "warmup", IngestSettings(face_size=FACE_SIZE, aligned=True))  # page cache, imports
        base = baseline(files, tmp / "baseline")
        aligned, kept = pipeline(small, tmp / "aligned", IngestSettings(face_size=FACE_SIZE, aligned=True))
        base_again = baseline(files, tmp / "baseline2")  # the machine is noisy: baseline before and after
        detect_files = files[: max(200, args.n // 10)]
        detect_dir = tmp / "detect_src" / "happy"
        detect_dir.mkdir(parents=True)
        for f in detect_files:
            os.link(f, detect_dir / f.name)
        detect, found = pipeline(detect_dir.parent, tmp / "detect", IngestSettings(face_size=FACE_SIZE, detector=DETECTOR))
        base_detect = baseline(detect_files, tmp / "baseline3")
        haar, found_haar = pipeline(detect_dir.parent, tmp / "detect_haar",
                                    IngestSettings(face_size=FACE_SIZE, detector="opencv-haar"))
        base_haar = baseline(detect_files, tmp / "baseline4")

        for dst in (large / "happy",):
            dst.mkdir(parents=True)
            for f in files:
                os.link(f, dst / f.name)
        synthesize(large, 4 * args.n, start=args.n)
        peak1 = peak_memory_mb(small, tmp / "mem1")
        peak5 = peak_memory_mb(large, tmp / "mem5")

    base_mean = (base + base_again) / 2
    print(f"images: {args.n} x 512 px JPEG, crops {FACE_SIZE} px, one core")
    print(f"baseline_img_per_s: {base_mean:.1f}  (before {base:.1f}, after {base_again:.1f})")
    print(f"aligned_img_per_s: {aligned:.1f}  (kept {kept})")
    print(f"detect_img_per_s: {detect:.1f}  ({DETECTOR} on {len(detect_files)} images, faces found in {found}; "
          f"baseline {base_detect:.1f})")
    print(f"ingest_ratio_detect: {detect / base_detect:.3f}")
    print(f"detect_haar_img_per_s: {haar:.1f}  (opencv-haar, faces found in {found_haar}; baseline {base_haar:.1f})")
    print(f"ingest_ratio_detect_haar: {haar / base_haar:.3f}")
    print(f"peak_rss_mb_1x: {peak1:.0f}")
    print(f"peak_rss_mb_5x: {peak5:.0f}")
    print(f"ingest_ratio: {aligned / base_mean:.3f}")
    print(f"memory_growth: {peak5 / peak1:.3f}")


if __name__ == "__main__":
    main()
