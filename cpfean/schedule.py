"""The training schedule: one pure function of (epoch, step), read like a table.

    learning rate = base rate x 0.1 ** (decay epochs reached) x warm-up ramp
    warm-up ramp  = 0.01 + 0.99 x min(step, warm-up steps) / warm-up steps   (1 without warm-up)
    loss          = hinge over all in-batch negatives before `all_negatives_epochs`, then over
                    the hardest negative only (VSE++ / SCAN's hard-negative mining)

Nothing of it is state: a resumed run recomputes the same values from its epoch and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Phase", "schedule"]


@dataclass(frozen=True)
class Phase:
    lr_factor: float  # multiplies each parameter group's base learning rate
    hardest_negative: bool  # the loss takes the hardest in-batch negative only


def schedule(
    epoch: int,
    step: int,
    *,
    decay_epochs: Sequence[int] = (),
    warmup_steps: int = 0,
    all_negatives_epochs: int = 0,
) -> Phase:
    """The phase of training at 0-based ``epoch`` when ``step`` optimizer steps are done.

    Args:
        decay_epochs: epochs (counted from 1 as in the config) after which the rate drops x0.1.
        warmup_steps: steps of linear warm-up from 1% of the rate (0 = none).
        all_negatives_epochs: epochs summed over all negatives before hardest-negative mining.
    """
    factor = 0.1 ** sum(epoch >= e for e in decay_epochs)
    if warmup_steps > 0:
        factor *= 0.01 + 0.99 * min(step, warmup_steps) / warmup_steps
    return Phase(lr_factor=factor, hardest_negative=epoch >= all_negatives_epochs)
