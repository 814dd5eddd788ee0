"""The first retrieval stage: approximate candidates from pooled embeddings, then re-ranking.

CPFEAN's score is pairwise (cross-modal fusion per image-caption pair), so scoring a query
against every image costs O(gallery) full model evaluations. For large galleries a cheap first
stage over one pooled, L2-normalised vector per image (inner product = cosine) picks
``n_candidates`` images and CPFEAN re-ranks only those.

Choice of faiss index (the figures: ``python -m pipelines.benchmark retrieve``,
docs/benchmarks.md):

- ``fp16`` (``IndexScalarQuantizer`` with float16 values): the exact inner product of the
  float16-rounded vectors, no training, half the memory of float32 and so, the scan being
  memory-bound, faster than ``flat``. The default up to ``FLAT_MAX`` = 1M images.
- ``flat`` (``IndexFlatIP``): exact float32 inner product.
- ``ivf`` (``IndexIVFFlat``, inner product, k-means with ``nlist`` ~ N / 1000 lists, ``nprobe``
  lists scanned): used above ``FLAT_MAX``. Text queries are not distributed like the pooled
  image vectors, so their neighbours straddle many lists and IVF loses recall a flat scan
  keeps: hence flat up to 1M. The trained index is cached next to the pooled matrix (faiss'
  own binary format, never pickle). HNSW was not tried: its graph build for 1M x 1024 on two
  cores takes far longer than the IVF's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cpfean.fileio import atomic_path

FLAT_MAX = 1_000_000  # galleries up to this size use the exact flat index
TWO_STAGE_MIN = 20_000  # galleries above this size use the two-stage path by default
DEFAULT_CANDIDATES = 500  # first-stage candidates re-ranked by CPFEAN


def _faiss():
    import faiss  # imported lazily: only the two-stage path needs it

    return faiss


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` [N, d] scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class FirstStage:
    """Candidate generation over pooled image embeddings with faiss.

    Args:
        pooled: [N, d] pooled image embeddings (normalised here; may be a memory map).
        kind: "fp16" (exact on float16 values), "flat" (exact float32), "ivf" (inverted
            lists) or "auto" (fp16 up to ``FLAT_MAX``, then ivf).
        nlist: IVF lists (default ~ N / 1000, clamped to [64, 4096]).
        nprobe: IVF lists scanned per query (see the module docstring for the recall).
        cache: file to save/load the trained IVF index (ignored for flat).
        chunk: rows added to faiss per step (bounds the float32 copy of a memory map).
    """

    def __init__(
        self,
        pooled: np.ndarray,
        *,
        kind: str = "auto",
        nlist: int | None = None,
        nprobe: int = 128,
        cache: str | os.PathLike | None = None,
        chunk: int = 65536,
        seed: int = 0,
    ):
        faiss = _faiss()
        n, d = pooled.shape
        if kind == "auto":
            kind = "fp16" if n <= FLAT_MAX else "ivf"
        if kind not in ("flat", "fp16", "ivf"):
            raise ValueError(f"unknown first-stage kind {kind!r} (fp16, flat, ivf or auto)")
        self.kind, self.size, self.dim = kind, n, d
        if kind in ("flat", "fp16"):
            self.index = (
                faiss.IndexFlatIP(d)
                if kind == "flat"
                else faiss.IndexScalarQuantizer(
                    d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
                )
            )
            self._add(pooled, chunk)
            return
        nlist = nlist or int(np.clip(n // 1000, 64, 4096))
        cache = Path(cache) if cache is not None else None
        if cache is not None and cache.is_file():
            index = faiss.read_index(str(cache))
            if index.ntotal == n and index.d == d and getattr(index, "nlist", None) == nlist:
                self.index = index
                self.index.nprobe = nprobe
                return
        quantiser = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        # 40 points per list is what faiss' k-means asks for; more only slows training
        sample = np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False)
        self.index.train(normalise(pooled[np.sort(sample)]))
        self._add(pooled, chunk)
        self.index.nprobe = nprobe
        self._quantiser = quantiser  # faiss does not own it; keep it alive
        if cache is not None:
            try:
                with atomic_path(cache) as tmp:
                    faiss.write_index(self.index, str(tmp))
            except (OSError, RuntimeError):  # a read-only index: train again next time
                pass

    def _add(self, pooled: np.ndarray, chunk: int) -> None:
        for start in range(0, pooled.shape[0], chunk):
            self.index.add(normalise(pooled[start : start + chunk]))

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query.

        Args:
            queries: [Q, d] pooled query embeddings (normalised here).
            subset: only these rows may be returned (a filter applied inside the scan, so k
                rows come back whenever the subset has them).
        Returns:
            scores [Q, k'] and rows [Q, k'] (int64, best first), k' = min(k, N); IVF may
            return fewer valid rows, padded with -1.
        """
        faiss = _faiss()
        queries = normalise(np.atleast_2d(queries))
        if subset is None:
            return self.index.search(queries, min(k, self.size))
        subset = np.ascontiguousarray(subset, dtype=np.int64)
        selector = faiss.IDSelectorBatch(len(subset), faiss.swig_ptr(subset))
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        return self.index.search(queries, max(1, min(k, len(subset))), params=params)


def top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (rows, scores) of one query, best first; ties broken by row (stable).

    Args:
        scores: [M] scores of ``rows`` [M].
    """
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def exhaustive(
    score_rows: Callable[[np.ndarray], np.ndarray],
    size: int,
    k: int,
    *,
    chunk: int = 4096,
    subset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every row (or every row of ``subset``) with the full model, in chunks; keep the
    best ``k``.

    Args:
        score_rows: rows [M] (int64) -> scores [M] of the query against those gallery rows.
        size: gallery size N.
    Returns:
        rows [k'] and scores [k'], best first.
    """
    best_rows = np.empty(0, np.int64)
    best_scores = np.empty(0, np.float32)
    every = np.arange(size, dtype=np.int64) if subset is None else np.asarray(subset, np.int64)
    for start in range(0, len(every), chunk):
        rows = every[start : start + chunk]
        scores = np.asarray(score_rows(rows), dtype=np.float32)
        best_rows, best_scores = top_k(
            np.concatenate([best_scores, scores]), np.concatenate([best_rows, rows]), k
        )
    return best_rows, best_scores


def two_stage(
    query_pooled: np.ndarray,
    first: FirstStage,
    score_rows: Callable[[np.ndarray], np.ndarray],
    k: int,
    n_candidates: int = DEFAULT_CANDIDATES,
    subset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """First stage picks ``n_candidates`` rows (of ``subset`` when given), the full model
    re-ranks them; best ``k``.

    Args:
        query_pooled: [d] pooled query embedding.
        score_rows: as in `exhaustive`.
    Returns:
        rows [k'] and scores [k'] (re-ranked full-model scores), best first.
    """
    _, cand = first.search(query_pooled[None], max(n_candidates, k), subset)
    cand = np.sort(cand[0][cand[0] >= 0])  # sorted rows read a memory map sequentially
    scores = np.asarray(score_rows(cand), dtype=np.float32)
    return top_k(scores, cand, k)


def recall_at(reference: np.ndarray, found: np.ndarray) -> float:
    """Fraction of the ``reference`` rows [k] that ``found`` [k'] contains."""
    if len(reference) == 0:
        return 1.0
    return float(np.isin(reference, found).mean())
