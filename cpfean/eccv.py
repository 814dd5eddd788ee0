"""ECCV Caption and CxC: COCO 5K test retrieval scored against the positives that COCO's five
captions an image miss (Chun et al., ECCV 2022; Parekh et al., EACL 2021).

The ``eccv-caption`` package ships both annotations for the 25,000 captions of the Karpathy
COCO 5K test images and computes mAP@R, R-Precision and R@1 on ECCV Caption, and R@K on CxC.
It knows images by their COCO image id and captions by their COCO annotation id, so a test set
needs both: the image id is read from the image's file name (``COCO_val2014_000000179765.jpg``,
or the bare number a precomp import keeps), the caption id from COCO's own caption file
(``captions_val2014.json``), matching each caption's text within its image.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOP = 50  # retrieved items kept per query: more than the largest ECCV positive set (48)
METRICS = ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_r1", "cxc_r5", "cxc_r10")


@functools.lru_cache(maxsize=1)
def _metrics() -> Any:
    """The package's annotations, read once a process (checking ids and scoring both use them)."""
    with warnings.catch_warnings():  # "failed to import ujson": json does the same work
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics

    return Metrics()


def coco_image_id(image_id: str) -> int | None:
    """The COCO image id in an image id (the last number of its file name), or None."""
    found = re.findall(r"\d+", Path(image_id).stem)
    return int(found[-1]) if found else None


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def caption_ids(
    coco_ids: Sequence[int], captions: Sequence[Sequence[str]], annotations: str | Path
) -> list[list[int]]:
    """The COCO annotation id of every caption (``captions[i]`` of image ``coco_ids[i]``),
    matched by text within the image in COCO's caption file ``annotations``; ValueError
    naming how many captions it does not hold."""
    try:
        data = json.loads(Path(annotations).read_text(encoding="utf-8"))
        anns = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--coco-captions {annotations}: not a COCO caption file ({e})") from None
    by_image: dict[int, dict[str, list[int]]] = {}
    for ann in anns:
        texts = by_image.setdefault(int(ann["image_id"]), {})
        texts.setdefault(_norm(ann["caption"]), []).append(int(ann["id"]))
    out, missing = [], 0
    for image, group in zip(coco_ids, captions, strict=True):
        texts = {k: list(v) for k, v in by_image.get(image, {}).items()}
        ids = []
        for caption in group:
            free = texts.get(_norm(caption), [])
            if free:
                ids.append(free.pop(0))
            else:
                ids.append(-1)
                missing += 1
        out.append(ids)
    if missing:
        raise ValueError(
            f"{missing} of {sum(len(g) for g in captions)} captions are not in "
            f"--coco-captions {annotations} under their image (ECCV Caption knows captions by "
            "their COCO annotation id)"
        )
    return out


def check_known(coco_ids: Sequence[int | None], metric: Any = None) -> None:
    """ValueError unless the images are exactly the COCO 5K test images the package knows."""
    metric = metric or _metrics()
    known = set(metric.coco_gts["i2t"])
    unknown = sum(1 for i in coco_ids if i is None or i not in known)
    if unknown:
        raise ValueError(
            f"{unknown} of the {len(coco_ids)} test images are not COCO 5K test images that "
            "eccv-caption knows (it knows images by COCO image id, read from the file name)"
        )
    if len(set(coco_ids)) != len(known):
        raise ValueError(
            f"the ECCV protocol scores all {len(known)} COCO 5K test images; the test set has "
            f"{len(set(coco_ids))}"
        )


def _top(sims: np.ndarray, k: int) -> np.ndarray:
    """[rows, k] column indices of each row's k highest scores, best first (in blocks)."""
    k = min(k, sims.shape[1])
    out = np.empty((sims.shape[0], k), np.int64)
    for s in range(0, len(sims), 1024):
        block = np.asarray(sims[s : s + 1024], dtype=np.float32)
        part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(block, part, 1), axis=1, kind="stable")
        out[s : s + len(block)] = np.take_along_axis(part, order, 1)
    return out


def eccv_metrics(
    sims: np.ndarray, coco_ids: Sequence[int], cap_ids: Sequence[int], metric: Any = None
) -> dict[str, dict[str, float]]:
    """ECCV mAP@R, R-Precision and R@1, CxC R@1/5/10, each way, in percent.

    Args:
        sims: [images, captions] similarities, higher = more similar.
        coco_ids: [images] COCO image ids; cap_ids: [captions] COCO annotation ids.
    """
    metric = metric or _metrics()
    check_known(coco_ids, metric)
    images, captions = np.asarray(coco_ids), np.asarray(cap_ids)
    i2t = {int(i): captions[row].tolist() for i, row in zip(images, _top(sims, TOP), strict=True)}
    t2i = {int(c): images[row].tolist() for c, row in zip(captions, _top(sims.T, TOP), strict=True)}
    missing = set(metric.coco_gts["t2i"]) - set(t2i)
    if missing:
        raise ValueError(
            f"{len(missing)} captions of the COCO 5K test images are not in the test set "
            "(ECCV Caption and CxC query with every one)"
        )
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
        warnings.simplefilter("ignore")
        scores = metric.compute_all_metrics(
            i2t,
            t2i,
            target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "cxc_recalls"),
            Ks=(1, 5, 10),
            verbose=False,
        )
    return {
        name: {d: round(100 * float(scores[name][d]), 4) for d in ("i2t", "t2i")}
        for name in METRICS
    }


def eccv_ids(caps: Any, annotations: str | Path) -> tuple[list[int], list[int]]:
    """COCO image ids of the test images and COCO annotation ids of their captions, in the
    order the similarity matrix has them; ValueError naming what does not match."""
    coco_ids = [coco_image_id(i) for i in caps.image_ids]
    check_known(coco_ids)
    per_image = [group[:5] for group in caps.captions]  # the matrix scores five an image
    flat = [c for ids in caption_ids(coco_ids, per_image, annotations) for c in ids]
    return coco_ids, flat


def format_eccv(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """The ECCV Caption and CxC metrics, one row per model."""
    heads = ["mAP@R", "R-P", "R@1", "CxC R@1", "R@5", "R@10"]
    width = max(len("ECCV / CxC"), *(len(n) for n in rows))
    lines = [
        f"{'ECCV / CxC':<{width}} | {'image -> text':^47} | {'text -> image':^47}",
        f"{'':<{width}} | "
        + " ".join(f"{h:>7}" for h in heads)
        + " | "
        + " ".join(f"{h:>7}" for h in heads),
    ]
    for name, m in rows.items():
        cells = [" ".join(f"{m[k][d]:7.1f}" for k in METRICS) for d in ("i2t", "t2i")]
        lines.append(f"{name:<{width}} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)
