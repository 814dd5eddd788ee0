"""Shape drawing for the bundled captioned-scene generator.

Each object category is drawn with Pillow primitives into its own transparent RGBA layer, so
that its tight bounding box is simply the bounding box of the layer's alpha channel. The
categories differ in silhouette (not only in colour) so that a detector can learn them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

#: Named object colours (the attribute vocabulary), RGB.
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 35),
    "orange": (245, 135, 25),
    "purple": (135, 55, 185),
    "white": (246, 246, 246),
    "black": (22, 22, 22),
}

#: Width / height of each category's nominal box.
ASPECT: dict[str, float] = {
    "ball": 1.0,
    "box": 1.0,
    "tree": 0.7,
    "star": 1.0,
    "car": 1.8,
    "house": 0.9,
    "cup": 1.1,
    "heart": 1.05,
    "arrow": 1.9,
    "flower": 0.8,
    "fish": 1.7,
    "moon": 0.8,
    "kite": 0.75,
    "umbrella": 1.0,
}

#: Categories whose drawing has a facing direction and may be mirrored.
_FLIPPABLE = frozenset({"car", "cup", "arrow", "fish", "moon", "kite", "umbrella"})

_TRUNK: RGB = (105, 68, 32)
_WHEEL: RGB = (30, 30, 30)
_GLASS: RGB = (170, 215, 235)


def _rgba(c: RGB) -> tuple[int, int, int, int]:
    return (c[0], c[1], c[2], 255)


def _edge(c: RGB) -> tuple[int, int, int, int]:
    """An outline colour that stands out from the fill (darker, or lighter for dark fills)."""
    if sum(c) < 150:
        return (120, 120, 120, 255)
    return (int(c[0] * 0.55), int(c[1] * 0.55), int(c[2] * 0.55), 255)


def _contrast(c: RGB) -> tuple[int, int, int, int]:
    """A detail colour (windows, doors) that contrasts with the fill."""
    return (40, 40, 40, 255) if sum(c) > 450 else (235, 235, 225, 255)


def _ball(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    d.ellipse((0, 0, w - 1, h - 1), fill=_rgba(c), outline=_edge(c), width=max(1, w // 24))
    d.ellipse((w * 0.22, h * 0.18, w * 0.4, h * 0.34), fill=(255, 255, 255, 255))


def _box(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    k = 0.28  # depth of the cube's top and side faces, as a fraction of the size
    front = (0, h * k, w * (1 - k), h - 1)
    top = [(0, h * k), (w * k, 0), (w - 1, 0), (w * (1 - k), h * k)]
    side = [(w * (1 - k), h * k), (w - 1, 0), (w - 1, h * (1 - k)), (w * (1 - k), h - 1)]
    light = tuple(min(255, v + 60) for v in c) + (255,)
    d.polygon(top, fill=light, outline=_edge(c))
    d.polygon(side, fill=_edge(c), outline=_edge(c))
    d.rectangle(front, fill=_rgba(c), outline=_edge(c), width=max(1, w // 30))


def _tree(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    d.rectangle((w * 0.4, h * 0.72, w * 0.6, h - 1), fill=_rgba(_TRUNK))
    for top, bottom, half in ((0.0, 0.45, 0.32), (0.18, 0.62, 0.42), (0.34, 0.8, 0.5)):
        tri = [(w / 2, h * top), (w / 2 - w * half, h * bottom), (w / 2 + w * half - 1, h * bottom)]
        d.polygon(tri, fill=_rgba(c), outline=_edge(c))


def _star_points(cx: float, cy: float, r_out: float, r_in: float, n: int) -> list[tuple]:
    pts = []
    for i in range(2 * n):
        r = r_out if i % 2 == 0 else r_in
        a = -np.pi / 2 + i * np.pi / n
        pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
    return pts


def _star(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    r = min(w, h) / 2 - 0.5
    d.polygon(_star_points(w / 2, h / 2 + r * 0.1, r, r * 0.42, 5), fill=_rgba(c), outline=_edge(c))


def _car(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    cabin = [(w * 0.22, h * 0.42), (w * 0.34, h * 0.05), (w * 0.66, h * 0.05), (w * 0.8, h * 0.42)]
    d.polygon(cabin, fill=_rgba(c), outline=_edge(c))
    for xs in ((0.3, 0.38, 0.49, 0.49), (0.53, 0.53, 0.63, 0.72)):  # two side windows
        ys = (0.4, 0.14, 0.14, 0.4)
        d.polygon([(w * x, h * y) for x, y in zip(xs, ys, strict=True)], fill=_rgba(_GLASS))
    d.rounded_rectangle(
        (0, h * 0.38, w - 1, h * 0.78), radius=max(1, h // 8), fill=_rgba(c), outline=_edge(c)
    )
    r = h * 0.2
    for cx in (w * 0.24, w * 0.76):
        d.ellipse(
            (cx - r, h - 1 - 2 * r, cx + r, h - 1), fill=_rgba(_WHEEL), outline=(150, 150, 150, 255)
        )


def _house(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    d.rectangle((w * 0.1, h * 0.45, w * 0.9, h - 1), fill=_rgba(c), outline=_edge(c))
    d.polygon([(0, h * 0.47), (w / 2, 0), (w - 1, h * 0.47)], fill=_edge(c))
    d.rectangle((w * 0.42, h * 0.68, w * 0.6, h - 1), fill=_contrast(c))
    d.rectangle((w * 0.18, h * 0.55, w * 0.34, h * 0.7), fill=_rgba(_GLASS))
    d.rectangle((w * 0.68, h * 0.55, w * 0.82, h * 0.7), fill=_rgba(_GLASS))


def _cup(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    lw = max(2, w // 9)
    d.ellipse((w * 0.5, h * 0.2, w - 1, h * 0.7), outline=_rgba(c), width=lw)
    d.polygon(
        [(0, 0), (w * 0.78, 0), (w * 0.68, h - 1), (w * 0.1, h - 1)],
        fill=_rgba(c),
        outline=_edge(c),
    )
    d.line((0, h * 0.06, w * 0.78, h * 0.06), fill=_edge(c), width=max(1, h // 14))


def _heart(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    r = w / 4
    d.ellipse((0, 0, 2 * r, 2 * r), fill=_rgba(c))
    d.ellipse((w - 1 - 2 * r, 0, w - 1, 2 * r), fill=_rgba(c))
    d.polygon(
        [(w * 0.015, r * 1.25), (w / 2, h - 1), (w * 0.985 - 1, r * 1.25), (w / 2, r)],
        fill=_rgba(c),
    )


def _arrow(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    d.rectangle((0, h * 0.35, w * 0.62, h * 0.65), fill=_rgba(c), outline=_edge(c))
    d.polygon([(w * 0.58, 0), (w - 1, h / 2), (w * 0.58, h - 1)], fill=_rgba(c), outline=_edge(c))


def _flower(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    d.line((w / 2, h * 0.5, w / 2, h - 1), fill=_rgba(COLOURS["green"]), width=max(2, w // 12))
    cx, cy, rr = w / 2, w / 2, w / 2
    pr = rr * 0.36
    for i in range(6):
        a = i * np.pi / 3
        px, py = cx + (rr - pr) * np.cos(a), cy + (rr - pr) * np.sin(a)
        d.ellipse((px - pr, py - pr, px + pr, py + pr), fill=_rgba(c), outline=_edge(c))
    centre = (250, 215, 40, 255) if c != COLOURS["yellow"] else (140, 80, 20, 255)
    d.ellipse((cx - pr * 0.9, cy - pr * 0.9, cx + pr * 0.9, cy + pr * 0.9), fill=centre)


def _fish(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    d.polygon([(w * 0.62, h / 2), (w - 1, 0), (w - 1, h - 1)], fill=_rgba(c), outline=_edge(c))
    d.ellipse((0, h * 0.12, w * 0.74, h * 0.88), fill=_rgba(c), outline=_edge(c))
    er = h * 0.08
    d.ellipse((w * 0.16 - er, h * 0.42 - er, w * 0.16 + er, h * 0.42 + er), fill=_contrast(c))


def _moon(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    d.ellipse((0, 0, h - 1, h - 1), fill=_rgba(c), outline=_edge(c))
    d.ellipse((h * 0.38, -h * 0.08, h * 1.3, h * 0.92), fill=(0, 0, 0, 0))


def _kite(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    top = [(w / 2, 0), (w - 1, h * 0.3), (w / 2, h * 0.72), (0, h * 0.3)]
    d.polygon(top, fill=_rgba(c), outline=_edge(c))
    d.line((w / 2, 0, w / 2, h * 0.72), fill=_edge(c), width=1)
    d.line((0, h * 0.3, w - 1, h * 0.3), fill=_edge(c), width=1)
    d.line(
        [(w / 2, h * 0.72), (w * 0.35, h * 0.84), (w * 0.6, h * 0.92), (w * 0.45, h - 1)],
        fill=_edge(c),
        width=max(1, w // 20),
    )


def _umbrella(d: ImageDraw.ImageDraw, w: int, h: int, c: RGB) -> None:
    lw = max(2, w // 16)
    d.line((w / 2, h * 0.4, w / 2, h * 0.88), fill=(60, 60, 60, 255), width=lw)
    d.arc(
        (w / 2 - w * 0.16, h * 0.72, w / 2 + lw / 2, h - 1),
        0,
        180,
        fill=(60, 60, 60, 255),
        width=lw,
    )
    d.pieslice((0, 0, w - 1, h * 0.9), 180, 360, fill=_rgba(c), outline=_edge(c))
    for x in (w / 4, w / 2, w * 3 / 4):
        d.line((w / 2, h * 0.02, x, h * 0.45), fill=_edge(c), width=1)


_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, int, int, RGB], None]] = {
    "ball": _ball,
    "box": _box,
    "tree": _tree,
    "star": _star,
    "car": _car,
    "house": _house,
    "cup": _cup,
    "heart": _heart,
    "arrow": _arrow,
    "flower": _flower,
    "fish": _fish,
    "moon": _moon,
    "kite": _kite,
    "umbrella": _umbrella,
}

#: Real things too intricate for primitives: openclipart-png drawings of them (their own colours,
#: so they take no colour word), chosen and scaled per object (`cpfean.scenes.photos`).
THINGS: tuple[str, ...] = ("dog", "cat", "bird", "horse", "truck", "airplane", "boat")

#: The object categories, in detector label order (COCO category id = index + 1).
CATEGORIES: tuple[str, ...] = (*_DRAWERS, *THINGS)


_OPAQUE = 96  # alpha above which a drawing's pixel belongs to the cut-out


@functools.cache
def _thing_files(category: str) -> tuple:
    """The category's drawings solid enough to read at a few dozen pixels (a quarter of their
    box opaque), line art left out."""
    from cpfean.scenes.photos import catalogue, drawing

    found = catalogue()
    files = sorted(found["train"][category] + found["val"][category])
    opaque = {f: (np.asarray(drawing(f).getchannel("A")) > _OPAQUE).mean() for f in files}
    solid = tuple(f for f in files if opaque[f] > 0.25)
    return solid or tuple(files)


def _draw_thing(category: str, side: float, rng: np.random.Generator) -> Image.Image:
    """One of the category's openclipart drawings, scaled to a box area of side^2, its alpha
    made binary so that the object is a crisp cut-out."""
    from cpfean.scenes.photos import drawing

    files = _thing_files(category)
    art = drawing(files[int(rng.integers(len(files)))])
    scale = side / (art.width * art.height) ** 0.5
    size = (max(8, round(art.width * scale)), max(8, round(art.height * scale)))
    layer = art.resize(size, Image.Resampling.LANCZOS)
    layer.putalpha(layer.getchannel("A").point(lambda a: 255 if a > _OPAQUE else 0))
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return layer


def draw_shape(category: str, side: float, colour: str, rng: np.random.Generator) -> Image.Image:
    """Draw one object into a transparent layer cropped to the drawn pixels.

    Args:
        category: one of `CATEGORIES`.
        side: square root of the nominal box area in pixels; the category's aspect ratio
            decides width and height.
        colour: one of `COLOURS` ("" for `THINGS`, drawn in their own colours).
        rng: source of the small random variations (mirroring, tilt).

    Returns:
        An RGBA image whose alpha is non-zero exactly on the shape and whose size is the
        shape's tight bounding box (no fully transparent border row or column).
    """
    if category in THINGS:
        layer = _draw_thing(category, side, rng)
    else:
        aspect = ASPECT[category]
        w = max(8, round(side * aspect**0.5))
        h = max(8, round(side / aspect**0.5))
        layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        _DRAWERS[category](ImageDraw.Draw(layer), w, h, COLOURS[colour])
        if category in _FLIPPABLE and rng.random() < 0.5:
            layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tilt = float(rng.uniform(-10.0, 10.0))
        if abs(tilt) > 2.0:
            layer = layer.rotate(tilt, resample=Image.Resampling.NEAREST, expand=True)
    bbox = layer.getchannel("A").getbbox()
    if bbox is None:  # cannot happen for the sizes used; guards against a silent empty box
        raise RuntimeError(f"drawing {category!r} at side {side:.1f} produced no pixels")
    return layer.crop(bbox)
