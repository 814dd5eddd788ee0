"""metrics.paired_bootstrap: the rSum difference of two models on one set, with its interval."""

import numpy as np
import pytest

from cpfean.metrics import paired_bootstrap, paired_bootstrap_ranks, query_ranks, recall_metrics


def _perfect(n):
    """Each image scores 1 with its own five captions and 0 with the rest."""
    return np.kron(np.eye(n), np.ones((1, 5)))


def _wrong_on(sims, images):
    """A copy where each listed image i ranks the five captions of image i+1 above its own
    (i2t rank 6: R@1 and R@5 missed), and those captions rank image i above their own (t2i
    rank 2: R@1 missed)."""
    out = sims.copy()
    n = sims.shape[0]
    for i in images:
        j = (i + 1) % n
        out[i, 5 * j : 5 * j + 5] = 2.0
    return out


def test_identical_models_differ_by_exactly_nothing():
    sims = np.random.default_rng(0).standard_normal((20, 100))
    r = paired_bootstrap(sims, sims.copy(), resamples=200)
    assert r["diff"] == 0 and r["ci_low"] == r["ci_high"] == 0 and r["a_ahead"] == 0


def test_a_model_better_on_every_differing_image_is_ahead_in_every_resample_that_sees_one():
    n = 20
    a = _perfect(n)
    b = _wrong_on(a, range(n))  # B misses R@1 both ways on every image
    r = paired_bootstrap(a, b, resamples=500, seed=1)
    assert r["diff"] == pytest.approx(recall_metrics(a)["rsum"] - recall_metrics(b)["rsum"])
    assert r["rsum_a"] == 600 and r["diff"] > 0
    assert r["a_ahead"] == 1.0
    # every image contributes the same difference, so every resample reproduces it exactly
    assert r["ci_low"] == pytest.approx(r["diff"]) and r["ci_high"] == pytest.approx(r["diff"])


def test_interval_is_paired_and_brackets_the_whole_set_difference():
    n = 40
    a = _perfect(n)
    b = _wrong_on(a, [0, 10, 20, 30])  # B misses on 4 of 40 images
    r = paired_bootstrap(a, b, resamples=2000, seed=0)
    # per listed image: its i2t R@1 and R@5 (2 x 100/40) and the next image's five captions'
    # t2i R@1 (500/200)
    assert r["diff"] == pytest.approx(4 * (2 * 100 / 40 + 500 / 200))
    assert r["ci_low"] < r["diff"] < r["ci_high"]
    assert r["ci_low"] >= 0  # B is never better on any image, so no draw favours B
    assert 0.99 <= r["a_ahead"] <= 1.0  # only a draw missing all 8 affected images ties
    # the draw is seeded: the same call gives the same interval
    assert paired_bootstrap(a, b, resamples=2000, seed=0) == r


def test_mismatched_sets_and_bad_counts_are_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        paired_bootstrap(_perfect(4), _perfect(5))
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(_perfect(4), _perfect(4), resamples=0)


def test_ranks_clipped_past_ten_give_the_bootstrap_of_the_matrices():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((30, 150)), rng.standard_normal((30, 150))
    a[np.arange(30), 5 * np.arange(30)] += 2.5  # A finds most images' first caption
    whole = paired_bootstrap(a, b, resamples=300, seed=7)
    clipped = [tuple(np.minimum(r, 11) for r in query_ranks(m)) for m in (a, b)]
    assert max(r.max() for pair in map(query_ranks, (a, b)) for r in pair) > 11  # clipping bites
    assert paired_bootstrap_ranks(*clipped, resamples=300, seed=7) == whole
    assert whole["rsum_a"] == recall_metrics(a)["rsum"] and whole["diff"] > 0


def test_ranks_of_other_sets_or_not_ranks_are_errors():
    ok = query_ranks(_perfect(4))
    with pytest.raises(ValueError, match="different sets"):
        paired_bootstrap_ranks(ok, query_ranks(_perfect(5)))
    with pytest.raises(ValueError, match="5 captions an image"):
        paired_bootstrap_ranks(ok, (ok[0], ok[1][:-1]))
    with pytest.raises(ValueError, match="1-based"):
        paired_bootstrap_ranks(ok, (ok[0] - 1, ok[1]))
