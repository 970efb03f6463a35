"""Toy faces: the project's built-in demo data.

Simple drawn frontal faces for the 7 basic expressions whose facial action units (AUs) are known exactly,
because the AUs *are* the drawing instructions: each drawn AU is one distinct local change of the geometry.
They are written in the real dataset layouts (RAF-DB basic, an FFHQ-like image folder) so that the real
readers ingest them and the demo exercises the same code paths as the paper-scale run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7, OPENGRAPHAU_41

# The AUs the drawing can show; every other OpenGraphAU unit is always absent (0).
DRAWN_AUS: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU12", "AU15", "AU16", "AU20",
                              "AU23", "AU25", "AU26")
# AUs always kept so the expression stays readable; the rest of the paper's set is kept with KEEP_PROB each.
DEFINING_AUS: dict[str, tuple[str, ...]] = {
    "neutral": (), "happy": ("AU12",), "sad": ("AU1", "AU15"), "surprise": ("AU2", "AU26"),
    "fear": ("AU4", "AU20"), "disgust": ("AU9",), "anger": ("AU4", "AU23"),
}
KEEP_PROB = 0.85
# Natural extras outside the paper's table (lips part), with their probability per expression.
EXTRA_AUS: dict[str, dict[str, float]] = {"happy": {"AU25": 0.3}, "surprise": {"AU25": 0.6}, "fear": {"AU25": 0.6},
                                          "disgust": {"AU25": 0.4}}
# RAF-DB basic label codes 1..7.

SKIN_TONES = ((255, 226, 200), (243, 203, 170), (228, 180, 145), (206, 150, 112), (178, 122, 86),
              (146, 96, 64), (114, 72, 48), (86, 54, 38))
HAIR_COLOURS = ((28, 22, 20), (60, 40, 28), (102, 68, 42), (150, 90, 50), (205, 170, 110), (150, 150, 150))
EYE_COLOURS = ((70, 45, 25), (40, 28, 20), (110, 85, 45), (70, 110, 160), (75, 120, 80), (110, 120, 130))
HAIR_STYLES = ("none", "short", "long", "bun")
BACKGROUNDS = ("flat", "gradient", "noise")


@dataclass(frozen=True)
class ToyFace:
    """One drawn face: RGB image, its expression (canonical name), the exact drawn AUs, appearance params."""

    image: Image.Image
    expression: str
    aus: tuple[str, ...]
    params: dict


def sample_aus(expression: str, rng: np.random.Generator) -> tuple[str, ...]:
    """Sample the AU set of one face of `expression` (supplementary Table 3, one random subset per image).

    The defining AUs are always kept, the others of the paper's set with probability KEEP_PROB, plus the
    natural extras of EXTRA_AUS. Returns AU names in OpenGraphAU order; neutral gives ().
    """
    _check_expression(expression)
    chosen = {au for au in EXPRESSION_AUS[expression] if au in DEFINING_AUS[expression] or rng.random() < KEEP_PROB}
    chosen |= {au for au, p in EXTRA_AUS.get(expression, {}).items() if rng.random() < p}
    return tuple(au for au in OPENGRAPHAU_41 if au in chosen)


def _check_expression(expression: str) -> None:
    if expression not in EXPRESSIONS_7:
        raise ValueError(f"unknown expression {expression!r}; expected one of {', '.join(EXPRESSIONS_7)}")


def _colour(base, rng: np.random.Generator, jitter: int) -> list[int]:
    return [int(v) for v in np.clip(np.asarray(base) + rng.integers(-jitter, jitter + 1, 3), 0, 255)]


def sample_appearance(rng: np.random.Generator, size: int = 128) -> dict:
    """Sample everything about a face except its AUs; a JSON-serialisable dict (fractions of the frame, degrees).

    The number of draws from `rng` is fixed, so the same generator state gives the same person whatever AUs follow.
    """
    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    params = {
        "size": int(size), "face_height": u(0.63, 0.73), "aspect": u(0.74, 0.86),
        "center_dx": u(-0.035, 0.035), "center_dy": u(-0.03, 0.03), "roll_deg": u(-12, 12), "yaw": u(-1, 1),
        "skin": _colour(SKIN_TONES[rng.integers(len(SKIN_TONES))], rng, 8),
        "hair_style": str(HAIR_STYLES[rng.integers(len(HAIR_STYLES))]),
        "hair": _colour(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], rng, 10),
        "eye": _colour(EYE_COLOURS[rng.integers(len(EYE_COLOURS))], rng, 10),
        "clothes": _colour(rng.integers(30, 226, 3), rng, 0), "brow_thickness": u(0.05, 0.08),
        "background": str(BACKGROUNDS[rng.integers(len(BACKGROUNDS))]),
        "bg_colours": [_colour(rng.integers(20, 236, 3), rng, 0) for _ in range(2)],
        "bg_angle": u(0, 2 * math.pi), "bg_seed": int(rng.integers(2**31)),
        "light_angle": u(0, 2 * math.pi), "light_strength": u(0.06, 0.2),
    }
    # Intensities for every drawable AU are always drawn, present or not, to keep the draw count fixed.
    params["intensity"] = {au: u(0.8, 1.15) for au in DRAWN_AUS}
    return params


def draw_toy_face(expression: str, rng: np.random.Generator, size: int = 128,
                  aus: tuple[str, ...] | None = None) -> ToyFace:
    """Draw one toy face of `expression` as a `size` x `size` RGB image.

    `aus` None samples them with `sample_aus` (after the appearance, so a given rng state gives the same person
    with or without explicit AUs). AUs outside DRAWN_AUS are an error: they could not be seen in the image.
    """
    _check_expression(expression)
    params = sample_appearance(rng, size)
    aus = sample_aus(expression, rng) if aus is None else tuple(aus)
    if not set(aus) <= set(DRAWN_AUS):
        raise ValueError(f"toy faces cannot draw {sorted(set(aus) - set(DRAWN_AUS))}; drawable: {', '.join(DRAWN_AUS)}")
    aus = tuple(au for au in OPENGRAPHAU_41 if au in aus)  # OpenGraphAU order, no duplicates
    return ToyFace(render_toy_face(params, aus), expression, aus, params)


@dataclass(frozen=True)
class _Frame:
    """Where the face lies on the drawing canvas: centre, half-width `a`, half-height `b` (px), yaw, roll (rad)."""

    cx: float
    cy: float
    a: float
    b: float
    yaw: float
    roll: float

    def pt(self, x: float, y: float, depth: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float]:
        """Canvas point of face point (x in `a`, y in `b`) plus a (dx, dy) px offset, rolled with the head."""
        # A slight yaw moves features sideways, the protruding nose more than the rest.
        u, v = (x + 0.08 * self.yaw * depth) * self.a + dx, y * self.b + dy
        c, s = math.cos(self.roll), math.sin(self.roll)
        return self.cx + c * u + s * v, self.cy - s * u + c * v

    def ellipse(self, x: float, y: float, rx: float, ry: float, depth: float = 1.0, n: int = 24) -> list:
        """Polygon of an ellipse of radii rx, ry (px) centred on face point (x, y)."""
        return [self.pt(x, y, depth, rx * math.cos(t), ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, n)]

    def w(self, frac: float) -> int:
        """Line width of `frac` face half-widths, at least 1 px."""
        return max(1, round(frac * self.a))


def _au_shape(aus: tuple[str, ...], intensity: dict) -> dict:
    """Geometry offsets implied by the AUs: brows/mouth in b-units (negative = up), eye openings in a-units."""
    k = {au: (intensity[au] if au in aus else 0.0) for au in DRAWN_AUS}
    return {
        "k": k,
        "inner_dy": -0.15 * k["AU1"] + 0.13 * k["AU4"], "inner_dx": -0.06 * k["AU4"],
        "peak_dy": -0.05 * k["AU1"] - 0.10 * k["AU2"] + 0.06 * k["AU4"],
        "outer_dy": -0.13 * k["AU2"] + 0.03 * k["AU4"],
        "eye_up": 0.072 * (1 + 0.9 * k["AU5"]) * (1 - 0.3 * k["AU7"]),
        "eye_low": 0.06 * (1 - 0.45 * k["AU6"]) * (1 - 0.6 * k["AU7"]) + 0.006,
        "mouth_w": 0.27 * (1 + 0.15 * k["AU12"] + 0.4 * k["AU20"]) * (1 - 0.2 * k["AU23"]) * (1 - 0.22 * k["AU26"]),
        "lift": 0.10 * k["AU12"] - 0.09 * k["AU15"] - 0.05 * k["AU20"],
        "lip": (1 - 0.7 * k["AU23"]) * (1 - 0.25 * k["AU20"]),
        # Parted lips open as a slit (bell), a dropped jaw as an oval (round), a lowered lower lip squarely (box).
        "open_up": 0.012 * k["AU25"] + 0.008 * k["AU16"], "open_low": 0.035 * k["AU25"],
        "jaw_up": 0.035 * k["AU26"], "jaw_low": 0.17 * k["AU26"], "open_box": 0.06 * k["AU16"],
        "jaw": 0.07 * k["AU26"],
    }


def _shade(rgb, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in rgb)


def _background(p: dict, side: int) -> Image.Image:
    """Flat colour, linear gradient or smooth noise between the two background colours."""
    c1, c2 = np.array(p["bg_colours"], dtype=np.float32)
    if p["background"] == "flat":
        return Image.new("RGB", (side, side), tuple(int(v) for v in c1))
    if p["background"] == "gradient":
        yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
        t = np.clip(0.5 + xx * math.cos(p["bg_angle"]) + yy * math.sin(p["bg_angle"]), 0, 1)
    else:
        coarse = np.random.default_rng(p["bg_seed"]).random((5, 5)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC)).clip(0, 1)
    rgb = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return Image.fromarray(rgb.astype(np.uint8))


def _draw_body(d: ImageDraw.ImageDraw, g: _Frame, p: dict, side: int) -> None:
    """Neck and shoulders, not rolled (the head rolls on the neck)."""
    d.rectangle([g.cx - 0.42 * g.a, g.cy + 0.4 * g.b, g.cx + 0.42 * g.a, side], fill=_shade(p["skin"], 0.82))
    d.ellipse([g.cx - 2.0 * g.a, g.cy + 1.15 * g.b, g.cx + 2.0 * g.a, g.cy + 2.6 * g.b], fill=tuple(p["clothes"]))


def _draw_head(d: ImageDraw.ImageDraw, g: _Frame, p: dict, s: dict) -> None:
    """Back hair, bun, ears and the face outline (its lower half lengthened by a jaw drop, AU26)."""
    hair, t = tuple(p["hair"]), np.linspace(0, 2 * math.pi, 72, endpoint=False)
    if p["hair_style"] == "long":  # a squarish superellipse falling past the jaw
        d.polygon([g.pt(0, 0.1, dx=1.2 * g.a * np.sign(c) * abs(c) ** 0.6, dy=1.22 * g.b * np.sign(n) * abs(n) ** 0.6)
                   for c, n in zip(np.cos(t), np.sin(t))], fill=hair)
    if p["hair_style"] == "bun":
        d.polygon(g.ellipse(0, -1.09, 0.38 * g.a, 0.29 * g.b), fill=hair)
    for side in (-1, 1):
        d.polygon(g.ellipse(side * 0.98, -0.02, 0.13 * g.a, 0.2 * g.b, 0.0), fill=_shade(p["skin"], 0.9))
    jaw = np.where(np.sin(t) > 0, 1 + s["jaw"], 1.0)
    d.polygon([g.pt(c, n * j, 0.0) for c, n, j in zip(np.cos(t), np.sin(t), jaw)], fill=tuple(p["skin"]))


def _draw_hair_front(d: ImageDraw.ImageDraw, g: _Frame, p: dict) -> None:
    """Hair cap over the top of the head; its hairline stays above the highest brows."""
    if p["hair_style"] == "none":
        return
    t0 = math.asin(0.25 / 1.07)
    outer = [g.pt(-1.07 * math.cos(t), -1.07 * math.sin(t), 0.0) for t in np.linspace(t0, math.pi - t0, 40)]
    hairline = [g.pt(x, -0.64 + 0.4 * x * x, 0.0) for x in np.linspace(1.03, -1.03, 30)]
    d.polygon(outer + hairline, fill=tuple(p["hair"]))


def _draw_clipped(canvas: Image.Image, outline: list, fill, paint: Callable) -> None:
    """Fill polygon `outline` and run paint(draw, to_local) inside it only (iris in the lids, teeth in the lips)."""
    xs, ys = zip(*outline)
    x0, y0 = int(min(xs)) - 1, int(min(ys)) - 1
    patch = Image.new("RGB", (int(max(xs)) + 2 - x0, int(max(ys)) + 2 - y0), tuple(fill))
    mask = Image.new("L", patch.size, 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in outline], fill=255)
    paint(ImageDraw.Draw(patch), lambda q: (q[0] - x0, q[1] - y0))
    canvas.paste(patch, (x0, y0), mask)


def _draw_eyes(canvas: Image.Image, d: ImageDraw.ImageDraw, g: _Frame, p: dict, s: dict) -> None:
    """Almond eyes: AU5 opens the upper lid, AU7 raises and tenses the lower lid, AU6 adds cheek arcs, crow's feet."""
    line, crease = _shade(p["skin"], 0.35), _shade(p["skin"], 0.72)
    ew, hu, hl, t = 0.19 * g.a, s["eye_up"] * g.a, s["eye_low"] * g.a, np.linspace(0, 1, 17)
    r, gaze = 0.085 * g.a, 0.05 * p["yaw"] * g.a
    for side in (-1, 1):
        ex, ey, xs = side * 0.36, -0.08, side * (t - 0.5) * 2 * ew
        upper = [g.pt(ex, ey, dx=x, dy=-hu * math.sin(math.pi * v) ** 0.8) for x, v in zip(xs, t)]
        lower = [g.pt(ex, ey, dx=x, dy=hl * math.sin(math.pi * v) ** 0.9) for x, v in zip(xs, t)]
        discs = [(g.pt(ex, ey, dx=gaze, dy=0.01 * g.a), r, tuple(p["eye"])),
                 (g.pt(ex, ey, dx=gaze, dy=0.01 * g.a), 0.45 * r, (15, 12, 12)),
                 (g.pt(ex, ey, dx=gaze + 0.3 * r, dy=0.01 * g.a - 0.3 * r), 0.16 * r, (250, 250, 250))]

        def iris(dd, loc, discs=discs):
            for centre, rad, colour in discs:
                (cx, cy) = loc(centre)
                dd.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=colour)

        _draw_clipped(canvas, upper + lower[::-1], (244, 241, 235), iris)
        d.line([g.pt(ex, ey, dx=x, dy=-hu * math.sin(math.pi * v) ** 0.8 - 0.05 * g.a) for x, v in zip(xs, t)][3:-3],
               fill=crease, width=g.w(0.018))
        d.line(upper, fill=line, width=g.w(0.04), joint="curve")
        d.line(lower, fill=_shade(p["skin"], 0.6), width=g.w(0.014 + 0.02 * s["k"]["AU7"]), joint="curve")
        if s["k"]["AU6"]:
            d.line([g.pt(ex, ey, dx=side * x * g.a, dy=hl + (0.08 + 0.05 * (x / 0.17) ** 2) * g.a)
                    for x in np.linspace(-0.17, 0.17, 12)], fill=crease, width=g.w(0.02))
            for ang in (-0.45, 0.0, 0.45):  # crow's feet fanning out of the outer corner
                ray = [1.08 * ew, 1.08 * ew + 0.09 * g.a * math.cos(ang)]
                d.line([g.pt(ex, ey, dx=side * ray[0]), g.pt(ex, ey, dx=side * ray[1], dy=0.09 * g.a * math.sin(ang))],
                       fill=crease, width=g.w(0.016))


