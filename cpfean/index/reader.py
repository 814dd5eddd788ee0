"""Reading an index (memory-mapped) and searching it: exhaustive or two-stage."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.encode import Matcher
from cpfean.first_stage import DEFAULT_CANDIDATES, TWO_STAGE_MIN, FirstStage, two_stage
from cpfean.first_stage import exhaustive as exhaustive_search
from cpfean.first_stage import top_k as top_k_of
from cpfean.index.codec import RegionCodec, RowFile, gather_ragged
from cpfean.index.format import (
    COMPRESSED_VERSION,
    FORMAT,
    PRELOAD_MAX_BYTES,
    RENAMED_FIELDS,
    VERSION,
    IndexFormatError,
    IndexMismatchError,
    _load_npy,
    _resolve_class,
    pooled_images,
    pooled_texts,
)


def _release(array: np.ndarray) -> None:
    """Drop a read-only memory map's pages from this process (they stay in the page cache and
    come back on the next read), so a scan at start-up does not count as resident memory."""
    import mmap

    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _row_file(path: Path) -> RowFile:
    if not path.is_file():
        raise IndexFormatError(f"index file missing: {path} (rebuild the index)")
    return RowFile(path)


EXACT_RERANK = 50  # best rows re-scored from the exact copy of a compressed index
# a compressed gallery's first stage picks MAXSIM_WIDEN x the candidates, and at least
# MAXSIM_SQRT x sqrt(gallery size) images (a bigger gallery crowds more near-ties ahead of a
# true match), for a MaxSim pass over their coded regions, which finds what the pooled vectors
# rank too low (as PLAID does); that pass ranks well enough that CPFEAN re-ranks only
# MAXSIM_RERANK of them by default
MAXSIM_WIDEN = 6
MAXSIM_SQRT = 3
MAXSIM_RERANK = 200


def query_words(query: Any) -> tuple[np.ndarray, np.ndarray]:
    """The valid word vectors [L, d] of one encoded text query and their prominence [L]."""
    valid = query.mask[0].bool().cpu()
    words = query.words[0][valid].float().cpu().numpy()
    weights = query.log_prominence[0][valid].float().exp().nan_to_num(0.0).cpu().numpy()
    return words, weights


def maxsim_width(gallery: int, n: int, k: int) -> int:
    """How many pooled neighbours a MaxSim pass looks at to keep ``n`` (see MAXSIM_WIDEN)."""
    return max(max(n, k) * MAXSIM_WIDEN, int(MAXSIM_SQRT * gallery**0.5))


def _codes_product(weights: np.ndarray, codes: np.ndarray, block: int = 4096) -> np.ndarray:
    """``weights [L, d] @ codes [M, d].T`` with the uint8 codes widened a block at a time (a
    block stays in cache, where widening all of them at once went through memory twice)."""
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(codes))
    out = torch.empty((len(codes), len(w)))
    for s in range(0, len(codes), block):
        torch.matmul(c[s : s + block].float(), w.T, out=out[s : s + block])
    return out.T.numpy()


# ----------------------------------------------------------------------------------- loading
class RetrievalIndex:
    """Read access to an index directory; arrays are memory-mapped, rows loaded on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "index.json"
        if not meta_path.is_file():
            hint = (
                " (an interrupted build? re-run pipelines.index)"
                if self.path.with_name(self.path.name + ".building").exists()
                else ""
            )
            hint = hint or " (build one with python -m pipelines.index)"
            raise IndexFormatError(f"no index at {self.path}: {meta_path.name} not found{hint}")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"{meta_path} is not valid JSON: {e}") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") not in (
            VERSION,
            COMPRESSED_VERSION,
        ):
            raise IndexFormatError(
                f"{self.path} is not a {FORMAT} v{VERSION} index "
                f"(format {self.meta.get('format')!r}, "
                f"version {self.meta.get('version')!r})"
            )
        generation = self.meta.get("generation")
        if generation is not None and not re.fullmatch(r"gen-\d{6}", str(generation)):
            raise IndexFormatError(f"{meta_path} names generation {generation!r}: not ours")
        # the folder of this generation's arrays (an index from before generations: the index)
        self.data = self.path / generation if generation else self.path
        self.count: int = self.meta["count"]
        self.label_names: list[str] = self.meta.get("label_names", [])
        self._image_cls = _resolve_class(self.meta["image_embeddings"]["class"])
        self._image_fields = {
            RENAMED_FIELDS.get(n, n): _load_npy(self.data / "images" / f"emb.{n}.npy")
            for n in self.meta["image_embeddings"]["fields"]
        }
        self._open_codec(self.meta["image_embeddings"].get("codec"))
        self.pooled = _load_npy(self.data / "images" / "pooled.npy")  # [N, d]
        self.boxes = _load_npy(self.data / "images" / "boxes.npy")  # [N, R, 4] pixels
        self.labels = _load_npy(self.data / "images" / "labels.npy")  # [N, R]
        self.hw = _load_npy(self.data / "images" / "hw.npy")  # [N, 2]
        self.image_ids: list[str] = json.loads(
            (self.data / "images" / "ids.json").read_text(encoding="utf-8")
        )
        if len(self.image_ids) != self.count or len(self.pooled) != self.count:
            raise IndexFormatError(
                f"{self.path} is inconsistent: index.json says {self.count} "
                f"images, ids.json {len(self.image_ids)}, pooled "
                f"{len(self.pooled)}"
            )
        self.captions: list[str] = []
        self.caption_image_ids: list[str] = []
        cap = self.meta.get("captions")
        if cap:
            texts = json.loads((self.data / "captions" / "texts.json").read_text("utf-8"))
            self.captions, self.caption_image_ids = texts["captions"], texts["image_ids"]
            self._text_cls = _resolve_class(cap["class"])
            self._text_fields = {
                RENAMED_FIELDS.get(n, n): _load_npy(self.data / "captions" / f"emb.{n}.npy")
                for n in cap["fields"]
            }
            self.caption_pooled = _load_npy(self.data / "captions" / "pooled.npy")
        self._first: dict[str, FirstStage] = {}
        self._filters: dict[tuple, np.ndarray] = {}
        self._images_root = self._locate(
            self.meta.get("images_root"), self.meta.get("images_root_from_index")
        )

    def _open_codec(self, spec: dict | None) -> None:
        """With a codec, the regions are codes [M, code_size] over the valid regions of all
        images (image i's from offsets[i] to offsets[i + 1]), per-region fields are float16
        over the same rows, and the Gram matrices are derived when read."""
        self.codec: RegionCodec | None = None
        self.exact_copy = False
        if not spec:
            return
        images = self.data / "images"
        self.codec = RegionCodec.from_bytes(
            _load_npy(images / "codec.npy", mmap=False), spec["factory"]
        )
        self._codes = _row_file(images / "codes.npy")
        self._offsets = _load_npy(images / "offsets.npy", mmap=False)
        self._ragged = {n: _row_file(images / f"ragged.{n}.npy") for n in spec["ragged"]}
        self.exact_copy = bool(spec.get("exact_copy"))
        self._derived = set(spec.get("derived", []))
        self._linear = self.codec.linear_form()  # the MaxSim pass on the codes, where it can
        if self.exact_copy:
            self._exact = _row_file(images / "ragged.regions.npy")
        if len(self._offsets) != self.count + 1 or self._offsets[-1] != len(self._codes):
            raise IndexFormatError(
                f"{self.path} is inconsistent: {len(self._codes)} region codes, offsets for "
                f"{len(self._offsets) - 1} images ending at {self._offsets[-1]}"
            )

    def _decoded(self, rows: np.ndarray | slice, device: torch.device | str, exact: bool) -> Any:
        """ImageEmbeddings of ``rows`` from the codes (or the exact copy), Gram derived."""
        assert self.codec is not None
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.count))
        rows = np.asarray(rows, dtype=np.int64)
        mask = torch.from_numpy(np.array(self._image_fields["mask"][rows], dtype=bool))
        if exact and self.exact_copy:
            valid = torch.from_numpy(gather_ragged(self._exact, self._offsets, rows)).float()
        else:
            valid = self.codec.decode_tensor(gather_ragged(self._codes, self._offsets, rows))
        regions = torch.empty((*mask.shape, valid.shape[-1]))
        flat = regions.view(-1, valid.shape[-1])
        slots = mask.view(-1)
        flat[~slots] = 0.0
        flat[slots] = valid  # row-major order: each image's valid slots, in slot order
        fields: dict[str, torch.Tensor] = {"mask": mask, "regions": regions}
        for name, arr in self._ragged.items():
            per_region = torch.zeros(mask.shape)
            per_region[mask] = torch.from_numpy(gather_ragged(arr, self._offsets, rows)).float()
            fields[name] = per_region
        if "gram" in self._derived:
            fields["gram"] = regions @ regions.transpose(1, 2)
        return self._image_cls(**{n: t.to(device) for n, t in fields.items()})

    def _locate(self, recorded: str | None, from_index: str | None) -> str | None:
        """A recorded path as given when it exists, else relative to the index directory."""
        if recorded and Path(recorded).exists():
            return recorded
        if from_index and (self.path / from_index).exists():
            return os.path.normpath(self.path / from_index)
        return recorded

    @property
    def checkpoint_path(self) -> str:
        ckpt = self.meta["checkpoint"]
        return self._locate(ckpt["path"], ckpt.get("path_from_index")) or ckpt["path"]

    @property
    def regions_path(self) -> str | None:
        return self._locate(self.meta.get("regions"), self.meta.get("regions_from_index"))

    @property
    def checkpoint_sha256(self) -> str:
        return self.meta["checkpoint"]["sha256"]

    def check_checkpoint(self, path: str | os.PathLike, sha256: str) -> None:
        """Refuse a checkpoint other than the one the index was built with."""
        if sha256 != self.checkpoint_sha256:
            raise IndexMismatchError(
                f"index {self.path} was built with checkpoint {self.checkpoint_path} "
                f"(sha256 {self.checkpoint_sha256[:12]}), not {path} (sha256 {sha256[:12]}); "
                "rebuild the index with python -m pipelines.index --checkpoint "
                f"{path}, or pass --checkpoint {self.checkpoint_path}"
            )

    def image_path(self, row: int) -> str:
        """The image's path: images root / id (the id alone when no root is recorded)."""
        root = self._images_root
        image_id = self.image_ids[row]
        return str(Path(root) / image_id) if root else image_id

    @staticmethod
    def _rows(
        fields: dict[str, np.ndarray],
        cls: type,
        rows: np.ndarray | slice,
        device: torch.device | str,
    ) -> Any:
        out = {}
        for name, arr in fields.items():
            part = arr[rows]
            if not part.flags.writeable:  # a slice of the read-only memory map: copy it out
                part = np.array(part)
            t = torch.from_numpy(np.ascontiguousarray(part))
            out[name] = (t.float() if t.is_floating_point() else t).to(device)
        return cls(**out)

    def preload(self, max_bytes: int = PRELOAD_MAX_BYTES) -> bool:
        """Keep the gallery's image embeddings in memory as float32 when they fit in
        ``max_bytes``, so that a long-lived searcher does not convert the memory map on every
        query. Returns whether it did."""
        if self.codec is not None:  # decoded, padded: regions, Gram and gate terms
            n, r = self._image_fields["mask"].shape
            size = n * r * (self.codec.dim + r + 4) * 4
        else:
            size = sum(
                a.size * (4 if np.issubdtype(a.dtype, np.floating) else a.itemsize)
                for a in self._image_fields.values()
            )
        if size > max_bytes:
            return False
        if self.codec is not None:
            self._image_cache = self._decoded(slice(None), "cpu", exact=False)
        else:
            self._image_cache = self._rows(self._image_fields, self._image_cls, slice(None), "cpu")
        return True

    def images(
        self, rows: np.ndarray | slice, device: torch.device | str = "cpu", *, exact: bool = False
    ) -> Any:
        """The ImageEmbeddings of gallery ``rows`` (float32 on ``device``); with a codec, the
        decoded regions, or with ``exact`` the exact copy when the index keeps one."""
        if self.codec is not None and exact and self.exact_copy:
            return self._decoded(rows, device, exact=True)
        cache = getattr(self, "_image_cache", None)
        if cache is None:
            if self.codec is not None:
                return self._decoded(rows, device, exact=False)
            return self._rows(self._image_fields, self._image_cls, rows, device)
        if not isinstance(rows, slice):
            rows = np.asarray(rows)
            if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and (np.diff(rows) == 1).all():
                rows = slice(int(rows[0]), int(rows[-1]) + 1)  # a view, not a copy
            else:
                rows = torch.as_tensor(rows, dtype=torch.long)
        return cache[rows].to(device)

    def caption_embeddings(
        self, rows: np.ndarray | slice, device: torch.device | str = "cpu"
    ) -> Any:
        """The TextEmbeddings of indexed captions ``rows``."""
        if not self.captions:
            raise IndexFormatError(
                f"index {self.path} holds no captions (build it with --captions)"
            )
        return self._rows(self._text_fields, self._text_cls, rows, device)

    def maxsim(self, rows: np.ndarray, query: Any) -> np.ndarray:
        """[len(rows)] late-interaction scores of one text query against compressed images:
        sum over words of prominence x the best cosine with a decoded region."""
        assert self.codec is not None
        words, weights = query_words(query)
        codes = gather_ragged(self._codes, self._offsets, rows)
        lengths = self._offsets[rows + 1] - self._offsets[rows]
        out = np.full(len(rows), -np.inf, np.float32)
        has = lengths > 0
        if len(codes):
            if self._linear is not None:  # on the codes themselves: no decoded copy is made
                scale, offset = self._linear
                sims = _codes_product(words * scale, codes) + (words @ offset)[:, None]
            else:
                sims = words @ self.codec.decode(codes).T  # (L, M)
            starts = (np.cumsum(lengths) - lengths)[has]
            out[has] = weights @ np.maximum.reduceat(sims, starts, axis=1)
        return out

    def digests(self) -> list[str | None]:
        """The region store's digest of each image's record (None for an index built before
        digests were kept, or from a store that has none)."""
        path = self.data / "images" / "digests.npy"
        if not path.is_file():
            return [None] * self.count
        return [d.decode() for d in np.load(path, allow_pickle=False)]

    def rows_with_label(self, label: int) -> np.ndarray:
        """Sorted rows of the images with a region of detected label id ``label`` (cached)."""
        key = ("label", label)
        if key not in self._filters:
            hits = [
                np.flatnonzero((self.labels[s : s + 65536] == label).any(1)) + s
                for s in range(0, self.count, 65536)
            ]
            self._filters[key] = np.concatenate(hits).astype(np.int64)
        return self._filters[key]

    def rows_under(self, folder: str) -> np.ndarray:
        """Sorted rows of the images whose id lies under ``folder`` of the gallery (cached)."""
        prefix = folder.strip("/") + "/"
        key = ("under", prefix)
        if key not in self._filters:
            self._filters[key] = np.array(
                [r for r, i in enumerate(self.image_ids) if i.startswith(prefix)], np.int64
            )
        return self._filters[key]

    def first_stage(self, which: str = "images", kind: str = "auto") -> FirstStage:
        """The faiss first stage over the pooled image (or caption) vectors, built once."""
        key = f"{which}:{kind}"
        if key not in self._first:
            pooled = self.pooled if which == "images" else self.caption_pooled
            self._first[key] = FirstStage(
                pooled, kind=kind, cache=self.path / which / f"first_stage_{kind}.faiss"
            )
            _release(pooled)  # faiss holds its own copy now
        return self._first[key]


