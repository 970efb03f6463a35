"""Preview grids: a PNG of labelled thumbnails that the Dagster UI shows in an asset's metadata."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def preview_grid(images: Sequence[Image.Image], labels: Sequence[str] = (), thumb: int = 96, columns: int = 8,
                 caption_lines: int = 1) -> bytes:
    """PNG bytes of `images` as a grid of `thumb`-px tiles, each with its label (wrapped to `caption_lines`)."""
    if not images:
        images = [Image.new("RGB", (thumb, thumb), (40, 40, 40))]
        labels = ["(empty)"]
    font = ImageFont.load_default()
    line_h = 11
    text_h = line_h * caption_lines + 4
    cols = min(columns, len(images))
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, thumb // 6)
    for i, img in enumerate(images):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + text_h)
        sheet.paste(img.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
        text = labels[i] if i < len(labels) else ""
        for j, line in enumerate(textwrap.wrap(text, chars)[:caption_lines]):
            draw.text((x + 2, y + thumb + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def markdown_image(png: bytes, alt: str = "preview") -> str:
    """Markdown that embeds PNG bytes inline (the Dagster UI renders it in the metadata panel)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