def _draw_brows(d: ImageDraw.ImageDraw, g: _Frame, p: dict, s: dict) -> None:
    """Tapered brows: AU1 lifts the inner ends, AU2 the outer ends, AU4 lowers and draws them together (+ furrows)."""
    brow = tuple(int(min(h * 0.6, c * 0.45)) for h, c in zip(p["hair"], p["skin"]))
    t = np.linspace(0, 1, 12)
    half = p["brow_thickness"] * g.a * (0.65 - 0.35 * t)
    (x0, y0), (x1, y1), (x2, y2) = ((0.13 + s["inner_dx"], -0.30 + s["inner_dy"]),
                                    (0.36 + 0.5 * s["inner_dx"], -0.40 + s["peak_dy"]), (0.60, -0.30 + s["outer_dy"]))
    bx = (1 - t) ** 2 * x0 + 2 * t * (1 - t) * x1 + t ** 2 * x2  # quadratic Bezier: inner end, arch, outer end
    by = (1 - t) ** 2 * y0 + 2 * t * (1 - t) * y1 + t ** 2 * y2
    for side in (-1, 1):
        d.polygon([g.pt(side * x, y, 0.9, dy=-h) for x, y, h in zip(bx, by, half)]
                  + [g.pt(side * x, y, 0.9, dy=h) for x, y, h in zip(bx[::-1], by[::-1], half[::-1])], fill=brow)
        if s["k"]["AU4"]:
            d.line([g.pt(side * 0.05, -0.31, 0.9), g.pt(side * 0.035, -0.19, 0.9)],
                   fill=_shade(p["skin"], 0.62), width=g.w(0.022))