# ----------------------------------------------------------------------------------- search
@torch.no_grad()
def search_index(
    model: Matcher,
    index: RetrievalIndex,
    query: Any,
    *,
    direction: str = "text2image",
    top_k: int = 10,
    rerank: int | None = None,
    exhaustive: bool = False,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
    within: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Rank the gallery (images, or indexed captions) for one encoded query.

    Args:
        query: TextEmbeddings of one caption (text2image) or ImageEmbeddings of one image
            (image2text), on ``device``.
        rerank: re-rank this many first-stage candidates; None = automatic (two-stage
            above ``TWO_STAGE_MIN`` items with ``DEFAULT_CANDIDATES`` candidates).
        exhaustive: score every item with the full model (overrides ``rerank``).
        within: only these rows (sorted, unique) may be ranked: a filter applied before the
            top-k (inside the first stage's scan), so k results come back when it holds k.
        candidates: rows an engine outside the index chose (``cpfean.index.qdrant``): CPFEAN
            re-ranks these, and no first stage runs here.
    Returns:
        rows [k], scores [k] (CPFEAN scores, best first) and {"path": "exhaustive" |
        "two-stage", "candidates": n, "gallery": N}.
    """
    size, pooled_query, score_rows = _scorer(model, index, query, direction, chunk, device)
    # an index with a codec and an exact copy re-scores its few best from the exact values
    refine = direction == "text2image" and index.exact_copy
    kept = max(top_k, EXACT_RERANK) if refine else top_k
    allowed = size if within is None else len(within)
    if allowed == 0:
        empty = {"path": "filtered", "candidates": 0, "gallery": size, "filtered": 0}
        return np.empty(0, np.int64), np.empty(0, np.float32), empty
    use_first = not exhaustive and (rerank is not None or allowed > TWO_STAGE_MIN)
    if candidates is not None:
        chosen = np.unique(np.asarray(candidates, dtype=np.int64))
        if len(chosen):
            rows, scores = top_k_of(np.asarray(score_rows(chosen), np.float32), chosen, kept)
        else:
            rows, scores = np.empty(0, np.int64), np.empty(0, np.float32)
        info = {"path": "engine", "candidates": len(chosen), "gallery": size}
    elif not use_first:
        rows, scores = exhaustive_search(score_rows, size, kept, chunk=chunk, subset=within)
        info: dict[str, Any] = {"path": "exhaustive", "candidates": allowed, "gallery": size}
    else:
        maxsim = direction == "text2image" and index.codec is not None
        n = rerank or (MAXSIM_RERANK if maxsim else DEFAULT_CANDIDATES)
        which = "images" if direction == "text2image" else "captions"
        first = index.first_stage(which)
        if maxsim:
            rows, scores, wide = _through_maxsim(
                index, first, query, pooled_query, score_rows, kept, n, within
            )
        else:
            rows, scores = two_stage(pooled_query, first, score_rows, kept, n, subset=within)
            wide = None
        info = {"path": "two-stage", "candidates": min(max(n, kept), allowed), "gallery": size}
        if wide is not None:
            info["maxsim"] = wide
    if within is not None:
        info["filtered"] = allowed
    if refine and len(rows):
        best = np.sort(rows)
        rows, scores = top_k_of(score_rows(best, exact=True), best, top_k)
        info["exact_rerank"] = len(best)
    return rows, scores, info


def _scorer(
    model: Matcher,
    index: RetrievalIndex,
    query: Any,
    direction: str,
    chunk: int,
    device: torch.device | str,
) -> tuple[int, np.ndarray, Any]:
    """(items ranked, the query's pooled vector, CPFEAN's scores of given rows) for one
    direction."""
    if direction == "text2image":
        size, pooled_query = index.count, pooled_texts(query)[0]

        def score_rows(rows: np.ndarray, exact: bool = False) -> np.ndarray:
            images = index.images(rows, device, exact=exact)
            return (
                model.score(images, query, image_chunk=chunk, text_chunk=1)[:, 0]
                .float()
                .cpu()
                .numpy()
            )
    elif direction == "image2text":
        size, pooled_query = len(index.captions), pooled_images(query)[0]
        if not size:
            raise IndexFormatError(
                f"index {index.path} holds no captions (build it with --captions)"
            )

        def score_rows(rows: np.ndarray, exact: bool = False) -> np.ndarray:
            captions = index.caption_embeddings(rows, device)
            return (
                model.score(query, captions, image_chunk=1, text_chunk=chunk)[0]
                .float()
                .cpu()
                .numpy()
            )
    else:
        raise ValueError(f"unknown direction {direction!r}")
    return size, pooled_query, score_rows


def _through_maxsim(
    index: RetrievalIndex,
    first: FirstStage,
    query: Any,
    pooled_query: np.ndarray,
    score_rows: Any,
    k: int,
    n: int,
    within: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Three stages for a compressed gallery: the pooled first stage picks ``MAXSIM_WIDEN`` x
    ``n`` images (``MAXSIM_SQRT`` x sqrt(gallery) when more), a MaxSim pass over their coded
    regions (prominence-weighted best region per word) keeps ``n``, CPFEAN re-ranks those.
    Returns rows, scores and the widened count."""
    widened = maxsim_width(index.count if within is None else len(within), n, k)
    _, cand = first.search(pooled_query[None], widened, within)
    cand = np.sort(cand[0][cand[0] >= 0])
    wide = len(cand)
    if wide > max(n, k):
        cheap = index.maxsim(cand, query)
        cand = np.sort(cand[np.argsort(-cheap, kind="stable")[: max(n, k)]])
    rows, scores = top_k_of(np.asarray(score_rows(cand), dtype=np.float32), cand, k)
    return rows, scores, wide
