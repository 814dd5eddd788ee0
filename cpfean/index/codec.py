"""Compressed region embeddings: a faiss standalone codec (``sa_encode`` / ``sa_decode``).

An index with a codec keeps each valid region as a few bytes instead of ``d`` float16 values;
the re-rank decodes only the candidates' regions and derives their Gram matrices from the
decoded vectors, while the gate terms (two numbers a region) stay float16. Any faiss factory
string that names a standalone codec works (``SQ4``, ``SQ8``, ``PQ64``, ``OPQ64,PQ64``,
``IVF256,SQ4``, ``PCAR256,SQ4``, ...); the figures that chose the default are in
docs/benchmarks.md ("Compressed region embeddings"). The trained codec is saved with
``faiss.serialize_index`` as a ``.npy`` byte array, so an index still holds no pickle.
"""

from __future__ import annotations

import numpy as np

from cpfean.first_stage import normalise

# 4 bits a dimension, one range per dimension: a quarter of float16, and nothing to train but
# each dimension's range, so it is as good on a 1M gallery as on the sample it was fitted on
DEFAULT_CODEC = "SQ4"
TRAIN_REGIONS = 65_536  # regions sampled to fit a codec (k-means codecs ask for ~40 per centroid)


class CodecError(ValueError):
    """A codec name faiss cannot build, or a codec that cannot be fitted on this gallery."""


def _faiss():
    import faiss

    return faiss


class RegionCodec:
    """Encode unit-norm region embeddings [M, d] to bytes [M, code_size] and back."""

    def __init__(self, index, factory: str):
        self.index, self.factory = index, factory
        self.dim: int = index.d
        self.code_size: int = index.sa_code_size()

    @staticmethod
    def build(factory: str, dim: int):
        """The untrained faiss index of ``factory`` for ``dim``-d regions (CodecError if faiss
        cannot make one), so that a command can refuse a bad name before any work."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            index.sa_code_size()
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise CodecError(
                f"codec {factory!r} is not a faiss codec for {dim}-d regions "
                f"({lines[-1] if lines else 'faiss refused it'}); try SQ4, SQ8 or PQ64"
            ) from None
        return index

    @classmethod
    def fit(cls, factory: str, sample: np.ndarray, *, seed: int = 0) -> RegionCodec:
        """A codec ``factory`` (a faiss factory string) fitted on ``sample`` [M, d] regions."""
        sample = normalise(sample)
        index = cls.build(factory, sample.shape[1])
        _seed(index, seed)
        try:
            if not index.is_trained:
                index.train(sample)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise CodecError(
                f"codec {factory!r} cannot be fitted on {len(sample)} regions of {sample.shape[1]} "
                f"dimensions ({lines[-1] if lines else 'faiss refused'}); a smaller codec or "
                "--codec none"
            ) from None
        return cls(index, factory)

    @classmethod
    def from_bytes(cls, data: np.ndarray, factory: str) -> RegionCodec:
        return cls(_faiss().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8)), factory)

    def to_bytes(self) -> np.ndarray:
        return _faiss().serialize_index(self.index)

    def encode(self, regions: np.ndarray) -> np.ndarray:
        """[M, d] float -> [M, code_size] uint8."""
        if len(regions) == 0:
            return np.zeros((0, self.code_size), np.uint8)
        return self.index.sa_encode(np.ascontiguousarray(regions, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[M, code_size] uint8 -> [M, d] float32, each row scaled back to unit norm (the
        regions were unit-norm; the scale is the part of the error that costs cosine)."""
        if len(codes) == 0:
            return np.zeros((0, self.dim), np.float32)
        return normalise(self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8)))


def _seed(index, seed: int) -> None:
    """Seed every k-means the codec will run (faiss' own default seed is fixed, but say it)."""
    faiss = _faiss()
    for obj in (index, getattr(index, "pq", None)):
        cp = getattr(obj, "cp", None)
        if isinstance(cp, faiss.ClusteringParameters):
            cp.seed = seed


def gather_ragged(array: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The ragged rows of images ``rows`` (in that order) from ``array`` [M, ...], image i's
    rows being ``array[offsets[i]:offsets[i + 1]]``; reads only those rows of a memory map."""
    starts, stops = offsets[rows], offsets[np.asarray(rows) + 1]
    lengths = stops - starts
    if lengths.sum() == 0:
        return np.zeros((0, *array.shape[1:]), array.dtype)
    # one index array over every wanted row: start of its image + its place in the image
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.asarray(array[np.repeat(starts, lengths) + within])


__all__ = [
    "DEFAULT_CODEC",
    "TRAIN_REGIONS",
    "CodecError",
    "RegionCodec",
    "gather_ragged",
]
