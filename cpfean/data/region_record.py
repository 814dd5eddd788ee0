"""One image's regions (`RegionRecord`) and its bytes in a region store.

A record on disk: a 32-byte little-endian header (`_HEADER`: magic b"CPRS", schema_version u16,
num_regions R u16, feature_dim D u32, dtype codes u8 x 4 (`_DTYPES`), num_valid u16, reserved
u16, image h u32, w u32, crc32 u32 of header[:28] then payload), then raw little-endian buffers:
features [R, D] float16, boxes [R, 4] float32, labels [R] int32, scores [R] float32. Never
pickle: stores are shared, unpickling runs code.
"""

from __future__ import annotations

import math
import operator
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cpfean.arrays import as_numpy

SCHEMA_VERSION = 1
NUM_REGIONS = 36  # slots per record unless a store's meta says otherwise
MAX_NUM_REGIONS = 1000  # the most a store allows (the header would count up to 65,535)
META_KEY = "__meta__"
MAGIC = b"CPRS"
# each record's companion key: this byte then the id (no file name holds a NUL, and the prefix
# sorts these keys before every id); its value is `RegionSource` JSON
SOURCE_PREFIX = b"\x00"

_HEADER = struct.Struct("<4sHHIBBBBHHIII")
_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4"), 3: np.dtype("<i4"), 4: np.dtype("<i8")}
_DISK_CODES = (1, 2, 3, 2)  # what this version writes for features, boxes, labels, scores
_MAX_KEY_BYTES = 511  # LMDB's default maximum key size
_MAX_ID_BYTES = _MAX_KEY_BYTES - len(SOURCE_PREFIX)  # room for the companion key


class RegionStoreError(ValueError):
    """A region store, its meta or one of its records is invalid, corrupt or mismatched."""


def _check_shapes(r: int, **arrays: np.ndarray) -> None:
    for name, arr in arrays.items():
        want = (r, 4) if name == "boxes" else (r,)
        if arr.shape != want:
            raise ValueError(f"{name} must have shape {want} for {r} regions, got {arr.shape}")


@dataclass(frozen=True, eq=False)
class RegionRecord:
    """One image's regions.

    features [R, D] float32 (float16 on disk); boxes [R, 4] float32 xyxy in original-image
    pixels; labels [R] int64 (-1 = padding or unknown); scores [R] float32; image_hw (h, w),
    (0, 0) when unknown; num_valid: slots >= num_valid are padding (zero features, boxes and
    scores, label -1). R is the store's ``num_regions`` (`NUM_REGIONS`, 36, by default).
    """

    features: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    image_hw: tuple[int, int]
    num_valid: int

    def __post_init__(self) -> None:
        for name, dtype in (
            ("features", np.float32),
            ("boxes", np.float32),
            ("labels", np.int64),
            ("scores", np.float32),
        ):
            object.__setattr__(self, name, as_numpy(getattr(self, name), dtype))
        f, hw, nv = self.features, tuple(map(operator.index, self.image_hw)), self.num_valid
        if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] < 1:
            raise ValueError(f"features must be [R, D] with R, D >= 1, got shape {f.shape}")
        r = f.shape[0]
        _check_shapes(r, boxes=self.boxes, labels=self.labels, scores=self.scores)
        if len(hw) != 2 or min(hw) < 0 or not 0 <= operator.index(nv) <= r:
            raise ValueError(
                f"need image_hw (h, w) >= 0 and 0 <= num_valid <= {r}, got {self.image_hw!r}, {nv}"
            )
        object.__setattr__(self, "image_hw", hw)
        object.__setattr__(self, "num_valid", operator.index(nv))
        if nv < r and (
            f[nv:].any()
            or self.boxes[nv:].any()
            or self.scores[nv:].any()
            or (self.labels[nv:] != -1).any()
        ):
            raise ValueError(f"padding slots {nv}.. must be zero (labels -1), num_valid={nv}")

    @property
    def num_regions(self) -> int:
        return self.features.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    @property
    def mask(self) -> np.ndarray:
        """[R] bool, True for valid slots."""
        return np.arange(self.num_regions) < self.num_valid

    @classmethod
    def from_detections(
        cls,
        features: Any,
        boxes: Any,
        labels: Any,
        scores: Any,
        image_hw: tuple[int, int],
        num_regions: int = NUM_REGIONS,
    ) -> RegionRecord:
        """A record from N <= num_regions detections, padded (never duplicated) to num_regions.

        Args (numpy arrays, lists or torch tensors): features [N, D]; boxes [N, 4] xyxy pixels;
            labels [N] (None: all -1, unknown); scores [N] (None: all 1); image_hw (h, w).
        Raises ValueError on more than num_regions detections or inconsistent shapes."""
        f = as_numpy(features, np.float32)
        if f.ndim != 2 or f.shape[1] < 1:
            raise ValueError(f"features must be [N, D] with D >= 1, got shape {f.shape}")
        n, d = f.shape
        if n > num_regions:
            raise ValueError(f"{n} detections for {num_regions} slots; keep the top ones first")
        b = as_numpy(boxes, np.float32)
        lab = np.full(n, -1, np.int64) if labels is None else as_numpy(labels, np.int64)
        s = np.ones(n, np.float32) if scores is None else as_numpy(scores, np.float32)
        _check_shapes(n, boxes=b, labels=lab, scores=s)
        out = [
            np.zeros((num_regions, d), np.float32),
            np.zeros((num_regions, 4), np.float32),
            np.full(num_regions, -1, np.int64),
            np.zeros(num_regions, np.float32),
        ]
        for dst, src in zip(out, (f, b, lab, s), strict=True):
            dst[:n] = src
        return cls(*out, image_hw, n)


