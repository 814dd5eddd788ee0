"""Tiny files in exactly the layouts the field publishes, with learnable content.

- SCAN / VSE-infinity precomp folders: ``{split}_ims.npy`` [rows, 36, D] float32,
  ``{split}_caps.txt`` (five captions per image, in image order), ``{split}_ids.txt`` (one id
  per image). Flickr30K: ``train``/``dev``/``test``, one row per image, photo ids. COCO:
  ``train``/``dev``/``test``/``testall``, one row per caption (five per image) or per image,
  COCO image ids, ``test`` the first images of ``testall``.
- Karpathy ``dataset_flickr30k.json`` / ``dataset_coco.json`` (``filepath``, ``cocoid``,
  ``restval``) naming the same images.
- COCO ``captions_{train,val}2014.json`` annotations.
- Image files for the same scenes, for the extraction route.

An image holds two objects (category x colour); its region features are fixed random codes of
those plus noise, and its captions name them, so a model can learn to match them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ["ball", "box", "tree", "car", "cup", "star"]
COLOURS = ["red", "blue", "green", "yellow"]
RGB = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 180, 60),
    "yellow": (230, 210, 40),
}
TEMPLATES = [
    "a {c0} {o0} and a {c1} {o1}",
    "there is a {c0} {o0} near a {c1} {o1}",
    "a {c1} {o1} beside a {c0} {o0}",
    "the picture shows a {c0} {o0}",
    "a {c0} {o0} with a {c1} {o1} in the scene",
]


@dataclass
class Scene:
    raw_id: int  # Flickr30K photo id or COCO image id
    cats: tuple[int, int]
    cols: tuple[int, int]

    def captions(self) -> list[str]:
        words = {
            "o0": CATEGORIES[self.cats[0]],
            "c0": COLOURS[self.cols[0]],
            "o1": CATEGORIES[self.cats[1]],
            "c1": COLOURS[self.cols[1]],
        }
        return [t.format(**words) for t in TEMPLATES]


def make_scenes(n: int, seed: int, first_id: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [
        Scene(
            first_id + 7 * i,
            tuple(int(c) for c in rng.choice(len(CATEGORIES), 2, replace=False)),
            tuple(int(c) for c in rng.integers(0, len(COLOURS), 2)),
        )
        for i in range(n)
    ]


def features(scenes: list[Scene], dim: int) -> np.ndarray:
    """[n, 36, dim] float32: two object regions (category + colour codes), the rest noise;
    the same for a scene in every split that lists it."""
    codes = np.random.default_rng(1234)
    cat = codes.normal(size=(len(CATEGORIES), dim)).astype(np.float32)
    col = codes.normal(size=(len(COLOURS), dim)).astype(np.float32)
    out = np.empty((len(scenes), 36, dim), np.float32)
    for i, s in enumerate(scenes):
        out[i] = 0.3 * np.random.default_rng(s.raw_id).normal(size=(36, dim))
        for r in range(2):
            out[i, r] += cat[s.cats[r]] + col[s.cols[r]]
    return np.abs(out)  # BUTD features are post-ReLU


def write_precomp(
    folder: Path, splits: dict[str, list[Scene]], *, dim: int = 16, rows_per_caption: bool = False
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, scenes in splits.items():
        ims = features(scenes, dim)
        if rows_per_caption:
            ims = np.repeat(ims, 5, axis=0)
        np.save(folder / f"{split}_ims.npy", ims)
        caps = [c for s in scenes for c in s.captions()]
        (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
        (folder / f"{split}_ids.txt").write_text("".join(f"{s.raw_id}\n" for s in scenes))


def _sentences(scene: Scene, start: int, imgid: int) -> list[dict]:
    return [
        {"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": start + j}
        for j, c in enumerate(scene.captions())
    ]


def f30k_name(scene: Scene) -> str:
    return f"{scene.raw_id}.jpg"


def coco_path(scene: Scene, folder: str) -> tuple[str, str]:
    return folder, f"COCO_{folder}_{scene.raw_id:012d}.jpg"


def write_karpathy_f30k(path: Path, splits: dict[str, list[Scene]]) -> None:
    images, sent = [], 0
    for split, scenes in splits.items():
        for s in scenes:
            images.append(
                {
                    "sentids": list(range(sent, sent + 5)),
                    "imgid": len(images),
                    "sentences": _sentences(s, sent, len(images)),
                    "split": split,
                    "filename": f30k_name(s),
                }
            )
            sent += 5
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))


def write_karpathy_coco(path: Path, splits: dict[str, list[Scene]]) -> None:
    """``splits`` keyed by Karpathy split (train, restval, val, test); train images come from
    train2014, the others from val2014."""
    images, sent = [], 0
    for split, scenes in splits.items():
        folder = "train2014" if split == "train" else "val2014"
        for s in scenes:
            filepath, filename = coco_path(s, folder)
            images.append(
                {
                    "filepath": filepath,
                    "sentids": list(range(sent, sent + 5)),
                    "filename": filename,
                    "imgid": len(images),
                    "split": split,
                    "sentences": _sentences(s, sent, len(images)),
                    "cocoid": s.raw_id,
                }
            )
            sent += 5
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))


def write_coco_captions(path: Path, scenes: list[Scene], folder: str) -> None:
    images = [
        {
            "license": 1,
            "file_name": coco_path(s, folder)[1],
            "height": 64,
            "width": 96,
            "id": s.raw_id,
        }
        for s in scenes
    ]
    anns = [
        {"image_id": s.raw_id, "id": 10 * s.raw_id + j, "caption": c}
        for s in scenes
        for j, c in enumerate(s.captions())
    ]
    path.write_text(
        json.dumps({"info": {"description": "tiny"}, "images": images, "annotations": anns})
    )


def write_images(folder: Path, scenes: list[Scene], names: list[str]) -> None:
    """A JPEG per scene: its two objects as coloured shapes on grey (for extraction)."""
    for s, name in zip(scenes, names, strict=True):
        img = np.full((64, 96, 3), 128, np.uint8)
        for r in range(2):
            x = 8 + 44 * r + 4 * s.cats[r]
            img[16 : 16 + 24 + 2 * s.cats[r], x : x + 28] = RGB[COLOURS[s.cols[r]]]
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / name, quality=95)


def flickr30k(root: Path, dim: int = 16, sizes: tuple[int, int, int] = (24, 8, 8)) -> dict:
    """``root/f30k_precomp`` + ``root/dataset_flickr30k.json``; returns the scenes by split."""
    splits = {
        "train": make_scenes(sizes[0], 0, 1000092795),
        "dev": make_scenes(sizes[1], 1, 2000000000),
        "test": make_scenes(sizes[2], 2, 3000000000),
    }
    write_precomp(root / "f30k_precomp", splits, dim=dim)
    write_karpathy_f30k(
        root / "dataset_flickr30k.json",
        {"train": splits["train"], "val": splits["dev"], "test": splits["test"]},
    )
    return splits


def coco(root: Path, dim: int = 16, rows_per_caption: bool = True) -> dict:
    """``root/coco_precomp`` (train, dev, test = first half of testall, testall) +
    ``root/dataset_coco.json`` (train + restval, val, test) + ``captions_*2014.json``."""
    train, restval = make_scenes(14, 3, 9), make_scenes(6, 4, 500009)
    dev, testall = make_scenes(10, 5, 700001), make_scenes(10, 6, 800003)
    splits = {"train": train + restval, "dev": dev, "test": testall[:5], "testall": testall}
    write_precomp(root / "coco_precomp", splits, dim=dim, rows_per_caption=rows_per_caption)
    write_karpathy_coco(
        root / "dataset_coco.json",
        {"train": train, "restval": restval, "val": dev, "test": testall},
    )
    write_coco_captions(root / "captions_train2014.json", train, "train2014")
    write_coco_captions(root / "captions_val2014.json", restval + dev + testall, "val2014")
    return splits
