"""Preview grids: a PNG of labelled thumbnails that the Dagster UI shows in an asset's metadata."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def grid_image(images: Sequence[Image.Image], labels: Sequence[str] = (), thumb: int | None = 96, columns: int = 8,
               caption_lines: int = 1) -> Image.Image:
    """`images` as a grid of `thumb`-px tiles (None: the first image's own size), row-major, `columns` wide; with
    `labels`, each tile has its label under it (wrapped to `caption_lines`). An empty list gives one grey tile."""
    if not images:
        images, labels = [Image.new("RGB", (thumb or 96, thumb or 96), (40, 40, 40))], ["(empty)"]
    width, height = (thumb, thumb) if thumb else images[0].size
    font = ImageFont.load_default()
    line_h = 11
    text_h = line_h * caption_lines + 4 if labels else 0
    cols = min(columns, len(images))
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * width, rows * (height + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, width // 6)
    for i, img in enumerate(images):
        x, y = (i % cols) * width, (i // cols) * (height + text_h)
        img = img.convert("RGB")
        sheet.paste(img if img.size == (width, height) else img.resize((width, height), Image.Resampling.LANCZOS),
                    (x, y))
        text = labels[i] if i < len(labels) else ""
        for j, line in enumerate(textwrap.wrap(text, chars)[:caption_lines]):
            draw.text((x + 2, y + height + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def preview_grid(images: Sequence[Image.Image], labels: Sequence[str] = (), thumb: int = 96, columns: int = 8,
                 caption_lines: int = 1) -> bytes:
    """PNG bytes of `grid_image(...)`: what an asset's metadata shows."""
    buf = io.BytesIO()
    grid_image(images, labels, thumb, columns, caption_lines).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def markdown_image(png: bytes, alt: str = "preview") -> str:
    """Markdown that embeds PNG bytes inline (the Dagster UI renders it in the metadata panel)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def confusion_png(matrix, labels: Sequence[str], title: str = "", cell: int = 34) -> bytes:
    """A confusion matrix (rows: truth, columns: prediction; counts) as a PNG heat map with counts and row shares."""
    import numpy as np

    matrix = np.asarray(matrix)
    n = len(labels)
    left, top = 70, 34 if title else 22
    img = Image.new("RGB", (left + n * cell + 8, top + n * cell + 30), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if title:
        d.text((4, 4), title, fill=(0, 0, 0), font=font)
    rows = matrix.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(n):
        d.text((4, top + i * cell + cell // 2 - 5), labels[i][:10], fill=(0, 0, 0), font=font)
        d.text((left + i * cell + 2, top + n * cell + 4), labels[i][:5], fill=(0, 0, 0), font=font)
        for j in range(n):
            share = float(matrix[i, j] / rows[i, 0])
            shade = int(255 - 200 * share)
            colour = (shade, shade, 255) if i != j else (shade, 255, shade)
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1]
            d.rectangle(box, fill=colour, outline=(210, 210, 210))
            d.text((box[0] + 4, box[1] + cell // 2 - 5), str(int(matrix[i, j])), fill=(0, 0, 0), font=font)
    d.text((left, top + n * cell + 16), "predicted ->   (rows: true class)", fill=(90, 90, 90), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def stack_rows(images: Sequence[Image.Image]) -> Image.Image:
    """Images stacked top to bottom (left-aligned, white where a row is narrower)."""
    width, height = max(im.width for im in images), sum(im.height for im in images)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for im in images:
        sheet.paste(im.convert("RGB"), (0, y))
        y += im.height
    return sheet


def bar_chart_png(groups: Sequence[tuple[str, Sequence[tuple[str, float | None]]]], title: str = "",
                  width: int = 420, bar_h: int = 16) -> bytes:
    """Horizontal bars of shares in [0, 1], in titled groups: [(group title, [(label, value or None)])]."""
    font = ImageFont.load_default()
    left, right = 170, 56
    rows = sum(len(bars) + 1 for _, bars in groups)
    img = Image.new("RGB", (left + width + right, 24 + rows * (bar_h + 4) + 8), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill=(0, 0, 0), font=font)
    y = 24
    palette = [(90, 140, 220), (120, 190, 120), (230, 150, 80), (170, 120, 200)]
    for g, (group, bars) in enumerate(groups):
        d.text((4, y + 3), group, fill=(60, 60, 60), font=font)
        y += bar_h + 4
        for label, value in bars:
            d.text((12, y + 3), label[:26], fill=(0, 0, 0), font=font)
            d.rectangle([left, y, left + width, y + bar_h], outline=(220, 220, 220))
            if value is not None:
                d.rectangle([left, y, left + int(width * max(0.0, min(1.0, value))), y + bar_h],
                            fill=palette[g % len(palette)])
            d.text((left + width + 6, y + 3), "-" if value is None else f"{value:.1%}", fill=(0, 0, 0), font=font)
            y += bar_h + 4
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
