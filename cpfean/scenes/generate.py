"""The bundled captioned-scene generator: synthetic images, grounded captions, detection boxes.

No real captioned image set is available offline, so the project makes its own. A scene takes
place in a setting (grass, sand, water, snow, a road, indoors: `cpfean.scenes.settings`) with
small unlabeled clutter marks and 3-6 objects from `CATEGORIES`: coloured shapes (`COLOURS`)
and drawings of real things (dogs, cats, horses, trucks, boats ...) from Debian's openclipart-png,
each small or large. The large objects are salient and named in almost every caption; some
small objects are never named (the non-significant fragments). Captions name the setting now
and then ("a dog on the grass").

Output layout of `generate_dataset(out_dir, ...)`:

- `out_dir/images/000123.jpg`: the images (index zero-padded to 6 digits).
- `out_dir/instances_{train,val,test}.json`: COCO detection annotations (boxes x, y, w, h).
- `out_dir/captions.json`: Karpathy split format, 5 captions per image, written last.

Image ids: the images root is `out_dir/images`. In `captions.json` every entry has
`filepath = ""`, so its image id is `filename`, which equals `file_name` in the instances files
(e.g. `"000123.jpg"`). Extra keys (ignored by standard readers): per image `objects` (category,
colour, size, bbox, area, role), `background`, `width`, `height`; per sentence `mentions`
(object indices it names) and `relations` (`[a, "left of", b]`: object a is left of object b).

Everything about image `i` is drawn from `numpy.random.default_rng([seed, i])`, so the output is
byte-identical for a seed whatever the number of workers, and a smaller run is a prefix of a
larger one.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cpfean.fileio import atomic_write, atomic_write_json
from cpfean.scenes.photos import catalogue
from cpfean.scenes.settings import EXCLUDED, LIKELY, SETTINGS, draw_setting
from cpfean.scenes.shapes import CATEGORIES, COLOURS, THINGS, draw_shape
from cpfean.scenes.templates import Caption, SceneObject, overlap, tokenize, write_captions

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "Scene",
    "SceneObject",
    "build_instances",
    "build_karpathy",
    "generate_dataset",
    "make_scene",
    "render_scene",
    "split_sizes",
]

# things that may be anywhere in the picture; the others stand on the ground
FLYING = frozenset({"bird", "airplane", "kite", "moon", "star"})
CAPTIONS_PER_IMAGE = 5
_MAX_OVERLAP = 0.08  # intersection / smaller box area allowed between two objects
_VERSION = 2  # 2: settings, and real things drawn from openclipart-png


@dataclass(frozen=True)
class Scene:
    """Everything known about one generated image except its pixels."""

    index: int  # position in the data set; also the COCO image id and Karpathy imgid
    file_name: str  # image path relative to the images root, e.g. "000123.jpg"
    width: int
    height: int
    background: str  # the setting, one of SETTINGS
    objects: tuple[SceneObject, ...]  # in drawing order (later ones on top)
    captions: tuple[Caption, ...]


def _clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Draw small unlabeled marks (dots, dashes, rings, crosses), at most ~10 px across."""
    d = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(int(rng.integers(6, 22))):
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind, s = int(rng.integers(4)), float(rng.uniform(1.5, 5))
        if kind == 0:
            d.ellipse((x - s / 2, y - s / 2, x + s / 2, y + s / 2), fill=c)
        elif kind == 1:
            a = rng.uniform(0, np.pi)
            d.line((x, y, x + 2 * s * np.cos(a), y + 2 * s * np.sin(a)), fill=c, width=1)
        elif kind == 2:
            d.ellipse((x - s, y - s, x + s, y + s), outline=c, width=1)
        else:
            d.line((x - s, y, x + s, y), fill=c, width=1)
            d.line((x, y - s, x, y + s), fill=c, width=1)


