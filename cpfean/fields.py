"""Config fields that carry their allowed range, so a field and its bounds are written once.

    epochs: int = bounded(12, low=1)          # >= 1
    lr: float = bounded(2e-4, above=0)        # > 0
    dropout: float = bounded(0.1, low=0, below=1)

`cpfean.config.check_values` reads the bounds back from the dataclass fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["bounded", "bounds_of"]


def bounded(
    default: Any,
    *,
    low: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with a default and its range: ``>= low``, ``> above``, ``< below``."""
    return dataclasses.field(default=default, metadata={"low": low, "above": above, "below": below})


def bounds_of(field: dataclasses.Field) -> tuple[float | None, float | None, float | None]:
    """(low, above, below) of a field made by `bounded` (all None for any other field)."""
    meta = field.metadata
    return meta.get("low"), meta.get("above"), meta.get("below")
