"""What a training run shows at its end: the loss curve (PNG drawn with PIL); samples come from the sampler
(`generation.sampler`) on the fixed evaluation batch (`evaluation.generation_quality`)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

_BG, _AXIS, _RAW, _SMOOTH = (255, 255, 255), (90, 90, 90), (170, 190, 230), (30, 70, 170)


def _smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def loss_curve_png(losses: Sequence[float], width: int = 480, height: int = 240) -> bytes:
    """The loss per step as a PNG (bytes): raw values in light blue, an exponential moving average in dark blue,
    the y range and step count written on the axes. Non-finite losses are left out; no losses gives empty axes."""
    img = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 10, 10, height - 22
    d.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS)
    points = [(i, float(v)) for i, v in enumerate(losses) if math.isfinite(float(v))]
    if points:
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        span = (hi - lo) or 1.0
        n = max(len(losses) - 1, 1)

        def xy(i: int, v: float) -> tuple[float, float]:
            return left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span

        raw = [xy(i, v) for i, v in points]
        smooth = [xy(i, v) for (i, _), v in zip(points, _smoothed([v for _, v in points]))]
        for line, colour in ((raw, _RAW), (smooth, _SMOOTH)):
            if len(line) > 1:
                d.line(line, fill=colour, width=1 if colour == _RAW else 2)
            else:
                d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        d.text((2, top), f"{hi:.3g}", fill=_AXIS)
        d.text((2, bottom - 10), f"{lo:.3g}", fill=_AXIS)
    d.text((left, bottom + 6), "step 1", fill=_AXIS)
    d.text((right - 60, bottom + 6), f"step {len(losses)}", fill=_AXIS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