def _draw_nose(d: ImageDraw.ImageDraw, g: _Frame, p: dict, s: dict) -> None:
    """Nostrils, wings and a bridge shadow; AU9 wrinkles the bridge and lifts and flares the nostrils."""
    k9 = s["k"]["AU9"]
    lift, flare, shadow = -0.03 * k9, 1 + 0.25 * k9, _shade(p["skin"], 0.7)
    light = -1 if math.cos(p["light_angle"]) > 0 else 1
    d.line([g.pt(light * 0.07, -0.02, 1.3), g.pt(light * 0.09, 0.15, 1.6)], fill=_shade(p["skin"], 0.85),
           width=g.w(0.025))
    for side in (-1, 1):
        d.polygon(g.ellipse(side * 0.07 * flare, 0.22 + lift, 0.035 * g.a, 0.018 * g.a, 1.6, 12),
                  fill=_shade(p["skin"], 0.45))
        d.line([g.pt(side * 0.11 * flare, 0.19 + lift, 1.6, side * 0.06 * g.a * math.cos(v), 0.07 * g.a * math.sin(v))
                for v in np.radians(np.linspace(-60, 100, 10))], fill=shadow, width=g.w(0.02))
    if k9:
        wrinkle, width = _shade(p["skin"], 0.5), g.w(0.03 * k9)
        for y in (-0.04, 0.01, 0.06):
            d.line([g.pt(x, y + 2.5 * x * x, 1.3) for x in np.linspace(-0.11, 0.11, 9)], fill=wrinkle, width=width)
        for side in (-1, 1):  # "bunny lines" running down the sides of the bridge
            d.line([g.pt(side * 0.13, -0.02, 1.2), g.pt(side * 0.1, 0.1, 1.4)], fill=wrinkle, width=width)