def _layout(
    rng: np.random.Generator, width: int, height: int, setting: str, horizon: int
) -> list[tuple[str, str, str, Image.Image, int, int]]:
    """Choose and place the objects: (category, colour, size, layer, x, y), large ones first.

    Categories are distinct within a scene, fit the setting (`EXCLUDED`) and favour the things
    it makes likely (`LIKELY`); things that stand on the ground have their feet below the
    horizon, flying ones go anywhere. An object that finds no place after 60 tries is dropped,
    and the whole layout is redrawn if fewer than 3 objects or no small one remain.
    """
    unit = min(width, height)
    allowed = [c for c in CATEGORIES if c not in EXCLUDED[setting]]
    weight = np.array([3.0 if c in LIKELY[setting] else 1.0 for c in allowed])
    while True:
        k = int(rng.integers(3, 7))
        picked = rng.choice(len(allowed), size=k, replace=False, p=weight / weight.sum())
        cats = [allowed[int(j)] for j in picked]
        n_large = 2 if rng.random() < 0.45 else 1
        placed: list[tuple[str, str, str, Image.Image, int, int]] = []
        for j, category in enumerate(cats):
            size = "large" if j < n_large else "small"
            side = unit * (rng.uniform(0.27, 0.36) if size == "large" else rng.uniform(0.1, 0.16))
            colour = "" if category in THINGS else list(COLOURS)[int(rng.integers(len(COLOURS)))]
            layer = draw_shape(category, side, colour, rng)
            lw, lh = layer.size
            low = 0 if category in FLYING else max(0, horizon + (height - horizon) // 8 - lh)
            if lw > width or lh > height or low > height - lh:
                continue
            for _ in range(60):
                x, y = int(rng.integers(0, width - lw + 1)), int(rng.integers(low, height - lh + 1))
                if all(
                    overlap((x, y, lw, lh), (p[4], p[5], *p[3].size)) <= _MAX_OVERLAP
                    for p in placed
                ):
                    placed.append((category, colour, size, layer, x, y))
                    break
        if len(placed) >= 3 and any(p[2] == "small" for p in placed):
            return placed


def make_scene(
    seed: int, index: int, width: int = 320, height: int = 240, ext: str = "jpg"
) -> tuple[Scene, Image.Image]:
    """Generate image `index` of the data set with seed `seed`.

    Returns:
        The scene description and the RGB image (width x height).
    """
    rng = np.random.default_rng([seed, index])
    background = SETTINGS[int(rng.integers(len(SETTINGS)))]
    image, horizon = draw_setting(rng, background, width, height)
    _clutter(rng, image)
    placed = _layout(rng, width, height, background, horizon)
    small = [i for i, p in enumerate(placed) if p[2] == "small"]
    n_bg = 1 if len(small) <= 2 else int(rng.integers(1, len(small)))
    hidden = {small[int(j)] for j in rng.choice(len(small), size=n_bg, replace=False)}
    objects = []
    for i, (category, colour, size, layer, x, y) in enumerate(placed):
        image.paste(layer, (x, y), layer)
        role = "salient" if size == "large" else "background" if i in hidden else "minor"
        area = int(np.count_nonzero(np.asarray(layer.getchannel("A"))))
        objects.append(SceneObject(category, colour, size, (x, y, *layer.size), role, area))
    captions = write_captions(rng, objects, width, height, background, CAPTIONS_PER_IMAGE)
    name = f"{index:06d}.{ext}"
    return Scene(index, name, width, height, background, tuple(objects), tuple(captions)), image


def split_sizes(num_images: int) -> dict[str, int]:
    """Images per split: ~80/10/10, at least one val and one test image (needs >= 3 images)."""
    if num_images < 3:
        raise ValueError(f"need at least 3 images for train/val/test splits, got {num_images}")
    n_held = max(1, round(0.1 * num_images))
    return {"train": num_images - 2 * n_held, "val": n_held, "test": n_held}


def _split_names(num_images: int) -> list[str]:
    sizes = split_sizes(num_images)
    return [name for name, n in sizes.items() for _ in range(n)]  # train, then val, then test


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def render_scene(task: tuple[int, int, int, int, str, str]) -> Scene:
    """Worker entry point: make scene `(seed, index, width, height, ext, images_dir)`, write its
    image (to a temporary name, then renamed) and return its description."""
    seed, index, width, height, ext, images_dir = task
    scene, image = make_scene(seed, index, width, height, ext)
    path = os.path.join(images_dir, scene.file_name)
    atomic_write(path, _encode(image, ext))
    return scene


def karpathy_sentences(captions: Sequence[Caption], imgid: int) -> list[dict]:
    """One image's captions as Karpathy sentences plus their grounding (mentions, relations);
    sentence ids count ``len(captions)`` per image."""
    n = len(captions)
    return [
        {
            "raw": c.raw,
            "tokens": tokenize(c.raw),
            "imgid": imgid,
            "sentid": imgid * n + k,
            "mentions": list(c.mentions),
            "relations": [list(r) for r in c.relations],
        }
        for k, c in enumerate(captions)
    ]


def build_karpathy(scenes: Sequence[Scene], meta: dict[str, Any] | None = None) -> dict:
    """The captions file (Karpathy split format plus grounding keys) for `scenes` in order."""
    splits = _split_names(len(scenes))
    images = []
    for scene, split in zip(scenes, splits, strict=True):
        i = scene.index
        sentences = karpathy_sentences(scene.captions, i)
        images.append(
            {
                "filepath": "",
                "filename": scene.file_name,
                "split": split,
                "imgid": i,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "width": scene.width,
                "height": scene.height,
                "background": scene.background,
                "objects": [asdict(o) | {"bbox": list(o.bbox)} for o in scene.objects],
            }
        )
    return {"dataset": "cpfean_scenes", "generator": meta or {}, "images": images}


def build_instances(scenes: Sequence[Scene], split: str) -> dict:
    """COCO detection annotations for the scenes of one split (category id = index + 1).

    Annotation ids are unique across splits (they count objects over the whole data set).
    """
    splits = _split_names(len(scenes))
    images, annotations = [], []
    ann_id = 0
    for scene, s in zip(scenes, splits, strict=True):
        for obj in scene.objects:
            ann_id += 1
            if s != split:
                continue
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": scene.index,
                    "bbox": list(obj.bbox),
                    "category_id": CATEGORIES.index(obj.category) + 1,
                    "area": obj.area,
                    "iscrowd": 0,
                }
            )
        if s == split:
            images.append(
                {
                    "id": scene.index,
                    "file_name": scene.file_name,
                    "height": scene.height,
                    "width": scene.width,
                }
            )
    categories = [
        {"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CATEGORIES)
    ]
    return {
        "info": {"description": f"cpfean scenes, {split} split"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, separators=(",", ":"))


def generate_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    *,
    width: int = 320,
    height: int = 240,
    workers: int = 1,
    ext: str = "jpg",
    on_image: Callable[[], None] | None = None,
) -> list[Scene]:
    """Write a captioned-scene data set to `out_dir` (layout in the module docstring).

    Stale `captions.json` / `instances_*.json` are removed first and rewritten only once every
    image is on disk (temporary name + rename, captions last), so a run that stops half way
    leaves no captions file.

    Args:
        out_dir: output directory (created if missing).
        num_images: number of images (>= 3).
        seed: data set seed.
        width, height: image size in pixels.
        workers: processes drawing images; 1 draws in this process.
        ext: "jpg" or "png".
        on_image: called once per finished image (progress bars).

    Returns:
        The scenes, in index order.
    """
    if ext not in ("jpg", "png"):
        raise ValueError(f"ext must be 'jpg' or 'png', got {ext!r}")
    if width < 64 or height < 64:
        raise ValueError(f"image size must be at least 64x64, got {width}x{height}")
    split_sizes(num_images)  # fail before drawing anything
    catalogue()  # the drawings of real things: a missing package is an error before any image
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in [out / "captions.json", *out.glob("instances_*.json")]:
        stale.unlink(missing_ok=True)
    tasks = [(seed, i, width, height, ext, str(images_dir)) for i in range(num_images)]
    scenes: list[Scene] = []
    if workers <= 1:
        for task in tasks:
            scenes.append(render_scene(task))
            if on_image:
                on_image()
    else:
        chunk = max(1, min(32, num_images // (workers * 8)))
        with multiprocessing.Pool(workers) as pool:
            for scene in pool.imap(render_scene, tasks, chunksize=chunk):
                scenes.append(scene)
                if on_image:
                    on_image()
    meta = {
        "seed": seed,
        "num_images": num_images,
        "width": width,
        "height": height,
        "version": _VERSION,
        "categories": list(CATEGORIES),
        "colours": list(COLOURS),
    }
    for split in ("train", "val", "test"):
        _write_json(out / f"instances_{split}.json", build_instances(scenes, split))
    _write_json(out / "captions.json", build_karpathy(scenes, meta))
    return scenes
