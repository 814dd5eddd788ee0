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

import os
from typing import Any

import numpy as np
import torch

from cpfean.first_stage import normalise

# 8 bits a dimension, one range per dimension: half of float16 and nothing to fit but the
# ranges, so it is as good on a 1M gallery as on its sample; SQ4 halves it again but moved the
# synthetic galleries' top-10 (dense near-ties) where SQ8 keeps it (docs/benchmarks.md)
DEFAULT_CODEC = "SQ8"
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

    def linear_form(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale [d], offset [d]) with decoded = offset + codes * scale, for the 8-bit scalar
        quantiser (so an inner product with decoded regions is one product with the codes);
        None for a codec that is not linear in its codes."""
        faiss = _faiss()
        sq = getattr(faiss.downcast_index(self.index), "sq", None)
        if sq is None or sq.qtype != faiss.ScalarQuantizer.QT_8bit:
            return None
        trained = faiss.vector_to_array(sq.trained)
        vmin, vdiff = trained[: self.dim], trained[self.dim :]
        return vdiff / 255.0, vmin + 0.5 * vdiff / 255.0

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[M, code_size] uint8 -> [M, d] float32, each row scaled back to unit norm (the
        regions were unit-norm; the scale is the part of the error that costs cosine)."""
        if len(codes) == 0:
            return np.zeros((0, self.dim), np.float32)
        return normalise(self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8)))

    def decode_tensor(self, codes: np.ndarray) -> torch.Tensor:
        """`decode` as a float32 tensor; a linear codec decodes in torch, on every thread
        torch has (faiss' decoder and numpy's norm run on one)."""
        if not hasattr(self, "_torch_linear"):  # read once the codec is trained
            linear = self.linear_form()
            self._torch_linear = linear and tuple(torch.from_numpy(a) for a in linear)
        if self._torch_linear is None or len(codes) == 0:
            return torch.from_numpy(self.decode(codes))
        scale, offset = self._torch_linear
        decoded = torch.from_numpy(np.ascontiguousarray(codes)).float().mul_(scale).add_(offset)
        return torch.nn.functional.normalize(decoded, dim=-1, eps=1e-12)


def _seed(index, seed: int) -> None:
    """Seed every k-means the codec will run (faiss' own default seed is fixed, but say it)."""
    faiss = _faiss()
    for obj in (index, getattr(index, "pq", None)):
        cp = getattr(obj, "cp", None)
        if isinstance(cp, faiss.ClusteringParameters):
            cp.seed = seed


class RowFile:
    """Rows of a 2-D (or 1-D) ``.npy`` file read with ``os.pread``, never memory-mapped: a
    memory map's page faults pull neighbouring pages into the process (fault-around and
    readahead), so a server that reads scattered candidates would grow its resident memory
    towards the whole file. Reads go through the page cache, which the process does not own."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self.start = f.tell()
        if fortran:
            raise ValueError(f"{path} is in Fortran order; an index writes C order")
        self.path, self.shape, self.dtype = str(path), tuple(shape), np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def ranges(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Rows ``starts[j]:stops[j]`` for each j, concatenated (adjacent ranges read once)."""
        lengths = np.asarray(stops, np.int64) - np.asarray(starts, np.int64)
        out = np.empty((int(lengths.sum()), *self.shape[1:]), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        at, j = 0, 0
        while j < len(starts):
            s, e = int(starts[j]), int(stops[j])
            while j + 1 < len(starts) and int(starts[j + 1]) == e:  # merge neighbours
                j += 1
                e = int(stops[j])
            size = (e - s) * self.row_bytes
            if size:
                got = os.preadv(self._fd, [view[at : at + size]], self.start + s * self.row_bytes)
                if got != size:
                    raise OSError(f"{self.path}: short read ({got} of {size} bytes)")
            at += size
            j += 1
        return out


def gather_ragged(array: Any, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The ragged rows of images ``rows`` (in that order) from ``array`` [M, ...], image i's
    rows being ``array[offsets[i]:offsets[i + 1]]``; reads only those rows of a memory map."""
    starts, stops = offsets[rows], offsets[np.asarray(rows) + 1]
    if isinstance(array, RowFile):
        return array.ranges(starts, stops)
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
    "RowFile",
    "gather_ragged",
]
