"""A detection set on real photographs, built offline from Debian's packages.

Each image is a crop of a photograph (the wallpapers of ``mate-backgrounds`` and
``plasma-workspace-wallpapers`` that are photographs) with 2-5 drawings of real things cut out
of ``openclipart-png`` pasted on it (their alpha channel is the cut), each annotated with its
box and one of `CATEGORIES`, plus up to two unannotated drawings of other things as clutter.
A fifth of each category's drawings is kept for the val split, so validation measures objects
the detector has never seen, on crops of the same photographs.

Layout of ``generate_photo_set(out, ...)``: ``images/{split}_000123.jpg``,
``instances_{train,val}.json`` (COCO), and ``SOURCES.json``: every photograph and drawing used,
with its package, author and licence. Everything about image ``i`` of a split is drawn from
``numpy.random.default_rng([seed, split, i])``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cpfean.fileio import atomic_output, atomic_write_json
from cpfean.scenes.templates import overlap

__all__ = [
    "CATEGORIES",
    "PHOTOGRAPHS",
    "MissingPackageError",
    "catalogue",
    "generate_photo_set",
    "make_photo_scene",
]

CLIPART_ROOT = Path("/usr/share/openclipart/png")
CLIPART_LICENCE = "public domain (Creative Commons Public Domain Dedication; openclipart-png)"

# category -> (folders under CLIPART_ROOT, file-name pattern to keep, pattern to drop)
CATEGORIES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "dog": (("animals/mammals/dogs", "animals/mammals"), r"dog|beagle|lab_|bulldog|bobi", r"hot"),
    "cat": (("animals/mammals/housecats", "animals/mammals"), r"cat|gatt|kitten", r"big_cat"),
    "horse": (("animals/mammals/horses",), r".", r"mechorse"),
    "bird": (("animals/birds",), r".", r"^$"),
    "fish": (("animals/fish",), r".", r"^$"),
    "bear": (("animals/mammals/bears",), r".", r"^$"),
    "car": (
        ("transportation/vehicles", "transportation/vehicles/hummers"),
        r"car|chevrolet|autos|blazer|skoda|shelby|hummer|4wd",
        r"blueprint|cartoon",
    ),
    "truck": (("transportation/vehicles",), r"truck|bus\d?_|bus_01|ambulans|trattore", r"symbol"),
    "airplane": (("transportation/vehicles",), r"aircraft|airplane|plane", r"toy_paper"),
    "boat": (("transportation/boating",), r".", r"^$"),
    "tree": (("plants/trees", "plants/trees/evergreen"), r".", r"^$"),
    "flower": (("plants/flowers",), r".", r"^$"),
    "fruit": (("food/fruit",), r".", r"^$"),
    "house": (("buildings/homes",), r".", r"^$"),
    "book": (("education/books",), r".", r"^$"),
    "clock": (("signs_and_symbols/clocks",), r".", r"^$"),
}
CLUTTER_FOLDERS = ("food/desserts", "recreation/toys", "office", "tools", "electronics")

_MATE = ("/usr/share/backgrounds/mate/nature", "mate-backgrounds", "GPL-2+")
_KDE = "/usr/share/wallpapers/{}/contents/images/{}"
# (path, Debian package, author, licence); the photographs among the packages' wallpapers
PHOTOGRAPHS: tuple[tuple[str, str, str, str], ...] = (
    *(
        (f"{_MATE[0]}/{name}.jpg", _MATE[1], author, _MATE[2])
        for name, author in (
            ("Aqua", "Charles Barbin"),
            ("Blinds", "Lennart Poettering, Andrea Cimitan"),
            ("Dune", "Marco Cogoni, Hylke Bons"),
            ("FreshFlower", "Jens Ansorg"),
            ("Garden", "Charles Barbin"),
            ("GreenMeadow", "Timothy Schellhase, Lapo Calamandrei"),
            ("LadyBird", "Charles Barbin"),
            ("RainDrops", "blackcombwhistler07"),
            ("Storm", "see /usr/share/doc/mate-backgrounds/copyright"),
            ("TwoWings", "see /usr/share/doc/mate-backgrounds/copyright"),
            ("Wood", "see /usr/share/doc/mate-backgrounds/copyright"),
            ("YellowFlower", "Charles Barbin"),
        )
    ),
    *(
        (_KDE.format(name, size), "plasma-workspace-wallpapers", author, licence)
        for name, size, author, licence in (
            ("BytheWater", "1280x800.jpg", "Maciej Wiklo", "LGPL-3"),
            ("ColdRipple", "1280x800.jpg", "Risto Saukonpää", "LGPL-3"),
            ("DarkestHour", "1280x800.jpg", "Risto Saukonpää", "LGPL-3"),
            ("EveningGlow", "1280x800.jpg", "Ian Hex", "LGPL-3"),
            ("FallenLeaf", "1280x800.jpg", "Martin Klapetek", "LGPL-3"),
            ("Kite", "1280x800.jpg", "Risto Saukonpää", "LGPL-3"),
            ("OneStandsOut", "1280x800.jpg", "Risto Saukonpää", "LGPL-3"),
            ("Path", "1280x800.jpg", "Risto Saukonpää", "LGPL-3"),
            ("Volna", "5120x2880.jpg", "Nikita Babin", "CC-BY-SA-4.0"),
            ("summer_1am", "1280x800.jpg", "Risto Saukonpää", "LGPL-3"),
        )
    ),
)
PACKAGES = ("openclipart-png", "mate-backgrounds", "plasma-workspace-wallpapers")
_VAL_EVERY = 5  # every fifth drawing of a category (in name order) is kept for val
_MAX_OVERLAP = 0.15  # intersection / smaller box allowed between two annotated objects
_MAX_DRAWING_PIXELS = 4_000_000  # a few drawings are posters of 10^8 pixels: left out


class MissingPackageError(FileNotFoundError):
    """The Debian package holding the drawings or the photographs is not installed."""


def _missing(path: Path, package: str) -> MissingPackageError:
    return MissingPackageError(
        f"{path} not found: the photo set needs Debian's {package} "
        f"(apt-get install {' '.join(PACKAGES)})"
    )


def _small(path: Path) -> bool:
    with warnings.catch_warnings():  # Pillow warns about the posters on opening them
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:  # reads the header only
            return im.width * im.height <= _MAX_DRAWING_PIXELS


@lru_cache(maxsize=1)
def catalogue() -> dict[str, dict[str, tuple[Path, ...]]]:
    """{split: {category: drawings}} for "train" and "val", and {"clutter": {"": drawings}}."""
    if not CLIPART_ROOT.is_dir():
        raise _missing(CLIPART_ROOT, "openclipart-png")
    out: dict[str, dict[str, tuple[Path, ...]]] = {"train": {}, "val": {}}
    for name, (folders, keep, drop) in CATEGORIES.items():
        files = sorted(
            {
                p
                for folder in folders
                for p in (CLIPART_ROOT / folder).glob("*.png")
                if re.search(keep, p.name) and not re.search(drop, p.name) and _small(p)
            }
        )
        if len(files) < 2:
            raise ValueError(f"openclipart-png has fewer than 2 drawings for {name!r}")
        val = files[_VAL_EVERY - 1 :: _VAL_EVERY] or files[-1:]
        out["val"][name] = tuple(val)
        out["train"][name] = tuple(p for p in files if p not in val)
    clutter = sorted(
        p for f in CLUTTER_FOLDERS for p in (CLIPART_ROOT / f).glob("*.png") if _small(p)
    )
    out["clutter"] = {"": tuple(clutter)}
    return out


@lru_cache(maxsize=64)
def _photo(path: str) -> Image.Image:
    """A photograph, shrunk once so that its shorter side is 600 pixels."""
    if not Path(path).is_file():
        package = next(p[1] for p in PHOTOGRAPHS if p[0] == path)
        raise _missing(Path(path), package)
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = 600 / min(im.size)
        return im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)


@lru_cache(maxsize=1024)
def drawing(path: Path) -> Image.Image:
    """A drawing as RGBA, cropped to its opaque pixels."""
    with Image.open(path) as im:
        im = im.convert("RGBA")
    box = im.getchannel("A").point(lambda a: 255 if a > 32 else 0).getbbox()
    return im.crop(box) if box else im


@dataclass(frozen=True)
class PhotoObject:
    category: str
    drawing: str  # path of the openclipart file
    bbox: tuple[int, int, int, int]  # x, y, w, h of its opaque pixels in the image


def _paste(
    rng: np.random.Generator, canvas: Image.Image, path: Path, side: float
) -> tuple[Image.Image, int, int] | None:
    """The drawing scaled so that its longer side is ``side``, maybe mirrored; a place for it."""
    art = drawing(path)
    scale = side / max(art.size)
    w, h = max(4, round(art.width * scale)), max(4, round(art.height * scale))
    if w >= canvas.width or h >= canvas.height:
        return None
    art = art.resize((w, h), Image.LANCZOS)
    if rng.random() < 0.5:
        art = art.transpose(Image.FLIP_LEFT_RIGHT)
    x, y = int(rng.integers(0, canvas.width - w + 1)), int(rng.integers(0, canvas.height - h + 1))
    return art, x, y


def make_photo_scene(
    seed: int, split: str, index: int, width: int = 320, height: int = 240
) -> tuple[Image.Image, list[PhotoObject]]:
    """Image ``index`` of ``split``: a photograph crop with annotated drawings on it."""
    rng = np.random.default_rng([seed, ("train", "val").index(split), index])
    drawings = catalogue()
    photo = _photo(PHOTOGRAPHS[int(rng.integers(len(PHOTOGRAPHS)))][0])
    crop_w = int(min(photo.width, photo.height * width / height) * rng.uniform(0.5, 1.0))
    crop_h = round(crop_w * height / width)
    x0 = int(rng.integers(0, photo.width - crop_w + 1))
    y0 = int(rng.integers(0, photo.height - crop_h + 1))
    canvas = photo.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize((width, height), Image.BICUBIC)
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.FLIP_LEFT_RIGHT)
    canvas = canvas.convert("RGBA")
    clutter = drawings["clutter"][""]
    for _ in range(int(rng.integers(0, 3))):  # unannotated things, small
        placed = _paste(rng, canvas, clutter[int(rng.integers(len(clutter)))], height * 0.12)
        if placed:
            canvas.alpha_composite(placed[0], (placed[1], placed[2]))
    names = list(CATEGORIES)
    objects: list[PhotoObject] = []
    for _ in range(int(rng.integers(2, 6))):
        category = names[int(rng.integers(len(names)))]
        files = drawings[split][category]
        path = files[int(rng.integers(len(files)))]
        for _attempt in range(20):
            placed = _paste(rng, canvas, path, min(width, height) * rng.uniform(0.2, 0.55))
            if placed is None:
                continue
            art, x, y = placed
            box = (x, y, art.width, art.height)
            if all(overlap(box, o.bbox) <= _MAX_OVERLAP for o in objects):
                canvas.alpha_composite(art, (x, y))
                objects.append(PhotoObject(category, str(path), box))
                break
    return canvas.convert("RGB"), objects


def _instances(split: str, scenes: list[tuple[str, list[PhotoObject]]], size) -> dict:
    names = list(CATEGORIES)
    images, annotations = [], []
    for i, (file_name, objects) in enumerate(scenes):
        images.append({"id": i, "file_name": file_name, "width": size[0], "height": size[1]})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "bbox": list(obj.bbox),
                    "category_id": names.index(obj.category) + 1,
                    "area": obj.bbox[2] * obj.bbox[3],
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"cpfean photo detection set, {split} split"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(names)],
    }


_SET_ENTRIES = {
    "images",
    "instances_train.json",
    "instances_val.json",
    "SOURCES.json",
    "captions.json",
}


def check_replaceable(out: Path) -> None:
    """Raise ValueError unless ``out`` is absent, empty, or a photo set this code wrote (or
    began): a build never overwrites a user's own annotations or files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder for the photo set")
    entries = {p.name for p in out.iterdir()}
    foreign = sorted(entries - _SET_ENTRIES)
    unowned = entries & {"instances_train.json", "instances_val.json"} and (
        "SOURCES.json" not in entries
    )
    if foreign or unowned:
        what = f"holds {foreign[0]!r}" if foreign else "has annotations but no SOURCES.json"
        raise ValueError(
            f"{out} is not a photo set made by this command ({what}); choose another OUT"
        )


