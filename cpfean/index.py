"""The retrieval index: an encoded gallery on disk, tied to the checkpoint that encoded it.

Layout of an index directory (no pickle anywhere; every array is a ``.npy`` memory map)::

    index.json                  format, version, checkpoint {path, sha256}, config, regions
                                store, images root, count, label names, field specs, created
    images/ids.json             [N] image ids (paths relative to the images root)
    images/emb.<field>.npy      each field of the model's ImageEmbeddings, [N, ...]
                                (regions [N, R, d], mask, gram [N, R, R], gate terms, ...)
    images/pooled.npy           [N, d] float32 unit-norm pooled embeddings (first stage)
    images/boxes.npy            [N, R, 4] float32 xyxy pixels; labels.npy [N, R] int32
                                (-1 = padding); hw.npy [N, 2] int32 (original image h, w)
    captions/texts.json         {"captions": [C] str, "image_ids": [C] str} (optional)
    captions/emb.<field>.npy    each field of the TextEmbeddings, [C, ...]
    captions/pooled.npy         [C, d] float32

Building is resumable: the gallery is encoded in shards of ``shard_size`` images under
``<out>.building/shards/``; a shard is written to a temporary name and renamed when whole, and a
re-run skips whole shards. The final directory is assembled under a temporary name and renamed
into place, so ``<out>/index.json`` exists only for a whole index. One build at a time holds
``.<out>.lock``; a build replaces ``<out>`` only when it is an index (``index.json`` of this
format, nothing foreign beside it) or an empty folder, never another folder. ``index.json``
records a build key over everything that decides the content (checkpoint, store content, ids,
captions, dtype, images root), so a stale index is never taken for an up-to-date one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.arrays import as_numpy
from cpfean.data.dataset import collate_regions, record_arrays
from cpfean.evaluation import encode_texts
from cpfean.fileio import WriterLock, atomic_path, atomic_write_json, fsync_dir
from cpfean.first_stage import (
    DEFAULT_CANDIDATES,
    TWO_STAGE_MIN,
    FirstStage,
    normalise,
    two_stage,
)
from cpfean.first_stage import (
    exhaustive as exhaustive_search,
)
from cpfean.progress import progress as progress_of

FORMAT = "cpfean-index"
VERSION = 1
PRELOAD_MAX_BYTES = 2 << 30  # galleries up to this size (float32) stay in memory when served
# embedding fields renamed since indexes were first written: old files still load
RENAMED_FIELDS = {"gate_ctx": "gate_context"}
IMAGES_ROOT_KEYS = ("images_root", "image_root", "images_dir")  # where a store's meta may say


class IndexFormatError(ValueError):
    """An index is missing, incomplete, of an unknown format or built with another model."""


class IndexMismatchError(IndexFormatError):
    """The index was built with a different checkpoint than the one given."""


# ----------------------------------------------------------------------------------- helpers
def _fields(emb: Any) -> dict[str, torch.Tensor]:
    return {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str) -> type:
    """The embeddings dataclass recorded in index.json (only cpfean's or already imported)."""
    module, _, qualname = name.partition(":")
    if not (module.startswith("cpfean.") or module in sys.modules):
        raise IndexFormatError(
            f"index records embeddings class {name!r}, which is not part of cpfean"
        )
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        raise IndexFormatError(f"index records embeddings class {name!r}, which is not a dataclass")
    return obj


def _on_disk(t: torch.Tensor, dtype: str) -> np.ndarray:
    """An embedding field as stored: floats in the index's dtype, masks and ids as they are."""
    return as_numpy(t, dtype if t.is_floating_point() else None)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=1)


# what a build may find in (and so replace) an existing index folder
_INDEX_ENTRIES = {"index.json", "images", "captions"}


