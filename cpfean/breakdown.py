"""Retrieval metrics by kind of scene: how many objects the captions mention, and how many
objects of the scene no caption mentions (clutter).

Every query is ranked against the whole gallery, as in `cpfean.metrics`; a group's figures
average only over its queries (its images for image -> text, their captions for text ->
image), so groups of different sizes stay comparable with each other and with the whole set.
The scene facts come from the generated scenes' ``captions.json`` (``cpfean.scenes``): each
image's ``objects`` and each sentence's ``mentions`` (indices into them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpfean.metrics import (
    CAPTIONS_PER_IMAGE,
    RecallResult,
    _direction_metrics,
    _rsum,
    ranks_i2t,
    ranks_t2i,
)

MENTION_BUCKETS = ("1", "2", "3", "4+")
CLUTTER_BUCKETS = ("1 unmentioned", "2 unmentioned", "3+ unmentioned")


def scene_groups(captions_file: str | Path, image_ids: Sequence[str]) -> dict[str, list[str]]:
    """Two groupings of the images ``image_ids`` (in that order): ``mentioned`` ("1" .. "4+",
    the distinct objects their captions mention) and ``clutter`` (how many of the scene's
    objects no caption mentions: "0 unmentioned" .. "3+ unmentioned")."""
    try:
        data = json.loads(Path(captions_file).read_text(encoding="utf-8"))
        scenes = {
            "/".join(p for p in (im.get("filepath", ""), im["filename"]) if p): im
            for im in data["images"]
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{captions_file}: not a generated scenes' captions.json ({e})") from None
    mentioned, clutter = [], []
    for image_id in image_ids:
        scene = scenes.get(image_id)
        if scene is None or "objects" not in scene:
            raise ValueError(
                f"{captions_file} has no scene facts (objects, mentions) for image {image_id!r}; "
                "the breakdown needs captions written by pipelines.make_demo_data"
            )
        named = {m for s in scene["sentences"] for m in s.get("mentions", [])}
        mentioned.append(MENTION_BUCKETS[min(len(named), 4) - 1] if named else "0")
        unnamed = len(scene["objects"]) - len(named)
        clutter.append(CLUTTER_BUCKETS[min(unnamed, 3) - 1] if unnamed else "0 unmentioned")
    return {"mentioned": mentioned, "clutter": clutter}


class GroupResult(RecallResult):
    images: int


def metrics_by_group(sims: npt.ArrayLike, groups: Sequence[str]) -> dict[str, GroupResult]:
    """R@K, medr, meanr and rSum of each group of images (``groups[i]`` names image i's),
    every query ranked against the whole gallery; groups in sorted order."""
    i2t, t2i = ranks_i2t(sims).ranks, ranks_t2i(sims).ranks
    labels = np.asarray(groups)
    out: dict[str, GroupResult] = {}
    for group in sorted(set(groups)):
        images = np.flatnonzero(labels == group)
        captions = (CAPTIONS_PER_IMAGE * images[:, None] + np.arange(CAPTIONS_PER_IMAGE)).ravel()
        a, b = _direction_metrics(i2t[images]), _direction_metrics(t2i[captions])
        out[group] = GroupResult(i2t=a, t2i=b, rsum=_rsum(a, b), images=len(images))
    return out
