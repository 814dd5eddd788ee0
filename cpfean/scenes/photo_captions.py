"""Captions for the photo set (`cpfean.scenes.photos`), written from its COCO annotations.

The photo set has boxes and categories only: no colours and no words for the photograph
behind the drawings. Its objects become `SceneObject`s without a colour (the wording the scenes
use for their drawings of real things), large when the box's longer side is at least
`LARGE_SIDE` of the image's shorter one; the large ones are salient and the others minor, the
largest salient when none is large. The unannotated clutter is never mentioned, as a scene's
background objects. The captions then come from `cpfean.scenes.templates.write_captions`, so
both data sets share one grammar and a model moved between them meets new pictures, not new
sentences. Splits: every tenth image of the photo set's train split is ``val``, the rest
``train``; its val split (drawings no training image uses) is ``test``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from cpfean.scenes.generate import karpathy_sentences
from cpfean.scenes.templates import SceneObject, write_captions

LARGE_SIDE = 0.3
CAPTIONS_PER_IMAGE = 5


def photo_objects(annotations: list[dict], names: dict[int, str], width: int, height: int):
    """The `SceneObject`s of one image's COCO annotations (sizes and roles as above)."""
    objects = []
    for ann in annotations:
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        size = "large" if max(w, h) >= LARGE_SIDE * min(width, height) else "small"
        role = "salient" if size == "large" else "minor"
        objects.append(SceneObject(names[ann["category_id"]], "", size, (x, y, w, h), role, w * h))
    if objects and not any(o.role == "salient" for o in objects):
        k = int(np.argmax([o.area for o in objects]))
        objects[k] = dataclasses.replace(objects[k], role="salient")
    return objects


def caption_photo_set(root: str | Path, seed: int = 0) -> dict[str, Any]:
    """The captions file (Karpathy layout plus the scenes' grounding keys) of the photo set in
    ``root``; image ``i`` of split ``s`` is captioned from ``default_rng([seed, s, i])``.

    Raises FileNotFoundError when an annotation file is missing and ValueError when one is
    not a photo set's COCO file or an image has no annotated object."""
    root = Path(root)
    images: list[dict] = []
    for k, split in enumerate(("train", "val")):
        path = root / f"instances_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (python -m pipelines.make_photo_set)")
        try:
            coco = json.loads(path.read_text(encoding="utf-8"))
            names = {c["id"]: c["name"] for c in coco["categories"]}
            per_image: dict[int, list[dict]] = {im["id"]: [] for im in coco["images"]}
            for ann in coco["annotations"]:
                per_image[ann["image_id"]].append(ann)
            scenes = [
                (im, photo_objects(per_image[im["id"]], names, im["width"], im["height"]))
                for im in coco["images"]
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a COCO detection file ({e!r:.80})") from None
        for i, (im, objects) in enumerate(scenes):
            if not objects:
                raise ValueError(f"{path}: image {im['file_name']!r} has no annotated object")
            rng = np.random.default_rng([seed, k, i])
            captions = write_captions(
                rng, objects, im["width"], im["height"], "photo", CAPTIONS_PER_IMAGE
            )
            imgid = len(images)
            sentences = karpathy_sentences(captions, imgid)
            images.append(
                {
                    "filepath": "",
                    "filename": im["file_name"],
                    "split": "test" if split == "val" else "val" if i % 10 == 9 else "train",
                    "imgid": imgid,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                    "width": im["width"],
                    "height": im["height"],
                    "background": "photo",
                    "objects": [dataclasses.asdict(o) | {"bbox": list(o.bbox)} for o in objects],
                }
            )
    return {"dataset": "cpfean_photos", "generator": {"seed": seed}, "images": images}