def check_replaceable(out: Path) -> None:
    """Raise IndexFormatError unless ``out`` is absent, an empty folder or an index this code wrote
    with nothing else in it: a build never deletes what it did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise IndexFormatError(f"--out {out} is a file, not an index folder; choose another --out")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    try:
        fmt = json.loads((out / "index.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    foreign = sorted(entries - _INDEX_ENTRIES)
    if fmt != FORMAT or foreign:
        what = f"holds {foreign[0]!r}" if foreign else "has no cpfean index.json"
        raise IndexFormatError(
            f"--out {out} is a folder that is not a cpfean index ({what}); "
            "an index build replaces only an index it wrote; choose another --out"
        )


def build_key(
    *,
    checkpoint_sha256: str,
    store: Any,
    image_ids: Sequence[str],
    captions: Sequence[str] | None,
    caption_image_ids: Sequence[str] | None,
    dtype: str,
    images_root: str | None,
) -> str:
    """A digest of everything that decides an index's content (see the module docstring)."""
    digest = hashlib.sha256()
    store_print = store.fingerprint() if hasattr(store, "fingerprint") else str(store.path)
    for part in (
        checkpoint_sha256,
        store_print,
        ids_digest(image_ids),
        dtype,
        str(Path(images_root).absolute()) if images_root else "",
    ):
        digest.update(part.encode("utf-8") + b"\0")
    digest.update(
        json.dumps(
            [list(captions or []), list(caption_image_ids or [])], ensure_ascii=False
        ).encode("utf-8")
    )
    return digest.hexdigest()


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    if not path.is_file():
        raise IndexFormatError(f"index file missing: {path} (rebuild the index)")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def pooled_images(emb: Any) -> np.ndarray:
    """First-stage vectors of images: [B, d] unit-norm mean of the valid region embeddings."""
    regions, mask = emb.regions.float(), emb.mask.to(emb.regions.device)
    m = mask[..., None].float()
    return normalise(((regions * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy())


def pooled_texts(emb: Any) -> np.ndarray:
    """First-stage vectors of captions: [C, d] unit-norm prominence-weighted mean of words."""
    words, mask = emb.words.float(), emb.mask.to(emb.words.device)
    if hasattr(emb, "log_prominence"):
        w = emb.log_prominence.float().exp().nan_to_num(0.0) * mask
    else:
        w = mask.float()
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    return normalise((words * w[..., None]).sum(1).cpu().numpy())


def _relative(path: str | os.PathLike, index_dir: Path) -> str:
    """``path`` relative to the index directory (found again when both move together)."""
    return os.path.relpath(Path(path).absolute(), index_dir.absolute())


def ids_digest(image_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode("utf-8")).hexdigest()


def images_root_of(store_meta: dict, given: str | None = None) -> str | None:
    """The images root: given, else recorded by the extractor in the store's meta."""
    if given:
        return given
    return next((str(store_meta[k]) for k in IMAGES_ROOT_KEYS if store_meta.get(k)), None)


# ---------------------------------------------------------------------------------- building
@torch.no_grad()
def _encode_shard(
    model: Any, store: Any, ids: Sequence[str], batch_size: int, device: torch.device | str
) -> tuple[Any, dict[str, np.ndarray]]:
    """ImageEmbeddings of ``ids`` plus their geometry arrays (boxes in pixels, labels, hw)."""
    parts, boxes, labels, hws = [], [], [], []
    for start in range(0, len(ids), batch_size):
        records = [store[i] for i in ids[start : start + batch_size]]
        batch = collate_regions([record_arrays(r) for r in records]).to(device)
        parts.append(model.encode_images(*batch.as_tuple()))
        boxes += [r.boxes for r in records]
        labels += [r.labels for r in records]
        hws += [r.image_hw for r in records]
    emb = type(parts[0]).cat(parts) if len(parts) > 1 else parts[0]
    geometry = {
        "boxes": np.stack(boxes).astype(np.float32),
        "labels": np.stack(labels).astype(np.int32),
        "hw": np.asarray(hws, dtype=np.int32),
    }
    return emb, geometry


def _write_shard(path: Path, emb: Any, geometry: dict[str, np.ndarray], dtype: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, t in _fields(emb).items():
        np.save(tmp / f"emb.{name}.npy", _on_disk(t, dtype), allow_pickle=False)
    np.save(tmp / "pooled.npy", pooled_images(emb), allow_pickle=False)
    for name, a in geometry.items():
        np.save(tmp / f"{name}.npy", a, allow_pickle=False)
    tmp.rename(path)  # a shard directory exists only when whole


def _read_plan(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _assemble(shards: list[Path], dest: Path, names: list[str], count: int) -> None:
    """Concatenate the shards' arrays ``names`` into memory-mapped files under ``dest``."""
    for name in names:
        first = np.load(shards[0] / f"{name}.npy", mmap_mode="r")
        with atomic_path(dest / f"{name}.npy") as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=first.dtype, shape=(count, *first.shape[1:])
            )
            row = 0
            for shard in shards:
                part = np.load(shard / f"{name}.npy", mmap_mode="r")
                out[row : row + len(part)] = part
                row += len(part)
            out.flush()
            del out


def build_index(
    model: Any,
    store: Any,
    out: str | os.PathLike,
    *,
    checkpoint: dict[str, str],
    config: dict[str, Any],
    image_ids: Sequence[str] | None = None,
    images_root: str | None = None,
    captions: Sequence[str] | None = None,
    caption_image_ids: Sequence[str] | None = None,
    shard_size: int = 1024,
    batch_size: int = 64,
    dtype: str = "float16",
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """Encode a gallery (and optionally a caption set) into an index directory at ``out``.

    Args:
        model: the matching model (eval mode) with ``encode_images`` / ``encode_texts``.
        store: a RegionStore (``store[id] -> RegionRecord``, ``.meta``, ``.path``).
        checkpoint: {"path": ..., "sha256": ...} of the model's checkpoint.
        config: the resolved config as plain data (recorded in index.json).
        image_ids: gallery ids in order (default: every id of the store).
        captions: captions to index for image -> caption queries; ``caption_image_ids`` [C]
            names the image of each.
        dtype: float dtype on disk for the embeddings ("float16" halves the size; scores
            move by ~1e-3).
    Returns:
        the index directory.
    """
    out = Path(out)
    ids = list(store.ids() if image_ids is None else image_ids)
    if not ids:
        raise IndexFormatError(f"region store {store.path} holds no images to index")
    check_replaceable(out)
    lock = WriterLock(out.with_name(f".{out.name}.lock"), f"index {out}")
    with lock:
        return _build_locked(
            model,
            store,
            out,
            ids,
            checkpoint=checkpoint,
            config=config,
            images_root=images_root,
            captions=captions,
            caption_image_ids=caption_image_ids,
            shard_size=shard_size,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            progress=progress,
            log=log,
        )


def _build_locked(
    model: Any,
    store: Any,
    out: Path,
    ids: list[str],
    *,
    checkpoint: dict[str, str],
    config: dict[str, Any],
    images_root: str | None,
    captions: Sequence[str] | None,
    caption_image_ids: Sequence[str] | None,
    shard_size: int,
    batch_size: int,
    dtype: str,
    device: torch.device | str,
    progress: bool,
    log: Callable[[str], None],
) -> Path:
    check_replaceable(out)  # again, now that no other build can change it
    work = out.with_name(out.name + ".building")
    plan = {
        "checkpoint_sha256": checkpoint["sha256"],
        "ids_sha256": ids_digest(ids),
        "count": len(ids),
        "shard_size": shard_size,
        "dtype": dtype,
        "store": str(Path(store.path).absolute()),
        "store_content": store.fingerprint() if hasattr(store, "fingerprint") else None,
    }
    plan_path = work / "build.json"
    if work.exists() and _read_plan(plan_path) != plan:
        log(
            f"note: {work} belongs to another build (different checkpoint, store or "
            "images); starting over"
        )
        shutil.rmtree(work)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    _write_json(plan_path, plan)

    shards = [work / "shards" / f"{k:05d}" for k in range(0, -(-len(ids) // shard_size))]
    todo = [k for k, s in enumerate(shards) if not s.is_dir()]
    if len(todo) < len(shards):
        log(f"resuming: {len(shards) - len(todo)} of {len(shards)} shards already whole")
    emb_class = None
    for k in progress_of(todo, desc="encode gallery", unit="shard", enabled=progress):
        emb, geometry = _encode_shard(
            model, store, ids[k * shard_size : (k + 1) * shard_size], batch_size, device
        )
        emb_class = type(emb)
        _write_shard(shards[k], emb, geometry, dtype)
    field_names = sorted(p.name[4:-4] for p in shards[0].glob("emb.*.npy"))
    if emb_class is None:  # every shard came from an earlier run: ask the model for the type
        emb_class = type(_encode_shard(model, store, ids[:1], 1, device)[0])

    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    (tmp / "images").mkdir(parents=True)
    _assemble(
        shards,
        tmp / "images",
        [f"emb.{n}" for n in field_names] + ["pooled", "boxes", "labels", "hw"],
        len(ids),
    )
    _write_json(tmp / "images" / "ids.json", ids)
    checkpoint = {**checkpoint, "path_from_index": _relative(checkpoint["path"], out)}
    info: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": checkpoint,
        "config": config,
        "regions": str(store.path),
        "regions_from_index": _relative(store.path, out),
        "images_root": images_root,
        "images_root_from_index": _relative(images_root, out) if images_root else None,
        "count": len(ids),
        "ids_sha256": plan["ids_sha256"],
        "build_key": build_key(
            checkpoint_sha256=checkpoint["sha256"],
            store=store,
            image_ids=ids,
            captions=captions,
            caption_image_ids=caption_image_ids,
            dtype=dtype,
            images_root=images_root,
        ),
        "label_names": list(store.meta.get("label_names", [])),
        "dtype": dtype,
        "image_embeddings": {"class": _class_name(emb_class), "fields": field_names},
        "captions": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if captions:
        info["captions"] = _index_captions(
            model,
            tmp / "captions",
            captions,
            caption_image_ids,
            batch_size,
            dtype,
            device,
            progress,
        )
    _write_json(tmp / "index.json", info)
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return out


@torch.no_grad()
def _index_captions(
    model: Any,
    dest: Path,
    captions: Sequence[str],
    image_ids: Sequence[str] | None,
    batch_size: int,
    dtype: str,
    device: torch.device | str,
    progress: bool,
) -> dict:
    dest.mkdir(parents=True)
    txt = encode_texts(
        model, list(captions), batch_size=batch_size, device=device, progress=progress
    )
    for name, t in _fields(txt).items():
        _save_npy(dest / f"emb.{name}.npy", _on_disk(t, dtype))
    _save_npy(dest / "pooled.npy", pooled_texts(txt))
    owners = list(image_ids) if image_ids is not None else [""] * len(captions)
    _write_json(dest / "texts.json", {"captions": list(captions), "image_ids": owners})
    return {
        "count": len(captions),
        "class": _class_name(type(txt)),
        "fields": sorted(f.name for f in dataclasses.fields(txt)),
    }


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
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise IndexFormatError(
                f"{self.path} is not a {FORMAT} v{VERSION} index "
                f"(format {self.meta.get('format')!r}, "
                f"version {self.meta.get('version')!r})"
            )
        self.count: int = self.meta["count"]
        self.label_names: list[str] = self.meta.get("label_names", [])
        self._image_cls = _resolve_class(self.meta["image_embeddings"]["class"])
        self._image_fields = {
            RENAMED_FIELDS.get(n, n): _load_npy(self.path / "images" / f"emb.{n}.npy")
            for n in self.meta["image_embeddings"]["fields"]
        }
        self.pooled = _load_npy(self.path / "images" / "pooled.npy")  # [N, d]
        self.boxes = _load_npy(self.path / "images" / "boxes.npy")  # [N, R, 4] pixels
        self.labels = _load_npy(self.path / "images" / "labels.npy")  # [N, R]
        self.hw = _load_npy(self.path / "images" / "hw.npy")  # [N, 2]
        self.image_ids: list[str] = json.loads(
            (self.path / "images" / "ids.json").read_text(encoding="utf-8")
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
            texts = json.loads((self.path / "captions" / "texts.json").read_text("utf-8"))
            self.captions, self.caption_image_ids = texts["captions"], texts["image_ids"]
            self._text_cls = _resolve_class(cap["class"])
            self._text_fields = {
                RENAMED_FIELDS.get(n, n): _load_npy(self.path / "captions" / f"emb.{n}.npy")
                for n in cap["fields"]
            }
            self.caption_pooled = _load_npy(self.path / "captions" / "pooled.npy")
        self._first: dict[str, FirstStage] = {}
        self._images_root = self._locate(
            self.meta.get("images_root"), self.meta.get("images_root_from_index")
        )

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
        size = sum(
            a.size * (4 if np.issubdtype(a.dtype, np.floating) else a.itemsize)
            for a in self._image_fields.values()
        )
        if size > max_bytes:
            return False
        self._image_cache = self._rows(self._image_fields, self._image_cls, slice(None), "cpu")
        return True

    def images(self, rows: np.ndarray | slice, device: torch.device | str = "cpu") -> Any:
        """The ImageEmbeddings of gallery ``rows`` (float32 on ``device``)."""
        cache = getattr(self, "_image_cache", None)
        if cache is None:
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

    def first_stage(self, which: str = "images", kind: str = "auto") -> FirstStage:
        """The faiss first stage over the pooled image (or caption) vectors, built once."""
        key = f"{which}:{kind}"
        if key not in self._first:
            pooled = self.pooled if which == "images" else self.caption_pooled
            self._first[key] = FirstStage(
                pooled, kind=kind, cache=self.path / which / f"first_stage_{kind}.faiss"
            )
        return self._first[key]


# ----------------------------------------------------------------------------------- search
@torch.no_grad()
def search(
    model: Any,
    index: RetrievalIndex,
    query: Any,
    *,
    direction: str = "text2image",
    top_k: int = 10,
    first_stage: int | None = None,
    exhaustive: bool = False,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Rank the gallery (images, or indexed captions) for one encoded query.

    Args:
        query: TextEmbeddings of one caption (text2image) or ImageEmbeddings of one image
            (image2text), on ``device``.
        first_stage: re-rank this many first-stage candidates; None = automatic (two-stage
            above ``TWO_STAGE_MIN`` items with ``DEFAULT_CANDIDATES`` candidates).
        exhaustive: score every item with the full model (overrides ``first_stage``).
    Returns:
        rows [k], scores [k] (CPFEAN scores, best first) and {"path": "exhaustive" |
        "two-stage", "candidates": n, "gallery": N}.
    """
    if direction == "text2image":
        size, pooled_query = index.count, pooled_texts(query)[0]

        def score_rows(rows: np.ndarray) -> np.ndarray:
            return (
                model.score(index.images(rows, device), query, image_chunk=chunk, text_chunk=1)[
                    :, 0
                ]
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

        def score_rows(rows: np.ndarray) -> np.ndarray:
            return (
                model.score(
                    query, index.caption_embeddings(rows, device), image_chunk=1, text_chunk=chunk
                )[0]
                .float()
                .cpu()
                .numpy()
            )
    else:
        raise ValueError(f"unknown direction {direction!r}")
    use_first = not exhaustive and (first_stage is not None or size > TWO_STAGE_MIN)
    if not use_first:
        rows, scores = exhaustive_search(score_rows, size, top_k, chunk=chunk)
        return rows, scores, {"path": "exhaustive", "candidates": size, "gallery": size}
    n = first_stage or DEFAULT_CANDIDATES
    which = "images" if direction == "text2image" else "captions"
    rows, scores = two_stage(pooled_query, index.first_stage(which), score_rows, top_k, n)
    return (
        rows,
        scores,
        {"path": "two-stage", "candidates": min(max(n, top_k), size), "gallery": size},
    )