def _draw_mouth(canvas: Image.Image, d: ImageDraw.ImageDraw, g: _Frame, p: dict, s: dict) -> None:
    """Lips from four curves; AU12/15 move the corners, AU20/23 the width and lips, AU25/26/16 open the mouth."""
    xs = np.linspace(-1, 1, 25)
    bell, box = 1 - xs ** 2, 1 - xs ** 8
    mid = -s["lift"] * xs ** 2
    ui = mid - s["open_up"] * bell - s["jaw_up"] * np.sqrt(bell)
    li = mid + s["open_low"] * bell + s["jaw_low"] * np.sqrt(bell) + s["open_box"] * box
    uo = ui - 0.045 * s["lip"] * (1 - 0.6 * xs ** 2)
    lo = li + 0.065 * s["lip"] * (1 - 0.5 * xs ** 2)

    def curve(ys, dy=0.0):
        return [g.pt(x * s["mouth_w"], 0.5 + y + dy) for x, y in zip(xs, ys)]

    lip = tuple(int(c * f) for c, f in zip(p["skin"], (0.82, 0.55, 0.55)))
    d.polygon(curve(uo) + curve(ui)[::-1], fill=lip)
    d.polygon(curve(li) + curve(lo)[::-1], fill=lip)
    if float(np.max(li - ui)) > 0.01:
        def teeth(dd, loc):  # parted lips (AU25) bare the upper teeth, a lowered lower lip (AU16) the lower ones
            if s["k"]["AU25"]:
                dd.polygon([loc(q) for q in curve(ui) + curve(ui, 0.055)[::-1]], fill=(238, 234, 222))
            if s["k"]["AU16"]:
                dd.polygon([loc(q) for q in curve(li, -0.045) + curve(li)[::-1]], fill=(232, 228, 216))
        _draw_clipped(canvas, curve(ui) + curve(li)[::-1], (70, 22, 28), teeth)
    else:
        d.line(curve(mid), fill=_shade(p["skin"], 0.3), width=g.w(0.025), joint="curve")
    if s["k"]["AU12"]:  # nasolabial folds from the nose wings to just outside the raised corners
        for side in (-1, 1):
            d.line([g.pt(side * (0.17 + (s["mouth_w"] - 0.1) * v * v), 0.3 + (0.22 - s["lift"]) * v)
                    for v in np.linspace(0, 1, 8)], fill=_shade(p["skin"], 0.75), width=g.w(0.02), joint="curve")


