"""The training schedule, read like a table."""

import pytest

from cpfean.schedule import schedule

# (epoch, steps done) -> (learning-rate factor, hardest negative), for decay after epochs 3 and
# 5, a 10-step warm-up and 2 epochs over all negatives
TABLE = [
    ((0, 0), (0.01, False)),
    ((0, 5), (0.01 + 0.99 * 0.5, False)),
    ((1, 10), (1.0, False)),
    ((2, 11), (1.0, True)),
    ((2, 1000), (1.0, True)),
    ((3, 1000), (0.1, True)),
    ((4, 1000), (0.1, True)),
    ((5, 1000), (0.01, True)),
    ((9, 1000), (0.01, True)),
]


@pytest.mark.parametrize("at,want", TABLE)
def test_schedule_table(at, want):
    phase = schedule(*at, decay_epochs=[3, 5], warmup_steps=10, all_negatives_epochs=2)
    assert phase.lr_factor == pytest.approx(want[0], rel=1e-12)
    assert phase.hardest_negative is want[1]


def test_defaults_are_a_constant_rate_and_hardest_negatives():
    assert schedule(0, 0).lr_factor == 1.0 and schedule(0, 0).hardest_negative
    assert schedule(7, 123, decay_epochs=[8]).lr_factor == 1.0
    assert schedule(8, 123, decay_epochs=[8]).lr_factor == pytest.approx(0.1)
