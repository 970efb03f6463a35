"""Decoding images as they come in the wild, into upright 8-bit RGB, or a clear reason why not.

Accepted and normalised: grayscale, CMYK, 16-bit and float, palette and alpha images, EXIF-rotated JPEGs, and any
format behind a misleading extension (the content decides, not the name). Rejected with a reason code:
`empty_file`, `not_an_image`, `corrupt` (truncated or undecodable), `too_small`.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A decompression bomb is a corrupt input for us, not a warning.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class BadImage(ValueError):
    """An input that cannot become a face image; `reason` is a stable code, `detail` says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_image(data: bytes, min_side: int = 1, draft_side: int | None = None) -> Image.Image:
    """Decode bytes into an upright RGB PIL image whose shorter side is at least `min_side` pixels.

    `draft_side`: for JPEGs, let the decoder downscale by 1/2, 1/4 or 1/8 while keeping the shorter side at or
    above this many pixels (much faster for large photos when only a small crop is needed). The returned image's
    `info["scale"]` is the factor from original to decoded pixels.
    """
    if not data:
        raise BadImage("empty_file", "the file has 0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not_an_image", "no image format recognised in the file's bytes") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on open means the file is unusable
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    original_size = img.size
    if min(original_size) < min_side:
        raise BadImage("too_small", f"{original_size[0]}x{original_size[1]} px is below the minimum side {min_side}")
    try:
        if draft_side and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
            scale = max(1, min(original_size) // draft_side)
            img.draft(img.mode, (original_size[0] // scale, original_size[1] // scale))
        img.load()  # forces the full decode: truncated files fail here, not later
        if img.getexif().get(0x0112, 1) != 1:  # only rotate (a copy) when the EXIF orientation says so
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    rgb = to_rgb(img)
    rotated = img.size != original_size and img.size == original_size[::-1]
    rgb.info["scale"] = (rgb.size[1] if rotated else rgb.size[0]) / original_size[0]
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha is composited over white, 16-bit/float are rescaled to 0..255."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def pixel_hash(pixels: Image.Image | np.ndarray) -> str:
    """Hash of decoded pixels and their shape: two files with the same picture share it, whatever their format."""
    arr = np.ascontiguousarray(np.asarray(pixels))
    h = hashlib.sha256(f"{arr.shape}:{arr.dtype}".encode())  # sha256 runs on the CPU's SHA extensions: fastest here
    h.update(arr)
    return h.hexdigest()[:32]


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