def image_id_problem(image_id: object) -> str | None:
    """Why `image_id` cannot be a key of a region store, or None when it can."""
    if not isinstance(image_id, str) or not image_id:
        return "an image id must be a non-empty string"
    try:
        key = image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8"
    if image_id == META_KEY:
        return f"{META_KEY!r} is reserved"
    if "\x00" in image_id:
        return "the id holds a NUL character"
    if "\\" in image_id:
        return "the file name holds a backslash (image ids use / separators)"
    if image_id.startswith("/"):
        return "an image id is a relative path"
    if len(key) > _MAX_ID_BYTES:
        return f"the path is {len(key)} UTF-8 bytes; a store key holds at most {_MAX_ID_BYTES}"
    return None


def _key(image_id: str) -> bytes:
    """The LMDB key of an image id; raises ValueError on ids the contract does not allow."""
    problem = image_id_problem(image_id)
    if problem is not None:
        shown = (
            image_id.encode("utf-8", "backslashreplace").decode()
            if isinstance(image_id, str)
            else image_id
        )
        raise ValueError(f"image id {shown!r:.80} cannot be stored: {problem}")
    return image_id.encode("utf-8")


def _encode(image_id: str, record: RegionRecord) -> bytes:
    """The on-disk bytes of one record; raises RegionStoreError naming the id on bad values."""
    feats = record.features
    with np.errstate(over="ignore", invalid="ignore"):
        f16 = feats.astype(_DTYPES[_DISK_CODES[0]])
    if not np.isfinite(f16).all():
        if np.isfinite(feats).all():
            raise RegionStoreError(
                f"image {image_id!r}: feature value {np.abs(feats).max():.6g} "
                "is beyond the store's float16 range (+-65504); rescale"
            )
        raise RegionStoreError(f"image {image_id!r}: features contain NaN or inf")
    if not (np.isfinite(record.boxes).all() and np.isfinite(record.scores).all()):
        raise RegionStoreError(f"image {image_id!r}: boxes or scores contain NaN or inf")
    arrays = (f16, record.boxes, record.labels, record.scores)
    payload = b"".join(
        a.astype(_DTYPES[c], copy=False).tobytes() for a, c in zip(arrays, _DISK_CODES, strict=True)
    )
    head = _HEADER.pack(
        MAGIC,
        SCHEMA_VERSION,
        record.num_regions,
        record.feature_dim,
        *_DISK_CODES,
        record.num_valid,
        0,
        *record.image_hw,
        0,
    )[:-4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def _decode(image_id: str, buf: Any) -> RegionRecord:
    """A record from its on-disk bytes (copied out of `buf`); raises RegionStoreError naming
    the id on a wrong magic, schema version, length or checksum."""
    n = len(buf := memoryview(buf))
    fail = lambda msg: RegionStoreError(f"region record {image_id!r} {msg}")
    if n < _HEADER.size:
        raise fail(f"is truncated: {n} bytes, the header alone is {_HEADER.size}")
    magic, version, r, d, *codes, num_valid, _, h, w, crc = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise fail(f"has bad magic {magic!r} (expected {MAGIC!r}): corrupt or not a record")
    if version != SCHEMA_VERSION:
        raise fail(f"has schema version {version}; this code reads {SCHEMA_VERSION}")
    if any(c not in _DTYPES for c in codes):
        raise fail(f"has unknown dtype codes {codes}")
    shapes = ((r, d), (r, 4), (r,), (r,))
    expected = _HEADER.size + sum(
        _DTYPES[c].itemsize * math.prod(s) for c, s in zip(codes, shapes, strict=True)
    )
    if n != expected:
        raise fail(
            f"is {'truncated' if n < expected else 'too long'}: {n} bytes, its header "
            f"implies {expected}"
        )
    if zlib.crc32(buf[_HEADER.size :], zlib.crc32(buf[: _HEADER.size - 4])) != crc:
        raise fail("is corrupt: checksum mismatch")
    arrays, offset = [], _HEADER.size
    for c, shape, out in zip(
        codes, shapes, (np.float32, np.float32, np.int64, np.float32), strict=True
    ):
        count = math.prod(shape)
        if c == 1:  # float16 features: torch widens them several times faster than numpy
            wide = (
                torch.frombuffer(bytearray(buf[offset : offset + 2 * count]), dtype=torch.float16)
                .float()
                .numpy()
            )
            arrays.append(wide.reshape(shape))
        else:
            arrays.append(np.frombuffer(buf, _DTYPES[c], count, offset).reshape(shape).astype(out))
        offset += count * _DTYPES[c].itemsize
    try:
        return RegionRecord(*arrays, (h, w), num_valid)
    except ValueError as e:
        raise fail(f"is invalid: {e}") from e
