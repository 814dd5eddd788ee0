"""Image-text retrieval metrics: R@K, medr, meanr, rSum, and the F30K / COCO protocols.

Layout: ``sims`` is ``[n_images, 5 * n_images]``, higher = more similar, and captions
``5i .. 5i+4`` belong to image ``i``.

Ranks are 1-based (rank 1 = top of the list) and defined so that ties count against the model:

    rank = 1 + number of non-matching candidates whose score is >= the best matching score

For text -> image the matching candidate is the caption's image; for image -> text it is the best
scoring of the image's five captions (so ties among an image's own captions cost nothing). This
is the worst rank that any tie-breaking order can give, i.e. the worst case of the field's
``argsort``-based code, whose tie order is arbitrary. Without ties the two agree exactly. A
constant scorer gets the worst rank everywhere (``5n - 4`` for i2t, ``n`` for t2i), never R@1 = 100.

Summary statistics reproduce SCAN's ``evaluation.py`` bit for bit when there are no ties:

- ``R@K = 100.0 * count(rank <= K) / n_queries``
- ``medr = floor(median(rank - 1)) + 1`` (equal to ``floor(median(rank))``: a median that falls
  between two ranks is rounded down, as the field does)
- ``meanr = mean(rank - 1) + 1`` (SCAN's float expression, mathematically ``mean(rank)``)
- ``rSum`` = i2t R@1 + R@5 + R@10 + t2i R@1 + R@5 + R@10.

COCO 5-fold 1K averages every metric, medr and meanr included, over the folds and recomputes
rSum from the averaged recalls (equal to the mean of the fold rSums up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

from cpfean.arrays import as_numpy

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "PROTOCOLS",
    "DirectionMetrics",
    "PairedComparison",
    "ProtocolResult",
    "QueryRanks",
    "RecallResult",
    "average_folds",
    "ensemble",
    "evaluate_protocol",
    "format_table",
    "paired_bootstrap",
    "ranks_i2t",
    "ranks_t2i",
    "recall_metrics",
]

CAPTIONS_PER_IMAGE = 5
PROTOCOLS = ("f30k", "coco-5k", "coco-5fold-1k", "1k", "all")
RECALL_KS = (1, 5, 10)
# Elements per comparison block: bounds the temporary boolean matrix to ~16 MB.
_CHUNK_ELEMENTS = 1 << 24


class DirectionMetrics(TypedDict):
    """Metrics of one retrieval direction; recalls in percent, ranks 1-based."""

    r1: float
    r5: float
    r10: float
    medr: float
    meanr: float


class RecallResult(TypedDict):
    """Both directions plus rSum (sum of the six recalls)."""

    i2t: DirectionMetrics
    t2i: DirectionMetrics
    rsum: float


class ProtocolResult(RecallResult):
    """A :class:`RecallResult` tagged with its protocol; ``folds`` only for fold protocols."""

    protocol: str
    n_images: int
    folds: NotRequired[list[RecallResult]]


class QueryRanks(NamedTuple):
    """Per-query ranks with indices for inspection.

    Attributes:
        ranks: ``[n_queries]`` int64, 1-based ranks under the pessimistic tie rule.
        matched: ``[n_queries]`` int64, the ground-truth candidate that sets the rank: the
            image's best-scoring caption for i2t, the caption's image for t2i.
        top1: ``[n_queries]`` int64, the top-scoring candidate (first index among ties).
    """

    ranks: np.ndarray
    matched: np.ndarray
    top1: np.ndarray


def _row_chunks(n_rows: int, row_len: int) -> Iterator[tuple[int, int]]:
    """Yields ``(start, stop)`` row ranges whose blocks hold about ``_CHUNK_ELEMENTS`` values."""
    step = max(1, _CHUNK_ELEMENTS // max(1, row_len))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _check_sims(sims: npt.ArrayLike) -> np.ndarray:
    """Validates a similarity matrix.

    Args:
        sims: ``[n_images, 5 * n_images]`` real scores.

    Returns:
        The same scores as a numpy array (no copy when already one).

    Raises:
        ValueError: wrong rank or shape, no images, or a NaN anywhere.
        TypeError: non-real dtype (bool, complex, object).
    """
    arr = as_numpy(sims)
    if arr.ndim != 2:
        raise ValueError(
            f"sims must be 2-D [n_images, {CAPTIONS_PER_IMAGE} * n_images], got shape {arr.shape}"
        )
    n_images, n_captions = arr.shape
    if n_images == 0:
        raise ValueError(f"sims has no images (shape {arr.shape})")
    if n_captions != CAPTIONS_PER_IMAGE * n_images:
        raise ValueError(
            f"sims has shape {arr.shape}: the second dimension must be {CAPTIONS_PER_IMAGE}x the "
            f"first ({CAPTIONS_PER_IMAGE * n_images} captions for {n_images} images; captions "
            f"{CAPTIONS_PER_IMAGE}i..{CAPTIONS_PER_IMAGE}i+{CAPTIONS_PER_IMAGE - 1} belong to "
            "image i)"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"sims must hold real numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        for start, stop in _row_chunks(n_images, n_captions):
            bad = np.isnan(arr[start:stop]).any(axis=1)
            if bad.any():
                row = start + int(np.argmax(bad))
                raise ValueError(f"sims contains NaN (first in image row {row})")
    return arr


def _own_caption_scores(sims: np.ndarray) -> np.ndarray:
    """Scores of each image against its own captions: ``[n, 5*n]`` -> ``[n, 5]``."""
    n_images = sims.shape[0]
    rows = np.arange(n_images)
    cols = CAPTIONS_PER_IMAGE * rows[:, None] + np.arange(CAPTIONS_PER_IMAGE)  # (n, 5)
    return sims[rows[:, None], cols]


def _i2t_ranks(arr: np.ndarray) -> np.ndarray:
    """Image -> text ranks of a validated ``[n, 5n]`` array: ``[n]`` int64, 1-based."""
    n_images, n_captions = arr.shape
    own = _own_caption_scores(arr)  # (n, 5)
    best = own.max(axis=1)  # (n,)
    ranks = np.empty(n_images, dtype=np.int64)
    for start, stop in _row_chunks(n_images, n_captions):
        at_least = arr[start:stop] >= best[start:stop, None]  # (chunk, 5n)
        ranks[start:stop] = np.add.reduce(at_least, axis=1, dtype=np.int32)
    # The count includes the own captions tied with the best one (at least the best itself);
    # they are matches, so they neither count against the query nor take rank 1 away.
    ranks -= (own == best[:, None]).sum(axis=1)
    return ranks + 1


def _t2i_ranks(arr: np.ndarray) -> np.ndarray:
    """Text -> image ranks of a validated ``[n, 5n]`` array: ``[5n]`` int64, 1-based."""
    n_images, n_captions = arr.shape
    captions = np.arange(n_captions)
    gt = arr[captions // CAPTIONS_PER_IMAGE, captions]  # (5n,)
    # Counting >= includes the caption's own image, which supplies the "1 +".
    ranks = np.zeros(n_captions, dtype=np.int64)
    for start, stop in _row_chunks(n_images, n_captions):
        ranks += np.add.reduce(arr[start:stop] >= gt[None, :], axis=0, dtype=np.int32)
    return ranks


def _column_argmax(arr: np.ndarray) -> np.ndarray:
    """``arr.argmax(axis=0)`` (first index among ties) for ``[rows, cols]``, by row blocks.

    numpy's argmax over a non-last axis copies the transposed matrix; a running maximum over
    row blocks is several times faster on a 5K x 25K matrix.
    """
    n_rows, n_cols = arr.shape
    best = arr[0].copy()
    index = np.zeros(n_cols, dtype=np.int64)
    for start, stop in _row_chunks(n_rows, n_cols):
        block = arr[start:stop]  # (chunk, cols)
        block_max = block.max(axis=0)
        better = block_max > best  # strict: an earlier row keeps a tie
        if better.any():
            cols = np.flatnonzero(better)
            index[cols] = start + block[:, cols].argmax(axis=0)
            best[cols] = block_max[cols]
    return index


def ranks_i2t(sims: npt.ArrayLike) -> QueryRanks:
    """Image -> text ranks: for each image, the rank of its best-ranked caption.

    rank = 1 + number of OTHER images' captions scoring >= the image's best own caption.

    Args:
        sims: ``[n_images, 5 * n_images]`` similarities, higher = more similar.

    Returns:
        :class:`QueryRanks` with ``[n_images]`` arrays; ``matched`` is the caption index
        (in ``0 .. 5n-1``) of the best own caption, ``top1`` the top-scoring caption.
    """
    arr = _check_sims(sims)
    n_images = arr.shape[0]
    matched = CAPTIONS_PER_IMAGE * np.arange(n_images) + _own_caption_scores(arr).argmax(axis=1)
    return QueryRanks(
        ranks=_i2t_ranks(arr),
        matched=matched.astype(np.int64),
        top1=arr.argmax(axis=1).astype(np.int64),
    )


def ranks_t2i(sims: npt.ArrayLike) -> QueryRanks:
    """Text -> image ranks: for each caption, the rank of its image.

    rank = 1 + number of other images scoring >= the caption's own image.

    Args:
        sims: ``[n_images, 5 * n_images]`` similarities, higher = more similar.

    Returns:
        :class:`QueryRanks` with ``[5 * n_images]`` arrays; ``matched`` is the caption's image
        (``caption // 5``), ``top1`` the top-scoring image.
    """
    arr = _check_sims(sims)
    own_image = np.arange(arr.shape[1], dtype=np.int64) // CAPTIONS_PER_IMAGE
    return QueryRanks(ranks=_t2i_ranks(arr), matched=own_image, top1=_column_argmax(arr))


def _direction_metrics(ranks: np.ndarray) -> DirectionMetrics:
    """R@1/5/10 (percent), medr and meanr from ``[n_queries]`` 1-based ranks.

    The float expressions are SCAN's, applied to its 0-based ranks, so that the numbers match
    its ``i2t``/``t2i`` to the last bit.
    """
    n_queries = ranks.size
    zero_based = (ranks - 1).astype(np.float64)
    recalls = [100.0 * int(np.count_nonzero(ranks <= k)) / n_queries for k in RECALL_KS]
    return DirectionMetrics(
        r1=float(recalls[0]),
        r5=float(recalls[1]),
        r10=float(recalls[2]),
        medr=float(np.floor(np.median(zero_based)) + 1),
        meanr=float(zero_based.mean() + 1),
    )


def _rsum(i2t: DirectionMetrics, t2i: DirectionMetrics) -> float:
    """Sum of the six recalls, in SCAN's order of addition."""
    return float(i2t["r1"] + i2t["r5"] + i2t["r10"] + t2i["r1"] + t2i["r5"] + t2i["r10"])


def recall_metrics(sims: npt.ArrayLike) -> RecallResult:
    """All retrieval metrics of one similarity matrix.

    Args:
        sims: ``[n_images, 5 * n_images]`` similarities, higher = more similar.

    Returns:
        ``{"i2t": {"r1","r5","r10","medr","meanr"}, "t2i": {...}, "rsum": float}``; recalls in
        percent, ranks 1-based with ties counted against the model (see module docstring).
    """
    return _recall_metrics(_check_sims(sims))


def _recall_metrics(arr: np.ndarray) -> RecallResult:
    """:func:`recall_metrics` on an already validated ``[n, 5n]`` array."""
    i2t = _direction_metrics(_i2t_ranks(arr))
    t2i = _direction_metrics(_t2i_ranks(arr))
    return RecallResult(i2t=i2t, t2i=t2i, rsum=_rsum(i2t, t2i))


class PairedComparison(TypedDict):
    """rSum of model A minus model B on one set, with a bootstrap over its images."""

    rsum_a: float
    rsum_b: float
    diff: float  # rsum_a - rsum_b on the whole set
    ci_low: float  # 2.5th percentile of the resampled differences
    ci_high: float  # 97.5th percentile
    a_ahead: float  # fraction of resamples where A's rSum is strictly higher
    resamples: int


def _hits(ranks: np.ndarray) -> np.ndarray:
    """``[n_queries, 3]`` float: whether each query's rank is within R@1, R@5, R@10."""
    return (ranks[:, None] <= np.asarray(RECALL_KS)[None]).astype(np.float64)


def query_ranks(sims: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The 1-based rank of every query of a matrix: ``([n] image -> text, [5n] text -> image)``,
    what recalls and :func:`paired_bootstrap_ranks` are computed from."""
    arr = _check_sims(sims)
    return _i2t_ranks(arr), _t2i_ranks(arr)


def paired_bootstrap(
    sims_a: npt.ArrayLike, sims_b: npt.ArrayLike, *, resamples: int = 1000, seed: int = 0
) -> PairedComparison:
    """Is A's rSum above B's on this set by more than the choice of images explains?

    Both matrices score the same images and captions. Each resample draws ``n`` images with
    replacement; an image brings its own image -> text query and its five captions' text ->
    image queries, each with the rank it has against the whole gallery (the gallery itself is
    not resampled). A and B are scored on the same draw, so the interval is that of the
    paired difference. With 100 test images, differences of a few rSum points are often
    inside it.

    Args:
        sims_a, sims_b: ``[n_images, 5 * n_images]`` similarities of the two models.
        resamples: bootstrap draws.
        seed: for the draws (the result is deterministic given it).
    """
    a, b = _check_sims(sims_a), _check_sims(sims_b)
    if a.shape != b.shape:
        raise ValueError(f"the two similarity matrices differ in shape: {a.shape} vs {b.shape}")
    return paired_bootstrap_ranks(query_ranks(a), query_ranks(b), resamples=resamples, seed=seed)


def paired_bootstrap_ranks(
    ranks_a: tuple[npt.ArrayLike, npt.ArrayLike],
    ranks_b: tuple[npt.ArrayLike, npt.ArrayLike],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> PairedComparison:
    """:func:`paired_bootstrap` from each model's :func:`query_ranks`. Only whether a rank is
    within 1, 5 and 10 counts, so ranks past 10 may be stored as any larger number."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    pairs = []
    for i2t, t2i in (ranks_a, ranks_b):
        i2t, t2i = np.asarray(i2t), np.asarray(t2i)
        if i2t.ndim != 1 or t2i.shape != (CAPTIONS_PER_IMAGE * i2t.size,) or i2t.size == 0:
            raise ValueError(
                f"ranks of {i2t.shape} images and {t2i.shape} captions: not 5 captions an image"
            )
        if min(i2t.min(), t2i.min()) < 1:
            raise ValueError("ranks are 1-based: a rank below 1 is not a rank")
        pairs.append((i2t, t2i))
    if pairs[0][0].shape != pairs[1][0].shape:
        raise ValueError(
            f"the two models rank different sets: {pairs[0][0].size} vs {pairs[1][0].size} images"
        )
    n = pairs[0][0].size
    # per image: its i2t hits (3) and the mean of its five captions' t2i hits (3), for A - B
    per_image, rsums = [], []
    for i2t_ranks, t2i_ranks in pairs:
        rsums.append(_rsum(_direction_metrics(i2t_ranks), _direction_metrics(t2i_ranks)))
        t2i = _hits(t2i_ranks).reshape(n, CAPTIONS_PER_IMAGE, -1).mean(axis=1)
        per_image.append(np.concatenate([_hits(i2t_ranks), t2i], axis=1).sum(axis=1))
    delta = per_image[0] - per_image[1]  # [n]; 100 * mean over images = rSum difference
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diffs = 100.0 * delta[draws].mean(axis=1)
    rsum_a, rsum_b = rsums
    low, high = np.percentile(diffs, [2.5, 97.5])
    return PairedComparison(
        rsum_a=rsum_a,
        rsum_b=rsum_b,
        diff=rsum_a - rsum_b,
        ci_low=float(low),
        ci_high=float(high),
        a_ahead=float(np.mean(diffs > 1e-9)),
        resamples=resamples,
    )


def average_folds(fold_results: Sequence[RecallResult]) -> RecallResult:
    """Averages fold results metric by metric; rSum is recomputed from the averaged recalls.

    Useful on its own when the folds' diagonal blocks are scored separately (1/5 of the
    pairwise work of the full 5K x 25K matrix): ``average_folds([recall_metrics(b) ...])``.

    Args:
        fold_results: one :class:`RecallResult` per fold.

    Returns:
        The averaged :class:`RecallResult`.
    """
    if not fold_results:
        raise ValueError("average_folds needs at least one fold result")
    averaged: dict[str, DirectionMetrics] = {}
    for direction in ("i2t", "t2i"):
        averaged[direction] = DirectionMetrics(
            **{
                key: float(np.mean([fold[direction][key] for fold in fold_results]))
                for key in DirectionMetrics.__annotations__
            }
        )
    i2t, t2i = averaged["i2t"], averaged["t2i"]
    return RecallResult(i2t=i2t, t2i=t2i, rsum=_rsum(i2t, t2i))


def check_protocol_size(
    protocol: str, n_images: int, *, fold_size: int = 1000, strict: bool = True
) -> None:
    """Raise ValueError unless ``n_images`` fits ``protocol`` (see `evaluate_protocol`); call
    it before scoring, so that a wrong test set costs nothing."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    expected = {"f30k": 1000, "coco-5k": 5000, "coco-5fold-1k": 5 * fold_size}.get(protocol)
    if strict and expected is not None and n_images != expected:
        raise ValueError(
            f"protocol {protocol!r} expects {expected} test images, got {n_images} "
            "(pass strict=False to evaluate another size)"
        )
    if protocol == "coco-5fold-1k" and (fold_size <= 0 or n_images % fold_size != 0):
        raise ValueError(
            f"protocol 'coco-5fold-1k' needs n_images ({n_images}) to be a positive multiple "
            f"of fold_size ({fold_size})"
        )


def evaluate_protocol(
    sims: npt.ArrayLike,
    protocol: str,
    *,
    fold_size: int = 1000,
    strict: bool = True,
) -> ProtocolResult:
    """Evaluates a similarity matrix under a named benchmark protocol.

    Protocols:
        ``"f30k"``: Flickr30K 1K test, the full matrix; strict requires 1000 images.
        ``"coco-5k"``: COCO 5K test, the full matrix; strict requires 5000 images.
        ``"coco-5fold-1k"``: COCO 5-fold 1K. Fold k holds images ``fold_size*k ..`` and their
            captions ``5*fold_size*k ..``; only the diagonal blocks are scored. Every metric
            (medr, meanr too) is averaged over the folds and rSum recomputed from the averaged
            recalls; per-fold results are under ``"folds"``. The image count must be a multiple
            of ``fold_size``; strict also requires exactly five folds (5000 images by default).
        ``"1k"``, ``"all"``: the full matrix, whatever its size.

    Args:
        sims: ``[n_images, 5 * n_images]`` similarities, higher = more similar.
        protocol: one of :data:`PROTOCOLS`.
        fold_size: images per fold for ``"coco-5fold-1k"`` (smaller for demo sets).
        strict: check the official test-set sizes.

    Returns:
        A :class:`ProtocolResult`: the :func:`recall_metrics` keys plus ``protocol``,
        ``n_images`` and, for the fold protocol, ``folds``.
    """
    arr = _check_sims(sims)
    n_images = arr.shape[0]
    check_protocol_size(protocol, n_images, fold_size=fold_size, strict=strict)
    if protocol != "coco-5fold-1k":
        return ProtocolResult(protocol=protocol, n_images=n_images, **_recall_metrics(arr))

    blocks = []
    for k in range(n_images // fold_size):
        image_slice = slice(k * fold_size, (k + 1) * fold_size)
        caption_slice = slice(
            CAPTIONS_PER_IMAGE * k * fold_size, CAPTIONS_PER_IMAGE * (k + 1) * fold_size
        )
        blocks.append(arr[image_slice, caption_slice])
    return evaluate_fold_blocks(blocks)


def evaluate_fold_blocks(blocks: Sequence[npt.ArrayLike]) -> ProtocolResult:
    """COCO 5-fold 1K from the folds' diagonal blocks alone (each ``[f, 5f]``), as
    `evaluate_protocol` computes it from the whole matrix, at a fifth of the scoring work."""
    folds = [_recall_metrics(_check_sims(b)) for b in blocks]
    n_images = sum(np.shape(b)[0] for b in blocks)
    return ProtocolResult(
        protocol="coco-5fold-1k", n_images=n_images, folds=folds, **average_folds(folds)
    )


def ensemble(sims_list: Sequence[npt.ArrayLike]) -> np.ndarray:
    """Averages similarity matrices of several models (the usual two-model ensemble).

    Args:
        sims_list: matrices of one common shape, e.g. ``[n_images, 5 * n_images]``.

    Returns:
        Their element-wise mean, same shape, float32 or wider (float64 if any input is).
    """
    if len(sims_list) == 0:
        raise ValueError("ensemble needs at least one similarity matrix")
    arrays = [as_numpy(sims) for sims in sims_list]
    shape = arrays[0].shape
    for index, arr in enumerate(arrays):
        if arr.shape != shape:
            raise ValueError(
                f"ensemble: matrix {index} has shape {arr.shape}, matrix 0 has shape {shape}"
            )
    dtype = np.result_type(np.float32, *(arr.dtype for arr in arrays))
    total = np.zeros(shape, dtype=dtype)
    for arr in arrays:
        total += arr
    total /= len(arrays)
    return total


_COLUMNS = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("medr", "medr"), ("meanr", "meanr"))


def format_table(
    results: Mapping[str, RecallResult | Mapping[str, Any]], *, digits: int = 1
) -> str:
    """Renders results as a fixed-width table, one row per method/protocol.

    Args:
        results: row name -> result of :func:`recall_metrics` or :func:`evaluate_protocol`,
            e.g. ``{"CPFEAN": res, "SCAN-style": res2}``.
        digits: decimals shown for every number.

    Returns:
        The table, lines joined by newlines, no trailing newline.
    """
    name_width = max([len("method")] + [len(str(name)) for name in results])
    num_width = 6 + digits  # fits ranks up to 99999 (meanr of COCO 5K i2t) and "100.0"
    group_width = len(_COLUMNS) * (num_width + 1) - 1

    def cell(value: float) -> str:
        return f"{value:>{num_width}.{digits}f}"

    groups = (
        " " * name_width
        + " | "
        + "image -> text".center(group_width)
        + " | "
        + "text -> image".center(group_width)
        + " | "
    )
    labels = " ".join(f"{label:>{num_width}}" for label, _ in _COLUMNS)
    header = f"{'method':<{name_width}} | {labels} | {labels} | {'rSum':>{num_width}}"
    lines = [groups.rstrip(), header, "-" * len(header)]
    for name, result in results.items():
        i2t = " ".join(cell(result["i2t"][key]) for _, key in _COLUMNS)
        t2i = " ".join(cell(result["t2i"][key]) for _, key in _COLUMNS)
        lines.append(f"{name!s:<{name_width}} | {i2t} | {t2i} | {cell(result['rsum'])}")
    return "\n".join(lines)
