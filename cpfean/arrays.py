"""One conversion to numpy for everything that crosses into files and metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_numpy"]


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """A numpy array of a numpy array, nested lists or a torch tensor on any device.

    bfloat16 tensors (no numpy dtype) are widened to float32 first. With ``dtype`` the result
    is C-contiguous and of that dtype (a copy only when needed); without, as it comes.
    """
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch here
        t = x.detach().cpu()
        x = (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
    return np.asarray(x) if dtype is None else np.ascontiguousarray(x, dtype=dtype)
