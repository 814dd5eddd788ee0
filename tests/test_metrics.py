"""Tests for cpfean.metrics: hand-built matrices with known ranks, ties, the SCAN reference,
5-fold averaging, errors, ensembling and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpfean import metrics
from cpfean.metrics import (
    ensemble,
    evaluate_protocol,
    format_table,
    ranks_i2t,
    ranks_t2i,
    recall_metrics,
)

RECALL_KEYS = ("r1", "r5", "r10")


# --------------------------------------------------------------------------- references


def scan_i2t(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """SCAN's ``evaluation.i2t`` loop: 0-based ranks, top1 and (r1, r5, r10, medr, meanr)."""
    npts = sims.shape[0]
    ranks = np.zeros(npts)
    top1 = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5, 1):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
        top1[index] = inds[0]
    return ranks, top1, _scan_summary(ranks)


def scan_t2i(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """SCAN's ``evaluation.t2i`` loop: 0-based ranks, top1 and (r1, r5, r10, medr, meanr)."""
    npts = sims.shape[0]
    ranks = np.zeros(5 * npts)
    top1 = np.zeros(5 * npts)
    sims = sims.T
    for index in range(npts):
        for i in range(5):
            inds = np.argsort(sims[5 * index + i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
            top1[5 * index + i] = inds[0]
    return ranks, top1, _scan_summary(ranks)


def _scan_summary(ranks: np.ndarray) -> tuple[float, ...]:
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return (r1, r5, r10, medr, meanr)


def scan_rsum(res: metrics.RecallResult) -> float:
    """SCAN's ``r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]``, same order of float additions."""
    r, ri = res["i2t"], res["t2i"]
    return r["r1"] + r["r5"] + r["r10"] + ri["r1"] + ri["r5"] + ri["r10"]


def worst_case_ranks(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loop reference for the tie rule: sort each query's list with every tie broken against
    the model (matches after non-matches) and take the 1-based position of the first match."""
    n_images, n_captions = sims.shape
    i2t = np.zeros(n_images, dtype=np.int64)
    for image in range(n_images):
        is_match = np.arange(n_captions) // 5 == image
        order = np.lexsort((is_match, -sims[image]))  # by score desc, then non-matches first
        i2t[image] = 1 + np.flatnonzero(is_match[order])[0]
    t2i = np.zeros(n_captions, dtype=np.int64)
    for caption in range(n_captions):
        is_match = np.arange(n_images) == caption // 5
        order = np.lexsort((is_match, -sims[:, caption]))
        t2i[caption] = 1 + np.flatnonzero(is_match[order])[0]
    return i2t, t2i


# --------------------------------------------------------------------------- builders


def diagonal_sims(n_images: int, own: float = 1.0, other: float = 0.0) -> np.ndarray:
    """``[n, 5n]``: every image scores ``own`` with its captions and ``other`` elsewhere."""
    sims = np.full((n_images, 5 * n_images), other, dtype=np.float32)
    for image in range(n_images):
        sims[image, 5 * image : 5 * image + 5] = own
    return sims


def broken_fold(fold_size: int, n_bad: int) -> np.ndarray:
    """Diagonal block whose first ``n_bad`` images score their own captions lowest (-1)."""
    sims = diagonal_sims(fold_size)
    for image in range(n_bad):
        sims[image, 5 * image : 5 * image + 5] = -1.0
    return sims


# --------------------------------------------------------------------------- known ranks


def test_perfect_matrix_gives_rank_one_everywhere() -> None:
    sims = diagonal_sims(13)
    np.testing.assert_array_equal(ranks_i2t(sims).ranks, np.ones(13))
    np.testing.assert_array_equal(ranks_t2i(sims).ranks, np.ones(65))
    res = recall_metrics(sims)
    for direction in ("i2t", "t2i"):
        assert res[direction] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.0}
    assert res["rsum"] == 600.0


def test_reversed_matrix_gives_worst_ranks() -> None:
    n = 12
    sims = diagonal_sims(n, own=-1.0, other=0.0)
    np.testing.assert_array_equal(ranks_i2t(sims).ranks, np.full(n, 5 * n - 4))
    np.testing.assert_array_equal(ranks_t2i(sims).ranks, np.full(5 * n, n))
    res = recall_metrics(sims)
    assert res["i2t"] == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 56.0, "meanr": 56.0}
    assert res["t2i"] == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 12.0, "meanr": 12.0}
    assert res["rsum"] == 0.0


def test_only_third_caption_ranks_first() -> None:
    n = 12
    sims = np.full((n, 5 * n), 0.5)
    for image in range(n):
        sims[image, 5 * image : 5 * image + 5] = [0.0, 0.0, 1.0, 0.0, 0.0]
    i2t = ranks_i2t(sims)
    np.testing.assert_array_equal(i2t.ranks, np.ones(n))
    np.testing.assert_array_equal(i2t.matched, 5 * np.arange(n) + 2)
    np.testing.assert_array_equal(i2t.top1, 5 * np.arange(n) + 2)
    t2i = ranks_t2i(sims)
    expected_t2i = np.where(np.arange(5 * n) % 5 == 2, 1, n)
    np.testing.assert_array_equal(t2i.ranks, expected_t2i)
    np.testing.assert_array_equal(t2i.matched, np.arange(5 * n) // 5)
    res = recall_metrics(sims)
    assert res["i2t"]["r1"] == 100.0
    assert res["t2i"] == {"r1": 20.0, "r5": 20.0, "r10": 20.0, "medr": 12.0, "meanr": 9.8}
    assert res["rsum"] == 360.0


def test_medr_rounds_a_half_median_down() -> None:
    # Image 0 ranks its caption first; image 1 has one foreign caption above its best: ranks
    # [1, 2], median 1.5, medr 1 (SCAN: floor(median(0-based)) + 1).
    sims = diagonal_sims(2)
    sims[1, 0] = 2.0
    np.testing.assert_array_equal(ranks_i2t(sims).ranks, [1, 2])
    res = recall_metrics(sims)
    assert res["i2t"]["medr"] == 1.0
    assert res["i2t"]["meanr"] == 1.5


# --------------------------------------------------------------------------- ties


def test_ties_count_against_the_model() -> None:
    sims = np.array(
        [
            # own captions 0-4          | captions 5-9 (image 1)
            [0.5, 0.2, 0.2, 0.2, 0.2, 0.5, 0.1, 0.1, 0.1, 0.1],
            [0.3, 0.3, 0.3, 0.3, 0.3, 0.7, 0.7, 0.1, 0.1, 0.1],
        ]
    )
    # Image 0: one foreign caption ties its best -> rank 2 (argsort code may say 1).
    # Image 1: two own captions tie at the top, no foreign caption reaches 0.7 -> rank 1.
    np.testing.assert_array_equal(ranks_i2t(sims).ranks, [2, 1])
    assert ranks_i2t(sims).matched[1] in (5, 6)
    # Captions 7-9: own image 0.1 ties the other image's 0.1 -> rank 2.
    np.testing.assert_array_equal(ranks_t2i(sims).ranks, [1, 2, 2, 2, 2, 1, 1, 2, 2, 2])


def test_constant_matrix_gets_worst_case_ranks() -> None:
    n = 20
    sims = np.full((n, 5 * n), 0.25, dtype=np.float32)
    np.testing.assert_array_equal(ranks_i2t(sims).ranks, np.full(n, 5 * n - 4))
    np.testing.assert_array_equal(ranks_t2i(sims).ranks, np.full(5 * n, n))
    res = recall_metrics(sims)
    assert res["rsum"] == 0.0
    assert res["i2t"]["medr"] == 96.0 and res["t2i"]["medr"] == 20.0


def test_single_image_is_always_rank_one() -> None:
    res = recall_metrics(np.zeros((1, 5)))
    assert res["rsum"] == 600.0


@pytest.mark.parametrize("seed", range(4))
def test_tie_rule_equals_worst_case_tie_break(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    sims = rng.integers(0, 3, size=(n, 5 * n)).astype(np.float64)  # many ties
    ref_i2t, ref_t2i = worst_case_ranks(sims)
    np.testing.assert_array_equal(ranks_i2t(sims).ranks, ref_i2t)
    np.testing.assert_array_equal(ranks_t2i(sims).ranks, ref_t2i)


def test_integer_and_infinite_scores() -> None:
    sims = diagonal_sims(3).astype(np.int32)
    assert recall_metrics(sims)["rsum"] == 600.0
    sims = diagonal_sims(3, own=np.inf, other=-np.inf)
    assert recall_metrics(sims)["rsum"] == 600.0


# --------------------------------------------------------------------------- SCAN reference


@pytest.mark.parametrize(("seed", "n"), [(0, 7), (1, 10), (2, 33), (3, 64)])
def test_matches_scan_without_ties(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n, 5 * n))
    sims[np.arange(n), 5 * np.arange(n) + rng.integers(0, 5, n)] += 1.5  # realistic R@K
    assert np.unique(sims).size == sims.size
    res = recall_metrics(sims)

    ranks0, top1, summary = scan_i2t(sims)
    i2t = ranks_i2t(sims)
    np.testing.assert_array_equal(i2t.ranks, ranks0 + 1)
    np.testing.assert_array_equal(i2t.top1, top1)
    assert tuple(res["i2t"].values()) == summary  # exact, medr and meanr included

    ranks0, top1, summary = scan_t2i(sims)
    t2i = ranks_t2i(sims)
    np.testing.assert_array_equal(t2i.ranks, ranks0 + 1)
    np.testing.assert_array_equal(t2i.top1, top1)
    assert tuple(res["t2i"].values()) == summary

    assert res["rsum"] == scan_rsum(res)


def test_chunking_does_not_change_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    sims = rng.integers(0, 4, size=(23, 115)).astype(np.float32)
    whole_i2t, whole_t2i = ranks_i2t(sims), ranks_t2i(sims)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 200)  # one or two rows per block
    for whole, chunked in ((whole_i2t, ranks_i2t(sims)), (whole_t2i, ranks_t2i(sims))):
        for a, b in zip(whole, chunked, strict=True):
            np.testing.assert_array_equal(a, b)
    # top1 keeps numpy's first-index-among-ties rule across blocks.
    np.testing.assert_array_equal(ranks_t2i(sims).top1, sims.argmax(axis=0))
    np.testing.assert_array_equal(ranks_i2t(sims).top1, sims.argmax(axis=1))


def test_accepts_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    sims = diagonal_sims(4)
    assert recall_metrics(torch.from_numpy(sims)) == recall_metrics(sims)
    assert recall_metrics(torch.from_numpy(sims).bfloat16())["rsum"] == 600.0


# --------------------------------------------------------------------------- protocols


def five_fold_sims(fold_size: int, bad_per_fold: list[int]) -> np.ndarray:
    """Folds on the diagonal; off-diagonal blocks huge, so using them would ruin the metrics."""
    n = fold_size * len(bad_per_fold)
    sims = np.full((n, 5 * n), 1e6, dtype=np.float32)
    for k, n_bad in enumerate(bad_per_fold):
        rows = slice(k * fold_size, (k + 1) * fold_size)
        cols = slice(5 * k * fold_size, 5 * (k + 1) * fold_size)
        sims[rows, cols] = broken_fold(fold_size, n_bad)
    return sims


def test_five_fold_averages_every_metric() -> None:
    fold_size, bad = 20, [0, 2, 4, 12, 20]
    res = evaluate_protocol(five_fold_sims(fold_size, bad), "coco-5fold-1k", fold_size=fold_size)
    assert res["protocol"] == "coco-5fold-1k" and res["n_images"] == 100
    assert len(res["folds"]) == 5

    # Known per-fold values: good images rank 1 both ways; a bad image ranks 5*20-4 = 96 (i2t)
    # and its captions rank 20 (t2i). Recalls 100, 90, 80, 40, 0.
    for k, n_bad in enumerate(bad):
        fold = res["folds"][k]
        assert fold["i2t"]["r1"] == pytest.approx(100.0 * (fold_size - n_bad) / fold_size)
        assert fold["i2t"]["meanr"] == pytest.approx(1 + 95 * n_bad / fold_size)
        assert fold["t2i"]["meanr"] == pytest.approx(1 + 19 * n_bad / fold_size)
    for key in RECALL_KEYS:
        assert res["i2t"][key] == pytest.approx(62.0)
        assert res["t2i"][key] == pytest.approx(62.0)
    assert res["i2t"]["medr"] == pytest.approx((1 + 1 + 1 + 96 + 96) / 5)  # 39
    assert res["t2i"]["medr"] == pytest.approx((1 + 1 + 1 + 20 + 20) / 5)  # 8.6
    assert res["i2t"]["meanr"] == pytest.approx(1 + 4.75 * 7.6)
    assert res["t2i"]["meanr"] == pytest.approx(1 + 0.95 * 7.6)
    assert res["rsum"] == pytest.approx(372.0)
    # rSum is recomputed from the averaged recalls, not taken from the folds.
    assert res["rsum"] == scan_rsum(res)
    assert res["rsum"] == pytest.approx(np.mean([f["rsum"] for f in res["folds"]]))


def test_five_fold_default_fold_size() -> None:
    rng = np.random.default_rng(0)
    sims = np.zeros((5000, 25000), dtype=np.float32)  # off-diagonal blocks are never read
    for k in range(5):
        block = rng.standard_normal((1000, 5000), dtype=np.float32)
        sims[1000 * k : 1000 * (k + 1), 5000 * k : 5000 * (k + 1)] = block
    folds = evaluate_protocol(sims, "coco-5fold-1k")
    assert len(folds["folds"]) == 5
    blocks = [sims[1000 * k : 1000 * (k + 1), 5000 * k : 5000 * (k + 1)] for k in range(5)]
    assert folds["folds"][3] == recall_metrics(blocks[3])
    assert metrics.average_folds([recall_metrics(b) for b in blocks]) == {
        key: folds[key] for key in ("i2t", "t2i", "rsum")
    }


def test_protocol_sizes() -> None:
    sims = diagonal_sims(10)
    with pytest.raises(ValueError, match="expects 1000 test images"):
        evaluate_protocol(sims, "f30k")
    with pytest.raises(ValueError, match="expects 5000 test images"):
        evaluate_protocol(sims, "coco-5k")
    with pytest.raises(ValueError, match="expects 5000 test images"):
        evaluate_protocol(sims, "coco-5fold-1k")
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocol(sims, "coco")
    with pytest.raises(ValueError, match="multiple of fold_size"):
        evaluate_protocol(sims, "coco-5fold-1k", fold_size=3, strict=False)
    with pytest.raises(ValueError, match="multiple of fold_size"):
        evaluate_protocol(sims, "coco-5fold-1k", fold_size=0, strict=False)
    for protocol in ("f30k", "coco-5k", "1k", "all"):
        res = evaluate_protocol(sims, protocol, strict=False)
        assert res["protocol"] == protocol and "folds" not in res
        assert res["rsum"] == 600.0
    five = evaluate_protocol(sims, "coco-5fold-1k", fold_size=2)
    assert len(five["folds"]) == 5
    assert json.loads(json.dumps(five)) == five  # plain floats: the CLI can write JSON
    assert len(evaluate_protocol(sims, "coco-5fold-1k", fold_size=5, strict=False)["folds"]) == 2


def test_f30k_full_size() -> None:
    sims = diagonal_sims(1000)
    assert evaluate_protocol(sims, "f30k") == {
        "protocol": "f30k",
        "n_images": 1000,
        **recall_metrics(sims),
    }


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("sims", "message"),
    [
        (np.zeros(10), "2-D"),
        (np.zeros((3, 14)), "5x the first"),
        (np.zeros((3, 3)), "5x the first"),
        (np.zeros((0, 0)), "no images"),
    ],
)
def test_bad_shapes(sims: np.ndarray, message: str) -> None:
    for fn in (recall_metrics, ranks_i2t, ranks_t2i):
        with pytest.raises(ValueError, match=message):
            fn(sims)


def test_nan_and_dtype_errors() -> None:
    sims = diagonal_sims(4)
    sims[2, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*row 2"):
        recall_metrics(sims)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_protocol(sims, "all")
    with pytest.raises(TypeError, match="real numbers"):
        recall_metrics(diagonal_sims(2).astype(bool))


# --------------------------------------------------------------------------- ensemble, table


def test_ensemble() -> None:
    a, b = diagonal_sims(3), diagonal_sims(3, own=0.0, other=1.0)
    mean = ensemble([a, b])
    assert mean.dtype == np.float32
    np.testing.assert_array_equal(mean, np.full((3, 15), 0.5))
    np.testing.assert_array_equal(ensemble([a]), a)
    assert ensemble([a, a.astype(np.float64)]).dtype == np.float64
    with pytest.raises(ValueError, match="matrix 1 has shape"):
        ensemble([a, diagonal_sims(4)])
    with pytest.raises(ValueError, match="at least one"):
        ensemble([])


def test_ensemble_can_beat_its_members() -> None:
    # Model a gets images 0, 1 wrong, model b images 2, 3 (a foreign caption outscores the own
    # ones); in the mean the other model's confidence wins.
    def spoil(sims: np.ndarray, image: int, foreign_caption: int) -> None:
        sims[image, 5 * image : 5 * image + 5] = 0.4
        sims[image, foreign_caption] = 0.6

    a, b = diagonal_sims(4), diagonal_sims(4)
    spoil(a, 0, 10)
    spoil(a, 1, 15)
    spoil(b, 2, 0)
    spoil(b, 3, 5)
    assert recall_metrics(a)["i2t"]["r1"] == 50.0
    assert recall_metrics(b)["i2t"]["r1"] == 50.0
    assert recall_metrics(ensemble([a, b]))["rsum"] == 600.0


def test_format_table_contains_the_numbers() -> None:
    perfect = recall_metrics(diagonal_sims(12))
    third = recall_metrics(
        np.where(diagonal_sims(12) > 0, np.tile([0.0, 0.0, 1.0, 0.0, 0.0], (12, 12)), 0.5)
    )
    table = format_table({"CPFEAN": perfect, "SCAN-style": third})
    lines = table.splitlines()
    assert len(lines) == 5  # group header, column header, rule, two rows
    assert "R@1" in lines[1] and "meanr" in lines[1] and "rSum" in lines[1]
    assert lines[3].startswith("CPFEAN") and lines[3].count("100.0") == 6
    assert lines[3].rstrip().endswith("600.0")
    assert lines[4].startswith("SCAN-style") and "9.8" in lines[4] and "360.0" in lines[4]
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width
    two_digits = format_table({"x": third}, digits=2)
    assert "9.80" in two_digits and "360.00" in two_digits


def test_format_table_takes_protocol_results() -> None:
    res = evaluate_protocol(five_fold_sims(4, [0, 1, 0, 0, 0]), "coco-5fold-1k", fold_size=4)
    table = format_table({"CPFEAN / coco-5fold-1k": res})
    assert "CPFEAN / coco-5fold-1k" in table
    assert f"{res['rsum']:.1f}" in table


def test_permuting_other_items_does_not_change_metrics() -> None:
    # Invariant: shuffling the images together with their caption blocks changes nothing.
    rng = np.random.default_rng(7)
    n = 15
    sims = rng.standard_normal((n, 5 * n))
    perm = rng.permutation(n)
    cap_perm = (5 * perm[:, None] + np.arange(5)).ravel()
    shuffled = sims[perm][:, cap_perm]
    assert recall_metrics(shuffled) == recall_metrics(sims)
    np.testing.assert_array_equal(ranks_i2t(shuffled).ranks, ranks_i2t(sims).ranks[perm])
    np.testing.assert_array_equal(ranks_t2i(shuffled).ranks, ranks_t2i(sims).ranks[cap_perm])