def generate_photo_set(
    out_dir: str | Path,
    *,
    train: int,
    val: int,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
) -> dict[str, Any]:
    """Write the set (layout in the module docstring); returns SOURCES.json's content."""
    catalogue()  # a missing package is one error before anything is written
    out = Path(out_dir)
    check_replaceable(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    instances = {}
    for split, count in (("train", train), ("val", val)):
        scenes = []
        for i in range(count):
            image, objects = make_photo_scene(seed, split, i, width, height)
            name = f"{split}_{i:06d}.jpg"
            with atomic_output(out / "images" / name, "wb") as f:
                image.save(f, format="JPEG", quality=90)
            scenes.append((name, objects))
            used.update(o.drawing for o in objects)
        instances[split] = _instances(split, scenes, (width, height))
    # the annotations only once every image is on disk, so a stopped run leaves images alone
    for split, content in instances.items():
        atomic_write_json(out / f"instances_{split}.json", content)
    sources = {
        "photographs": [
            {"file": p, "package": pkg, "author": a, "licence": lic}
            for p, pkg, a, lic in PHOTOGRAPHS
        ],
        "drawings": {
            "package": "openclipart-png",
            "licence": CLIPART_LICENCE,
            "files": sorted(used),
        },
        "seed": seed,
        "size": [width, height],
    }
    atomic_write_json(out / "SOURCES.json", sources, indent=1)
    return sources
