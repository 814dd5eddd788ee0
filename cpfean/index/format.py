"""The index format: names, errors, the embedding fields on disk and the first-stage vectors
(layout: ``cpfean.index``)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.arrays import as_numpy
from cpfean.fileio import atomic_path, atomic_write_json
from cpfean.first_stage import normalise

FORMAT = "cpfean-index"
VERSION = 1
# an index whose regions a codec keeps (cpfean.index.codec); a reader of version 1 only would
# find no regions in it, so it says so by its version
COMPRESSED_VERSION = 2
PRELOAD_MAX_BYTES = 2 << 30  # galleries up to this size (float32) stay in memory when served
# embedding fields renamed since indexes were first written: old files still load
RENAMED_FIELDS = {"gate_ctx": "gate_context"}


class IndexFormatError(ValueError):
    """An index is missing, incomplete, of an unknown format or built with another model."""


class IndexMismatchError(IndexFormatError):
    """The index was built with a different checkpoint than the one given."""


# ----------------------------------------------------------------------------------- helpers
def _fields(emb: Any) -> dict[str, torch.Tensor]:
    return {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str) -> type:
    """The embeddings dataclass recorded in index.json (only cpfean's or already imported)."""
    module, _, qualname = name.partition(":")
    if not (module.startswith("cpfean.") or module in sys.modules):
        raise IndexFormatError(
            f"index records embeddings class {name!r}, which is not part of cpfean"
        )
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        raise IndexFormatError(f"index records embeddings class {name!r}, which is not a dataclass")
    return obj


def _on_disk(t: torch.Tensor, dtype: str) -> np.ndarray:
    """An embedding field as stored: floats in the index's dtype, masks and ids as they are."""
    return as_numpy(t, dtype if t.is_floating_point() else None)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=1)


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    if not path.is_file():
        raise IndexFormatError(f"index file missing: {path} (rebuild the index)")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def pooled_images(emb: Any) -> np.ndarray:
    """First-stage vectors of images: [B, d] unit-norm mean of the valid region embeddings."""
    regions, mask = emb.regions.float(), emb.mask.to(emb.regions.device)
    m = mask[..., None].float()
    return normalise(((regions * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy())


def pooled_texts(emb: Any) -> np.ndarray:
    """First-stage vectors of captions: [C, d] unit-norm prominence-weighted mean of words."""
    words, mask = emb.words.float(), emb.mask.to(emb.words.device)
    w = emb.log_prominence.float().exp().nan_to_num(0.0) * mask
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    return normalise((words * w[..., None]).sum(1).cpu().numpy())
