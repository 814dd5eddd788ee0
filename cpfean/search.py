"""Searching an index and explaining each answer: the one call the CLI and the server share.

`Searcher` holds a model and an index that were built together. A text query ranks the
gallery's images, an image (its regions) ranks the indexed captions, and a gallery image ranks
the other gallery images ("more like this"). Every answer carries, for its first results, the
prominent words and the most important regions (box, label, weight) that explain the score:
a region's weight is the prominence of the words aligned to it, its fusion gate a tie-break.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import torch

from cpfean.checkpoint import checkpoint_fingerprint, load_model, resolve_device
from cpfean.data.region_store import RegionRecord
from cpfean.encode import Matcher, encode_captions, encode_records
from cpfean.first_stage import TWO_STAGE_MIN
from cpfean.index import IndexFormatError, RetrievalIndex, pooled_texts, search_index
from cpfean.index.reader import MAXSIM_RERANK, maxsim_width, query_words

__all__ = [
    "EXPLAIN",
    "Answer",
    "LiveSearcher",
    "QueryError",
    "RankOptions",
    "Result",
    "Searcher",
    "region_weights",
    "top_words",
    "words_of",
]

EXPLAIN = 3  # results explained by default (one extra scoring pass each)
REGIONS_SHOWN = 3  # most important regions reported per explained result


class QueryError(ValueError):
    """A query the model cannot answer (empty, no readable words)."""


def words_of(model: Matcher, txt: Any, weights: torch.Tensor) -> list[tuple[str, float]]:
    """(word, weight) of one caption's valid word slots, word pieces merged.

    Args:
        txt: TextEmbeddings of one caption; weights: [L] per-slot prominence.
    """
    mask = txt.mask[0].cpu()
    ids = txt.token_ids[0].cpu()[mask].tolist()
    tokens = model.tokenizer.convert_ids_to_tokens(ids)
    out: list[tuple[str, float]] = []
    for token, w in zip(tokens, weights.cpu()[mask].tolist(), strict=True):
        if token.startswith("##") and out:
            out[-1] = (out[-1][0] + token[2:], out[-1][1] + w)
        else:
            out.append((token, w))
    return out


def region_weights(details: dict[str, torch.Tensor], b: int, c: int) -> torch.Tensor:
    """[R] importance of each region for pair (b, c): the prominence of the words aligned to
    it (from ``alignment``), plus its fusion gate as a tie-break."""
    gates = details["region_gates"][b, c].float()
    if "alignment" not in details or "word_weights" not in details:
        return gates
    align, ww = details["alignment"][b, c], details["word_weights"][b, c].float()  # [L, k], [L]
    weight = torch.zeros_like(gates)
    valid = align >= 0
    weight.index_add_(0, align[valid].long(), ww[:, None].expand_as(align)[valid].nan_to_num(0.0))
    return weight + 1e-3 * gates


def top_words(words: list[tuple[str, float]], n: int = 3) -> list[str]:
    """The ``n`` most prominent distinct words."""
    out: list[str] = []
    for w, _ in sorted(words, key=lambda x: -x[1]):
        if w not in out:
            out.append(w)
    return out[:n]


class RankOptions(TypedDict, total=False):
    """Keyword options of `Searcher.text_to_images` and `Searcher.image_to_captions`."""

    rerank: int | None  # re-rank this many first-stage candidates (None: automatic)
    exhaustive: bool  # score every item with the full model
    explain: int  # the best results that carry their prominent words and regions
    label: str | None  # text queries: only images with a region of this detected label
    under: str | None  # text queries: only images under this folder of the gallery


class Result(TypedDict, total=False):
    """One ranked item of an `Answer`. Every result has rank, score, row (its index row) and
    image_id; images add id (= image_id), path and hw, captions add caption; the explained
    best ones add words ([word, weight] pairs), prominent_words and regions (box, label,
    weight)."""

    rank: int
    score: float
    row: int
    id: str
    image_id: str
    path: str | None
    hw: list[int]
    caption: str
    words: list[list]
    prominent_words: list[str]
    regions: list[dict]


class Answer(TypedDict, total=False):
    """What a `Searcher` query returns: mode ("text2image", "image2text", "image2image"),
    the query, the ranked results, how the search ran (path, candidates, gallery) and notes
    for the user."""

    mode: str
    query: str
    query_hw: list[int]  # image queries: the image's height and width
    results: list[Result]
    search: dict
    notes: list[str]


class Searcher:
    """A model and the index it built, kept loaded; answers queries with explanations."""

    def __init__(
        self,
        model: Matcher,
        index: RetrievalIndex,
        device: torch.device,
        checkpoint: str = "",
        engine: Any = None,
    ):
        """``engine``: a `cpfean.index.qdrant.QdrantStage` mirroring the index, which then
        picks the candidates of text queries (CPFEAN re-ranks them from the index)."""
        self.model, self.index, self.device, self.checkpoint = model, index, device, checkpoint
        self.engine = engine
        if engine is not None:
            engine.check(index)
        if index.count <= TWO_STAGE_MIN:  # searched exhaustively: keep it in memory if it fits
            index.preload()
        self.max_words = int(getattr(model, "max_words", 32))
        self._rows = {image_id: row for row, image_id in enumerate(index.image_ids)}
        self._captions_of: dict[str, list[str]] = {}
        for caption, owner in zip(index.captions, index.caption_image_ids, strict=True):
            self._captions_of.setdefault(owner, []).append(caption)

    @classmethod
    def open(
        cls,
        index: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        engine: Any = None,
    ) -> Searcher:
        """Load an index and its checkpoint (refusing another one)."""
        idx = RetrievalIndex(index)
        path = str(checkpoint or idx.checkpoint_path)
        if not Path(path).is_file():
            where = "" if checkpoint else f" (recorded in {idx.path / 'index.json'})"
            raise FileNotFoundError(f"checkpoint not found: {path}{where}")
        idx.check_checkpoint(path, checkpoint_fingerprint(path))
        dev = resolve_device(device)
        model, _, _ = load_model(path, dev)
        return cls(model, idx, dev, path, engine)

    def reopened(self) -> Searcher:
        """A searcher over the index now at this one's path (rebuilt or updated since), with
        this model when the index was built by the same checkpoint, else the index's own."""
        index = RetrievalIndex(self.index.path)
        if index.meta["checkpoint"]["sha256"] == self.index.meta["checkpoint"]["sha256"]:
            return Searcher(self.model, index, self.device, self.checkpoint, self.engine)
        return Searcher.open(index.path, None, str(self.device), self.engine)

    # ------------------------------------------------------------------------- lookups
    def row_of(self, image_id: str) -> int:
        """The gallery row of an image id; KeyError when the index does not hold it."""
        return self._rows[image_id]

    def captions_of(self, image_id: str) -> list[str]:
        """The indexed captions of a gallery image (empty when none were indexed)."""
        return list(self._captions_of.get(image_id, []))

    def filter_rows(self, label: str | None = None, under: str | None = None) -> Any:
        """The gallery rows a text query may return: images with a region of detected
        ``label`` and / or under folder ``under``; None when neither is given."""
        within = None
        if label:
            within = self.index.rows_with_label(self._label_id(label))
        if under:
            folder = under.strip().removeprefix("./")
            rows = self.index.rows_under(folder)
            if not len(rows):
                raise QueryError(f"no image of this index lies under folder {under!r}")
            within = rows if within is None else np.intersect1d(within, rows)
        return within

    def _label_id(self, label: str) -> int:
        names = {n.lower(): k for k, n in enumerate(self.index.label_names)}
        if label.strip().lower() not in names:
            shown = ", ".join(sorted(names)[:12]) or "none"
            more = f" and {len(names) - 12} more" if len(names) > 12 else ""
            raise QueryError(f"no detected label {label!r} in this index (labels: {shown}{more})")
        return names[label.strip().lower()]

    def _engine_candidates(
        self,
        encoded: Any,
        top_k: int,
        rerank: int | None,
        label: str | None,
        under: str | None,
    ) -> np.ndarray:
        """The rows the engine picks for a text query (its MaxSim over its pooled neighbours,
        the filters applied there)."""
        words, weights = query_words(encoded)
        n = rerank or MAXSIM_RERANK
        name = self.index.label_names[self._label_id(label)] if label else None
        folder = under.strip().removeprefix("./") if under else None
        ids = self.engine.candidates(
            pooled_texts(encoded)[0],
            words,
            weights,
            max(n, top_k),
            maxsim_width(self.index.count, n, top_k),
            label=name,
            under=folder,
        )
        return np.array([self._rows[i] for i in ids if i in self._rows], dtype=np.int64)

    # ------------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_text(self, query: str) -> tuple[Any, list[str]]:
        """TextEmbeddings of one query, and notes for the user (truncation)."""
        query = " ".join(query.split())
        if not query:
            raise QueryError("the query is empty")
        notes = []
        full = int(self.model.tokenize([query], max_length=1 << 20)["attention_mask"].sum())
        cut = int(self.model.tokenize([query])["attention_mask"].sum())
        if full > cut:
            notes.append(
                f"the query was truncated to its first {self.max_words} word pieces "
                f"(the model's limit); {full - cut} tokens were ignored"
            )
        encoded = encode_captions(self.model, [query], device=self.device)
        if not bool(encoded.mask.any()):
            raise QueryError("the query has no words the model can read")
        return encoded, notes

    @torch.no_grad()
    def encode_record(self, record: RegionRecord) -> Any:
        """ImageEmbeddings of one image's regions."""
        return encode_records(self.model, [record], device=self.device)

    # ------------------------------------------------------------------------ queries
    @torch.no_grad()
    def text_to_images(self, query: str, top_k: int = 10, **options: Unpack[RankOptions]) -> Answer:
        """Gallery images ranked for a caption: {"mode", "query", "results", "notes", ...}
        (``options``: see `RankOptions`)."""
        encoded, notes = self.encode_text(query)
        return {
            **self._rank(encoded, "text2image", top_k, **options),
            "query": " ".join(query.split()),
            "notes": notes,
        }

    @torch.no_grad()
    def image_to_captions(
        self,
        record: RegionRecord,
        top_k: int = 10,
        *,
        query: str = "",
        **options: Unpack[RankOptions],
    ) -> Answer:
        """Indexed captions ranked for one image's regions; ``query`` names the image (a file
        name, say) in the answer, which also gives its size as query_hw (``options``: see
        `RankOptions`)."""
        encoded = self.encode_record(record)
        answer = self._rank(
            encoded, "image2text", top_k, query_geometry=(record.boxes, record.labels), **options
        )
        hw = [int(x) for x in record.image_hw]
        return {**answer, "query": query, "query_hw": hw, "notes": []}

    @torch.no_grad()
    def similar_images(self, image_id: str, top_k: int = 10) -> Answer:
        """Gallery images nearest to a gallery image in the joint space (its pooled region
        embedding against the others', through the index's first stage), itself left out."""
        row = self.row_of(image_id)
        n = self.index.count
        scores, rows = self.index.first_stage("images").search(self.index.pooled[row], top_k + 1)
        found = [
            (int(r), float(s))
            for r, s in zip(rows[0], scores[0], strict=True)
            if r >= 0 and r != row
        ][:top_k]
        results = [self._image_result(rank, r, s) for rank, (r, s) in enumerate(found)]
        return {
            "mode": "image2image",
            "query": image_id,
            "results": results,
            "search": {"path": "pooled cosine", "candidates": n - 1, "gallery": n},
            "notes": [],
        }

    # ----------------------------------------------------------------------- internals
    def _image_result(self, rank: int, row: int, score: float) -> Result:
        return {
            "rank": rank + 1,
            "score": round(score, 6),
            "row": row,
            "id": self.index.image_ids[row],
            "image_id": self.index.image_ids[row],
            "path": self.index.image_path(row),
            "hw": [int(x) for x in self.index.hw[row]],
        }

    def _regions(
        self, boxes: np.ndarray, labels: np.ndarray, weights: list[float], order: list[int]
    ) -> list[dict]:
        floor = 0.05 * max(weights) if weights else 0.0  # no prominent word aligns: skip
        out = []
        for r in order:
            if len(out) == REGIONS_SHOWN:
                break
            if (labels[r] == -1 and not boxes[r].any()) or weights[r] <= floor:
                continue
            names = self.index.label_names
            label = names[labels[r]] if 0 <= labels[r] < len(names) else f"region {r}"
            out.append(
                {
                    "box": [round(float(x), 1) for x in boxes[r]],
                    "label": label,
                    "weight": round(float(weights[r]), 4),
                }
            )
        return out

    def _rank(
        self,
        encoded: Any,
        direction: str,
        top_k: int,
        *,
        rerank: int | None = None,
        exhaustive: bool = False,
        explain: int = EXPLAIN,
        query_geometry: tuple | None = None,
        label: str | None = None,
        under: str | None = None,
    ) -> Answer:
        index, model, device = self.index, self.model, self.device
        if direction == "image2text" and not index.captions:
            raise IndexFormatError(f"index {index.path} holds no captions (build it with captions)")
        if direction == "image2text" and (label or under):
            raise QueryError("label and folder filters choose images, not captions")
        engine = self.engine is not None and direction == "text2image" and not exhaustive
        rows, scores, info = search_index(
            model,
            index,
            encoded,
            direction=direction,
            top_k=top_k,
            rerank=rerank,
            exhaustive=exhaustive,
            device=device,
            within=None if engine else self.filter_rows(label, under),
            candidates=(
                self._engine_candidates(encoded, top_k, rerank, label, under) if engine else None
            ),
        )
        explained = rows[:explain]
        details: dict = {}
        if len(explained):
            if direction == "text2image":
                _, details = model.score(
                    index.images(explained, device), encoded, return_details=True
                )
            else:
                _, details = model.score(
                    encoded, index.caption_embeddings(explained, device), return_details=True
                )
        results: list[Result] = []
        for k, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True)):
            if direction == "text2image":
                r = self._image_result(k, row, float(score))
            else:
                r: Result = {
                    "rank": k + 1,
                    "score": round(float(score), 6),
                    "row": row,
                    "caption": index.captions[row],
                    "image_id": index.caption_image_ids[row],
                }
            if k < len(explained):
                b, c = (k, 0) if direction == "text2image" else (0, k)
                txt = (
                    encoded
                    if direction == "text2image"
                    else index.caption_embeddings(np.array([row]), device)
                )
                words = words_of(model, txt, details["word_weights"][b, c])
                weights = region_weights(details, b, c)
                order = weights.argsort(descending=True).tolist()
                boxes, labels = (
                    (index.boxes[row], index.labels[row])
                    if direction == "text2image"
                    else query_geometry
                )
                r["words"] = [[w, round(float(v), 4)] for w, v in words]
                r["prominent_words"] = top_words(words)
                r["regions"] = self._regions(
                    np.asarray(boxes), np.asarray(labels), weights.tolist(), order
                )
            results.append(r)
        return {"mode": direction, "results": results, "search": info}


