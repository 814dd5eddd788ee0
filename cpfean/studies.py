"""The rows a study trains, and the record it keeps of each.

A row is one set of switches over a shared config (`pipelines.ablate` trains them). A study's
finished row is also kept as a record: its held-out metrics, the rank of every held-out query
(ranks past R@10 stored as 11, as only R@1/5/10 count), its training cost and the detector its
sets were extracted with. From records alone the table, the plot and the paired bootstraps of
`pipelines.scaling_report` can be drawn again, and a record is small enough to commit: a study
that spans sittings keeps what it found when its run folders do not survive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cpfean.fileio import atomic_write
from cpfean.metrics import RECALL_KS, query_ranks
from cpfean.model.config import ModelConfig

ROWS: dict[str, tuple[str, list[str]]] = {
    "full": ("CPFEAN", []),
    "scan": (
        "SCAN-style baseline",
        [f"model.{k}={str(v).lower()}" for k, v in ModelConfig.SCAN_BASELINE.items()]
        + ["train.recurrence_weight=0"],
    ),
    "no_fusion": ("w/o cross-modal fusion", ["model.use_fusion=false"]),
    "no_prominence": (
        "w/o word prominence",
        ["model.use_prominence=false", "train.recurrence_weight=0"],
    ),
    "no_prominence_loss": ("w/o recurrence supervision", ["train.recurrence_weight=0"]),
    "prominence_loss": ("with recurrence supervision", ["train.recurrence_weight=1"]),
    "no_label_prior": ("w/o label prior", ["model.use_label_prior=false"]),
    "no_spatial": ("w/o spatial embedding", ["model.use_spatial=false"]),
    "no_gcn": ("w/o word GCN", ["model.use_gcn=false"]),
    "region_alignment": ("with region-to-word alignment", ["model.use_region_alignment=true"]),
    "no_transformer": ("w/o region Transformer", ["model.use_region_transformer=false"]),
    "transformer": ("with region Transformer", ["model.use_region_transformer=true"]),
    "all_regions": ("all regions per word (topk=0)", ["model.topk=0"]),
}
# The region Transformer as the field builds a relation layer that must not blur the regions,
# one change each from the shipped layer (pre-norm, residual branches from zero, dropout 0.1,
# one layer, the box embedding added before it as its position signal). Not in the default
# --rows: they are the scaling study's question about our layer (docs/scaling.md).
_TRANSFORMER = ["model.use_region_transformer=true"]
TRANSFORMER_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "transformer_post_norm": (
        "region Transformer, post-norm, default init",
        [*_TRANSFORMER, "model.region_norm_first=false", "model.region_zero_init=false"],
    ),
    "transformer_default_init": (
        "region Transformer, branches not from zero",
        [*_TRANSFORMER, "model.region_zero_init=false"],
    ),
    "transformer_no_dropout": (
        "region Transformer, no dropout",
        [*_TRANSFORMER, "model.dropout=0"],
    ),
    "transformer_two_layers": (
        "region Transformer, two layers",
        [*_TRANSFORMER, "model.region_layers=2"],
    ),
    "transformer_no_box": (
        "region Transformer, no box embedding",
        [*_TRANSFORMER, "model.use_spatial=false"],
    ),
    "transformer_centered": (
        "region Transformer, image-wide update removed",
        [*_TRANSFORMER, "model.center_region_context=true"],
    ),
}
DEFAULT_ROWS = list(ROWS)
ROWS.update(TRANSFORMER_VARIANTS)

RANK_CAP = max(RECALL_KS) + 1  # every rank past R@10 counts the same: a miss
RECORD_KEYS = ("variable", "size", "seed", "row", "heldout", "ranks", "cost", "detector")


def record_name(prefix: str, size: int, seed: int, row: str) -> str:
    """The record's file name: ``n800_s0_full.json`` (``r36_...`` by regions)."""
    return f"{prefix}{size}_s{seed}_{row}.json"


def make_record(
    variable: str,
    size: int,
    seed: int,
    row: str,
    heldout: dict,
    sims: np.ndarray,
    cost: dict[str, float],
    detector: str | None,
) -> dict:
    """The record of one finished row (see the module's docstring)."""
    i2t, t2i = (np.minimum(r, RANK_CAP).tolist() for r in query_ranks(sims))
    return {
        "variable": variable,
        "size": size,
        "seed": seed,
        "row": row,
        "heldout": {k: v for k, v in heldout.items() if k != "source"},
        "ranks": {"cap": RANK_CAP, "i2t": i2t, "t2i": t2i},
        "cost": cost,
        "detector": detector,
    }


def write_record(path: Path, record: dict) -> None:
    # one line: 6,000 small integers would be 6,000 lines indented
    atomic_write(path, json.dumps(record, separators=(",", ":")) + "\n")


def read_record(path: Path) -> dict:
    """A record, checked; ValueError naming the file and what is wrong."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable record ({exc})") from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"{path}: not a study record (no {', '.join(missing)})")
    if "rsum" not in record["heldout"] or not {"i2t", "t2i"} <= record["ranks"].keys():
        raise ValueError(f"{path}: a record without its held-out rSum or ranks")
    return record


def record_ranks(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """The record's (image -> text, text -> image) ranks, for `paired_bootstrap_ranks`."""
    return np.asarray(record["ranks"]["i2t"]), np.asarray(record["ranks"]["t2i"])
