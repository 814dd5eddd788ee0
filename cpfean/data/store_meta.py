"""A region store's ``__meta__``: what the writer fills in, what a reader requires, and the
keys on which a reopening writer or a merge must agree with the store."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cpfean.data.region_record import (
    MAX_NUM_REGIONS,
    META_KEY,
    NUM_REGIONS,
    SCHEMA_VERSION,
    RegionRecord,
    RegionStoreError,
)

# Meta keys that must agree between a store and a writer reopening it (or stores being merged).
_IDENTITY_KEYS = (
    "schema_version",
    "num_regions",
    "feature_dim",
    "feature_dtype",
    "label_names",
    "detector",
    "thresholds",
    "has_boxes",
    "has_labels",
)


def _check_compatible(stored: dict, given: dict, where: str) -> None:
    """Raise RegionStoreError naming the first identity meta key on which the two differ."""
    for key in _IDENTITY_KEYS:
        a, b = stored.get(key), given.get(key)
        if a == b:
            continue
        name = key
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            name, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            name, a, b = f"{key}[{i}]", a[i], b[i]
        raise RegionStoreError(
            f"{where}: meta key {name!r} differs: stored {repr(a)[:80]}, given {repr(b)[:80]}"
        )


def _check_fits(image_id: str, record: RegionRecord, meta: dict) -> None:
    """Raise RegionStoreError unless the record's dims and labels fit the store's meta."""
    got = [record.num_regions, record.feature_dim]
    want = [meta["num_regions"], meta["feature_dim"]]
    top, lo, hi = len(meta["label_names"]) or 2**31, record.labels.min(), record.labels.max()
    if got != want or lo < -1 or hi >= top:
        raise RegionStoreError(
            f"region record {image_id!r} does not fit the store: [regions, "
            f"dim] {got} vs {want}, labels {lo}..{hi} vs [-1, {top})"
        )


def _normalise_meta(meta: dict) -> dict:
    """The caller's meta, validated, with the writer-owned keys filled in (JSON-normalised)."""
    dim, names = meta.get("feature_dim"), meta.get("label_names")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise RegionStoreError(f"meta 'feature_dim' must be a positive int, got {dim!r}")
    if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
        raise RegionStoreError(f"meta 'label_names' must be a list of str, got {names!r:.80}")
    slots = meta.get("num_regions", NUM_REGIONS)
    if (
        isinstance(slots, bool)
        or not isinstance(slots, (int, np.integer))
        or not 0 < slots <= MAX_NUM_REGIONS
    ):
        raise RegionStoreError(
            f"meta 'num_regions' must be an int in 1..{MAX_NUM_REGIONS}, got {slots!r}"
        )
    fixed = {"schema_version": SCHEMA_VERSION, "feature_dtype": "float16"}
    for key, want in fixed.items():
        if key in meta and meta[key] != want:
            raise RegionStoreError(f"meta {key!r} is {meta[key]!r}, this writer writes {want!r}")
    out = {"detector": {}, "thresholds": {}, "has_boxes": True, "has_labels": bool(names)}
    out.update(meta)
    out.update(
        fixed,
        num_regions=int(slots),
        feature_dim=int(dim),
        label_names=list(names),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        return json.loads(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise RegionStoreError(f"region store meta must be plain JSON: {e}") from e


def _parse_meta(raw: Any, path: Path) -> dict:
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RegionStoreError(f"region store {path}: {META_KEY} is not valid JSON: {e}") from e
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION or not {"feature_dim", "num_regions", "label_names"} <= set(meta):
        raise RegionStoreError(
            f"region store {path}: {META_KEY} has schema version {version!r} "
            f"(this code reads {SCHEMA_VERSION}) or lacks required keys"
        )
    return meta