class LiveSearcher:
    """The searcher of an index that may be rebuilt or updated while it serves.

    ``current`` is the searcher to answer one request with. At most every ``every`` seconds it
    looks at the index's ``index.json`` (which a build replaces in one rename); when that has
    changed, the new index is loaded and warmed up by ``submit`` (the model threads), and
    requests go on to the old searcher until the new one is ready, so none waits or fails. A
    new index that cannot be loaded is logged and the old one kept until index.json changes
    again.
    """

    def __init__(
        self,
        searcher: Searcher,
        submit: Callable[[Callable[[], Searcher]], Future],
        every: float = 1.0,
    ):
        self._current, self._submit, self._every = searcher, submit, every
        self._seen = self._signature(searcher)
        self._checked = time.monotonic()
        self._loading = False
        self._lock = threading.Lock()

    @staticmethod
    def _signature(searcher: Searcher) -> tuple[int, int, int] | None:
        try:
            st = os.stat(searcher.index.path / "index.json")
        except OSError:  # between two renames of a build: looked at again next time
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def current(self) -> Searcher:
        if self._every > 0 and time.monotonic() - self._checked >= self._every:
            self._check()
        return self._current

    def _check(self) -> None:
        with self._lock:
            self._checked = time.monotonic()
            signature = self._signature(self._current)
            if self._loading or signature is None or signature == self._seen:
                return
            self._loading, self._seen = True, signature
        old = self._current

        def load() -> Searcher:
            new = old.reopened()
            new.text_to_images("warm up", 1)  # lazy set-up before a user's query
            return new

        self._submit(load).add_done_callback(self._loaded)

    def _loaded(self, future: Future) -> None:
        try:
            new = future.result()
        except Exception as e:  # the old index keeps serving
            logging.getLogger("cpfean.serve").error("index not reloaded: %s", e)
        else:
            self._current = new
            logging.getLogger("cpfean.serve").info(
                "index reloaded: %s (%d images)", new.index.path, new.index.count
            )
        finally:
            with self._lock:
                self._loading = False
