"""The settings a generated scene takes place in: grass, sand, water, snow, a road, indoors.

Each is drawn procedurally as a ground (or floor) below a horizon and a sky (or wall) above it,
with the texture that names it (blades of grass, sand ripples, waves, snow speckles, a dashed
road, floorboards). Captions name the setting ("a dog on the grass"); which things a setting
admits is `EXCLUDED`.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["EXCLUDED", "LIKELY", "SETTINGS", "draw_setting"]

SETTINGS: tuple[str, ...] = ("grass", "sand", "water", "snow", "road", "indoors")

# things that do not appear in a setting (a boat on a road, a horse indoors)
EXCLUDED: dict[str, frozenset[str]] = {
    "grass": frozenset({"boat", "fish"}),
    "sand": frozenset({"fish"}),
    "water": frozenset({"car", "truck", "house", "tree", "horse", "dog", "cat", "flower"}),
    "snow": frozenset({"boat", "fish"}),
    "road": frozenset({"boat", "fish"}),
    "indoors": frozenset({"boat", "airplane", "truck", "car", "horse", "house", "moon", "tree"}),
}

# things a setting makes three times as likely (cars on roads, boats on water)
LIKELY: dict[str, frozenset[str]] = {
    "grass": frozenset({"dog", "horse", "tree", "house", "flower", "ball"}),
    "sand": frozenset({"umbrella", "kite", "dog", "ball", "airplane"}),
    "water": frozenset({"boat", "fish", "bird"}),
    "snow": frozenset({"tree", "horse", "house", "cat"}),
    "road": frozenset({"car", "truck", "house"}),
    "indoors": frozenset({"cup", "cat", "ball", "box", "heart"}),
}

# the (hue, saturation, value) ranges of each setting's ground or floor
_GROUND = {
    "grass": ((0.22, 0.32), (0.45, 0.75), (0.35, 0.65)),
    "sand": ((0.09, 0.13), (0.25, 0.45), (0.75, 0.92)),
    "water": ((0.53, 0.60), (0.45, 0.80), (0.40, 0.75)),
    "snow": ((0.55, 0.62), (0.02, 0.08), (0.88, 0.97)),
    "road": ((0.0, 1.0), (0.0, 0.06), (0.25, 0.40)),
    "indoors": ((0.05, 0.10), (0.35, 0.60), (0.35, 0.60)),
}


def _hsv(rng: np.random.Generator, ranges) -> np.ndarray:
    h, s, v = (rng.uniform(*r) for r in ranges)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def draw_setting(
    rng: np.random.Generator, setting: str, width: int, height: int
) -> tuple[Image.Image, int]:
    """The setting's picture, RGB (width x height), and its horizon's row (30-45% down)."""
    horizon = int(height * rng.uniform(0.30, 0.45))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ground = _hsv(rng, _GROUND[setting])
    if setting == "indoors":  # a plain wall
        top = _hsv(rng, ((0.0, 1.0), (0.05, 0.25), (0.65, 0.9)))
        sky = np.broadcast_to(top, (height, width, 3)).copy()
    else:  # a sky, paler towards the horizon
        blue = _hsv(rng, ((0.55, 0.62), (0.25, 0.55), (0.80, 0.97)))
        t = np.clip(y / max(horizon, 1), 0, 1)[..., None]
        sky = blue * (1 - 0.35 * t) + 255 * 0.35 * t
    depth = np.clip((y - horizon) / max(height - horizon, 1), 0, 1)[..., None]
    floor = ground * (0.8 + 0.3 * depth)  # nearer ground is lighter
    if setting == "sand":
        floor += 12 * np.sin(2 * np.pi * (y * 0.9 + 0.3 * x) / rng.uniform(7, 12))[..., None]
    elif setting == "water":
        floor += 18 * np.sin(2 * np.pi * (y + 4 * np.sin(x / 15)) / rng.uniform(5, 9))[..., None]
    elif setting == "indoors":  # floorboards
        plank = rng.uniform(14, 24)
        floor *= 0.9 + 0.12 * (((x + 3 * (y // plank)) // (2.6 * plank)) % 2)[..., None]
        floor *= np.where((y % plank < 1.5)[..., None], 0.7, 1.0)
    img = np.where((y < horizon)[..., None], sky, floor)
    img += rng.normal(0, 6 if setting != "snow" else 4, img.shape).astype(np.float32)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    d = ImageDraw.Draw(image)
    if setting == "grass":  # blades
        for _ in range(int(width * height / 90)):
            bx, by = rng.uniform(0, width), rng.uniform(horizon, height)
            shade = tuple(int(c) for c in np.clip(ground * rng.uniform(0.6, 1.3), 0, 255))
            d.line((bx, by, bx + rng.uniform(-2, 2), by - rng.uniform(3, 8)), fill=shade)
    elif setting == "snow":  # speckles
        for _ in range(int(width * height / 150)):
            sx, sy = rng.uniform(0, width), rng.uniform(horizon, height)
            d.point((sx, sy), fill=(255, 255, 255))
    elif setting == "road":  # verges and a dashed centre line
        verge = tuple(int(c) for c in _hsv(rng, _GROUND["grass"]))
        d.rectangle((0, horizon, width, horizon + (height - horizon) * 0.12), fill=verge)
        mid = horizon + (height - horizon) * 0.58
        dash = rng.uniform(18, 30)
        for k in range(int(width / dash) + 1):
            x0 = k * dash + rng.uniform(0, 2)
            d.rectangle((x0, mid - 1.5, x0 + dash * 0.55, mid + 1.5), fill=(235, 235, 225))
    return image, horizon