def _apply_lighting(image: Image.Image, centre: tuple[float, float], radius: float, p: dict) -> Image.Image:
    """Soft directional light: a brightness ramp of +-light_strength across `radius` px around `centre`."""
    arr = np.asarray(image).astype(np.float32)
    yy, xx = np.mgrid[0:arr.shape[0], 0:arr.shape[1]].astype(np.float32)
    ramp = ((xx - centre[0]) * math.cos(p["light_angle"]) + (yy - centre[1]) * math.sin(p["light_angle"])) / radius
    gain = 1 + p["light_strength"] * np.clip(ramp, -1, 1)
    return Image.fromarray((arr * gain[..., None]).clip(0, 255).astype(np.uint8))


def face_geometry(params: dict) -> tuple[float, float, float, float]:
    """Face ellipse of `params` in output pixels: centre x, centre y, half-width, half-height (before the roll)."""
    size, half_height = params["size"], 0.5 * params["face_height"] * params["size"]
    return (size * (0.5 + params["center_dx"]), size * (0.53 + params["center_dy"]),
            half_height * params["aspect"], half_height)


def render_toy_face(params: dict, aus: tuple[str, ...]) -> Image.Image:
    """Draw the face described by `params` (from `sample_appearance`) with exactly `aus`; RGB, params['size'] px.

    Drawn at 2-3x and downsampled with Lanczos for antialiasing; the roll is applied to the head's coordinates.
    """
    size = params["size"]
    scale = 3 if size <= 160 else 2
    side = size * scale
    g = _Frame(*(scale * v for v in face_geometry(params)), params["yaw"], math.radians(params["roll_deg"]))
    shape = _au_shape(tuple(aus), params["intensity"])
    # The background is smooth: computed at output size, then upsampled for drawing.
    canvas = _background(params, size).resize((side, side), Image.BILINEAR)
    d = ImageDraw.Draw(canvas)
    _draw_body(d, g, params, side)
    _draw_head(d, g, params, shape)
    _draw_eyes(canvas, d, g, params, shape)
    _draw_brows(d, g, params, shape)
    _draw_nose(d, g, params, shape)
    _draw_mouth(canvas, d, g, params, shape)
    _draw_hair_front(d, g, params)
    small = canvas.resize((size, size), Image.LANCZOS)
    return _apply_lighting(small, (g.cx / scale, g.cy / scale), 1.2 * g.b / scale, params)
