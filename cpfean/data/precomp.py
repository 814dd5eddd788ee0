"""The published precomputed features (SCAN / VSE-infinity ``f30k_precomp``, ``coco_precomp``)
as one region store and one caption file: the reader behind ``pipelines.import_precomp``.

Per split, ``DIR/{split}_ims.npy`` ([rows, R, D], memory-mapped; R is 36 in the published
files), ``DIR/{split}_caps.txt``
(one caption per line) and, when present, ``DIR/{split}_ids.txt`` (one image id per line).
SCAN's rule for rows: 5 captions per row -> one row per image; as many rows as captions -> five
consecutive rows per image (image k is row 5k). The features carry no boxes, labels or image
sizes; the store's meta says so (``has_boxes``, ``has_labels`` false).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpfean.data.region_record import MAX_NUM_REGIONS
from cpfean.data.region_store import RegionRecord, RegionStoreError, RegionWriter
from cpfean.fileio import atomic_output
from cpfean.progress import progress as progress_of

__all__ = ["PrecompSplit", "import_precomp", "karpathy_id_map", "present_splits", "read_split"]

PUBLISHED_SPLITS = ("train", "dev", "test", "testall")
CAPTIONS_PER_IMAGE = 5


@dataclass
class PrecompSplit:
    """One published split: features [rows, R, D] (memory map), captions (5 per image),
    image ids [n_images], and the feature row of each image."""

    name: str
    ims: np.ndarray
    captions: list[str]
    ids: list[str]
    rows: list[int]


def _lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r").strip() for line in f]


def karpathy_id_map(path: Path) -> dict[str, str]:
    """Raw published id (COCO ``cocoid``, Flickr30K photo id = file name stem) -> the Karpathy
    image id (``filepath/filename``, or ``filename``)."""
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--karpathy {path}: not a Karpathy split JSON ({e})") from None
    out = {}
    for img in images:
        name = "/".join(p for p in (img.get("filepath", ""), img["filename"]) if p)
        out[Path(img["filename"]).stem] = name
        if "cocoid" in img:
            out[str(img["cocoid"])] = name
    return out


def read_split(src: Path, split: str, id_map: dict[str, str] | None = None) -> PrecompSplit:
    """Read and check one split (see the module docstring for the rules)."""
    ims_path, caps_path, ids_path = (
        src / f"{split}_ims.npy",
        src / f"{split}_caps.txt",
        src / f"{split}_ids.txt",
    )
    for path in (ims_path, caps_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found (SCAN precomp layout: {{split}}_ims.npy and {{split}}_caps.txt)"
            )
    try:
        ims = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{ims_path}: not a numeric .npy array ({e})") from None
    if ims.ndim != 3 or not 0 < ims.shape[1] <= MAX_NUM_REGIONS or ims.shape[2] < 1:
        raise ValueError(
            f"{ims_path}: expected shape [N, R, D] with R <= {MAX_NUM_REGIONS}, got {ims.shape}"
        )
    if not np.issubdtype(ims.dtype, np.floating):
        raise ValueError(f"{ims_path}: expected float features, got {ims.dtype}")
    captions = _lines(caps_path)
    n_rows, n_caps = ims.shape[0], len(captions)
    if n_caps == CAPTIONS_PER_IMAGE * n_rows:
        per_row = False
    elif n_caps == n_rows and n_rows % CAPTIONS_PER_IMAGE == 0:
        per_row = True  # one row per caption: five rows per image
    else:
        raise ValueError(
            f"{caps_path}: {n_caps} captions for {n_rows} feature rows in "
            f"{ims_path.name}; expected 5 per row ({5 * n_rows}) or one per row "
            f"({n_rows}, a multiple of 5)"
        )
    if empty := [j for j, c in enumerate(captions) if not c]:
        raise ValueError(f"{caps_path}: line {empty[0] + 1} is an empty caption")
    n_images = n_caps // CAPTIONS_PER_IMAGE
    rows = [CAPTIONS_PER_IMAGE * k if per_row else k for k in range(n_images)]
    if ids_path.is_file():
        raw = _lines(ids_path)
        if len(raw) == n_images:
            ids = raw
        elif per_row and len(raw) == n_rows:
            ids = raw[::CAPTIONS_PER_IMAGE]
            bad = next((j for j in range(n_rows) if raw[j] != ids[j // CAPTIONS_PER_IMAGE]), None)
            if bad is not None:
                raise ValueError(
                    f"{ids_path}: line {bad + 1} names {raw[bad]!r} inside the "
                    f"five rows of image {ids[bad // 5]!r}"
                )
        else:
            raise ValueError(
                f"{ids_path}: {len(raw)} ids for {n_images} images ({n_rows} rows "
                f"in {ims_path.name}, {n_caps} captions)"
            )
        if id_map is not None:
            missing = [i for i in ids if i not in id_map]
            if missing:
                raise ValueError(
                    f"{ids_path}: {len(missing)} ids are not in the Karpathy JSON "
                    f"(first: {missing[0]!r})"
                )
            ids = [id_map[i] for i in ids]
    else:
        ids = [f"{split}/{k:06d}" for k in range(n_images)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{ids_path}: an image id is listed twice")
    return PrecompSplit(split, ims, captions, ids, rows)


def present_splits(src: Path) -> list[str]:
    """The splits with a features file in ``src``, published ones first, in their order."""
    if not src.is_dir():
        raise FileNotFoundError(f"precomp folder not found: {src}")
    found = sorted(p.name[: -len("_ims.npy")] for p in src.glob("*_ims.npy"))
    ordered = [s for s in PUBLISHED_SPLITS if s in found] + [
        s for s in found if s not in PUBLISHED_SPLITS
    ]
    if not ordered:
        raise FileNotFoundError(f"{src} holds no {{split}}_ims.npy (SCAN precomp layout)")
    return ordered


def import_precomp(
    src: Path,
    splits: list[str],
    out: Path,
    captions_out: Path,
    *,
    karpathy: Path | None = None,
    commit_every: int = 64,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Import ``splits`` of the precomp folder ``src`` into one store and one caption file.

    Every split is read and checked before the store is opened. Returns, per split: images,
    captions, written (this run), present (already in the store).
    """
    id_map = karpathy_id_map(karpathy) if karpathy is not None else None
    parts = [read_split(src, s, id_map) for s in splits]
    shapes = {p.ims.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"{src}: the splits have different [regions, dim] {sorted(shapes)}")
    (slots, dim), *_ = shapes
    source = {
        "source": str(src.resolve()),
        "karpathy": str(karpathy.resolve()) if karpathy is not None else None,
    }
    meta = {
        "num_regions": int(slots),
        "feature_dim": int(dim),
        "label_names": [],
        "has_boxes": False,
        "has_labels": False,
        "detector": {"config": "precomputed", "weights_sha256": None},
        **source,
    }
    boxes = np.zeros((slots, 4), np.float32)
    labels = np.full(slots, -1, np.int64)
    scores = np.ones(slots, np.float32)
    counts: dict[str, dict[str, int]] = {}
    written_from: dict[str, tuple[PrecompSplit, int]] = {}  # id -> (split, row) this run
    with RegionWriter(out, meta, commit_every=commit_every) as writer:
        stored = writer.meta
        for key, value in source.items():
            if stored.get(key) != value:
                raise RegionStoreError(
                    f"{out} was imported from {stored.get(key)!r}, not "
                    f"{value!r}; choose another --out"
                )
        for part in parts:
            written = 0
            for k in progress_of(
                range(len(part.ids)), unit="img", desc=f"import {part.name}", enabled=progress
            ):
                image_id, row = part.ids[k], part.rows[k]
                if image_id in written_from:  # listed by an earlier split of this run
                    other, other_row = written_from[image_id]
                    if not np.array_equal(other.ims[other_row], part.ims[row]):
                        raise ValueError(
                            f"image {image_id!r} has different features in "
                            f"{other.name}_ims.npy and {part.name}_ims.npy"
                        )
                    continue
                if image_id in writer:
                    continue
                features = np.asarray(part.ims[row], dtype=np.float32)  # copied off the mmap
                writer.put(image_id, RegionRecord(features, boxes, labels, scores, (0, 0), slots))
                written_from[image_id] = (part, row)
                written += 1
            counts[part.name] = {
                "images": len(part.ids),
                "captions": len(part.captions),
                "written": written,
                "present": len(part.ids) - written,
            }
    with atomic_output(captions_out) as f:
        for part in parts:
            for j, caption in enumerate(part.captions):
                row = {
                    "image": part.ids[j // CAPTIONS_PER_IMAGE],
                    "caption": caption,
                    "split": part.name,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts
