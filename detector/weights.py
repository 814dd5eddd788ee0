"""Third-party detector weights in pickle form -> a tensors-only `.pth`, once.

The bottom-up-attention weights the field uses are Detectron2/Caffe2 pickles
(`faster_rcnn_from_caffe.pkl`): a dict of numpy arrays. Unpickling runs whatever code a file
names, so runs never read them. `convert_pickle` reads one with an unpickler that can build
only numpy arrays, numpy scalars and plain containers (anything else stops it before it is
called), and writes the tensors with `torch.save`, which every later run reads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.fileio import atomic_path

__all__ = ["UnsafePickleError", "convert_pickle", "read_array_pickle"]

# (module, name) pairs the unpickler may build: numpy's array and scalar reconstructors under
# both of their module names (numpy 1 and 2), dtypes, and OrderedDict.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class UnsafePickleError(ValueError):
    """The pickle asks for something other than arrays and plain containers."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"it asks for {module}.{name}, which a weights file has no need "
            "of; refused without running it"
        )


def read_array_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a weights file, allowing only numpy arrays and plain containers."""
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="latin1").load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a readable weights pickle: {e}") from None


def _state_dict(data: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and the extra keys Detectron2's checkpointer reads, from the pickle's content
    (Detectron2 model-zoo format {"model": ..., "__author__": ...} or a Caffe2 blob dict)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dict of weights")
    extra: dict[str, Any] = {}
    if "model" in data and "__author__" in data:
        weights, extra["__author__"] = data["model"], str(data["__author__"])
    else:
        weights = data.get("blobs", data)
        weights = {k: v for k, v in weights.items() if not str(k).endswith("_momentum")}
        extra.update(__author__="Caffe2", matching_heuristics=True)
    if "matching_heuristics" in data:
        extra["matching_heuristics"] = bool(data["matching_heuristics"])
    tensors = {}
    for name, value in weights.items():
        if isinstance(value, (np.ndarray, np.generic)):
            tensors[str(name)] = torch.from_numpy(np.array(value, order="C"))  # keeps 0-d
        elif isinstance(value, torch.Tensor):
            tensors[str(name)] = value
    if not tensors:
        raise ValueError(f"{path} holds no arrays")
    return tensors, extra


def convert_pickle(
    src: str | os.PathLike, dst: str | os.PathLike, expected_sha256: str | None = None
) -> dict[str, Any]:
    """Convert a weights pickle to a tensors-only `.pth` (written atomically).

    Args:
        expected_sha256: refuse a source with another checksum, before unpickling it.
    Returns:
        {"source", "source_sha256", "output", "sha256", "tensors", "parameters"}.
    """
    from detector.extractor import file_sha256  # the one checksum function of the stage

    src, dst = Path(src), Path(dst)
    source_sha = file_sha256(src)
    if expected_sha256 and source_sha != expected_sha256.lower():
        raise ValueError(
            f"{src} has sha256 {source_sha}, not the expected {expected_sha256}; "
            "refusing to read it"
        )
    tensors, extra = _state_dict(read_array_pickle(src), src)
    with atomic_path(dst) as tmp:
        torch.save({"model": tensors, **extra}, tmp)
    return {
        "source": str(src),
        "source_sha256": source_sha,
        "output": str(dst),
        "sha256": file_sha256(dst),
        "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
    }
