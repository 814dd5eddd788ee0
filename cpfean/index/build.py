"""Building an index: the gallery encoded in resumable shards, assembled under a temporary name
and renamed into place (layout and guarantees: ``cpfean.index``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.encode import Matcher, encode_captions, encode_records
from cpfean.fileio import WriterLock, atomic_path, fsync_dir
from cpfean.index.codec import TRAIN_REGIONS, CodecError, RegionCodec
from cpfean.index.format import (
    COMPRESSED_VERSION,
    FORMAT,
    VERSION,
    IndexFormatError,
    _class_name,
    _fields,
    _on_disk,
    _save_npy,
    _write_json,
    pooled_images,
    pooled_texts,
)
from cpfean.progress import progress as progress_of

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
    codec: str | None = None,
    exact_copy: bool = False,
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
    if codec:  # digested only when set, so an uncompressed index keeps the key it had
        digest.update(f"codec={codec} exact={exact_copy}".encode())
    return digest.hexdigest()


def _relative(path: str | os.PathLike, index_dir: Path) -> str:
    """``path`` relative to the index directory (found again when both move together)."""
    return os.path.relpath(Path(path).absolute(), index_dir.absolute())


def ids_digest(image_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode("utf-8")).hexdigest()


def images_root_of(store_meta: dict, given: str | None = None) -> str | None:
    """The images root: given, else recorded by the extractor in the store's meta."""
    if given:
        return given
    root = store_meta.get("images_root")
    return str(root) if root else None


# ---------------------------------------------------------------------------------- building
@torch.no_grad()
def _encode_shard(
    model: Matcher, store: Any, ids: Sequence[str], batch_size: int, device: torch.device | str
) -> tuple[Any, dict[str, np.ndarray]]:
    """ImageEmbeddings of ``ids`` plus their geometry arrays (boxes in pixels, labels, hw)."""
    records = [store[i] for i in ids]
    emb = encode_records(model, records, batch_size=batch_size, device=device)
    geometry = {
        "boxes": np.stack([r.boxes for r in records]).astype(np.float32),
        "labels": np.stack([r.labels for r in records]).astype(np.int32),
        "hw": np.asarray([r.image_hw for r in records], dtype=np.int32),
    }
    return emb, geometry


def _write_shard(
    path: Path,
    emb: Any,
    geometry: dict[str, np.ndarray],
    enc: _Encoding,
    codec: RegionCodec | None,
) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = _compressed(emb, codec, enc.exact_copy) if codec else _padded(emb, enc.dtype)
    arrays["pooled"] = pooled_images(emb).astype(np.float16 if codec else np.float32)
    for name, a in {**arrays, **geometry}.items():
        np.save(tmp / f"{name}.npy", a, allow_pickle=False)
    tmp.rename(path)  # a shard directory exists only when whole


def _padded(emb: Any, dtype: str) -> dict[str, np.ndarray]:
    """Every embedding field as it is, [B, R, ...] in the index's float dtype."""
    return {f"emb.{name}": _on_disk(t, dtype) for name, t in _fields(emb).items()}


def _compressed(emb: Any, codec: RegionCodec, exact_copy: bool) -> dict[str, np.ndarray]:
    """The valid regions as codes (and as float16 with ``exact_copy``), each per-region field
    as float16 over the valid regions only; the mask padded; the Gram matrices not at all
    (derived from the decoded regions when read)."""
    fields = _fields(emb)
    mask = fields.pop("mask").cpu().numpy().astype(bool)
    regions = fields.pop("regions").float().cpu().numpy()[mask]
    out = {"emb.mask": mask, "codes": codec.encode(regions)}
    if exact_copy:
        out["ragged.regions"] = regions.astype(np.float16)
    fields.pop("gram", None)  # derived from the decoded regions when read
    for name, t in fields.items():
        if t.shape != mask.shape or not t.is_floating_point():
            raise CodecError(
                f"a codec cannot store the embedding field {name!r} {tuple(t.shape)}: only "
                "per-region numbers beside regions, mask and Gram matrices"
            )
        out[f"ragged.{name}"] = t.float().cpu().numpy()[mask].astype(np.float16)
    return out


def _read_plan(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _assemble(shards: list[Path], dest: Path, names: list[str]) -> None:
    """Concatenate the shards' arrays ``names`` into memory-mapped files under ``dest``."""
    for name in names:
        first = np.load(shards[0] / f"{name}.npy", mmap_mode="r")
        count = sum(len(np.load(s / f"{name}.npy", mmap_mode="r")) for s in shards)
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
    model: Matcher,
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
    force: bool = False,
    codec: str | None = None,
    exact_copy: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> IndexBuild:
    """Encode a gallery (and optionally a caption set) into an index directory at ``out``;
    an index already there that these inputs built (its build key) is kept as it is, unless
    ``force``.

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
        codec: keep the valid regions compressed by this faiss codec (``cpfean.index.codec``,
            e.g. "SQ4"), fitted on a sample of the gallery; None keeps every field as it is.
        exact_copy: with a codec, also keep the valid regions as float16, for the final
            re-rank of the few best.
    Returns:
        the index directory, and whether it was up to date already.
    """
    out = Path(out)
    ids = list(store.ids() if image_ids is None else image_ids)
    if not ids:
        raise IndexFormatError(f"region store {store.path} holds no images to index")
    if exact_copy and not codec:
        raise IndexFormatError(
            "an exact copy of the regions needs a codec (an index without "
            "one holds the exact values already)"
        )
    key = build_key(
        checkpoint_sha256=checkpoint["sha256"],
        store=store,
        image_ids=ids,
        captions=captions,
        caption_image_ids=caption_image_ids,
        dtype=dtype,
        images_root=images_root,
        codec=codec,
        exact_copy=exact_copy,
    )
    if not force and _built_from(out, key):
        return IndexBuild(out, up_to_date=True)
    with WriterLock(out.with_name(f".{out.name}.lock"), f"index {out}"):
        check_replaceable(out)  # now that no other build can change it
        work = out.with_name(out.name + ".building")
        encoding = _Encoding(
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            progress=progress,
            codec=codec,
            exact_copy=exact_copy,
        )
        shards, emb_class = _encode_gallery(
            model, store, ids, work, checkpoint["sha256"], shard_size, encoding, log
        )
        field_names = sorted(p.name[4:-4] for p in shards[0].glob("emb.*.npy"))
        ragged = sorted(p.name[7:-4] for p in shards[0].glob("ragged.*.npy"))
        for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        (tmp / "images").mkdir(parents=True)
        names = [f"emb.{n}" for n in field_names] + ["pooled", "boxes", "labels", "hw"]
        if codec:
            names += ["codes"] + [f"ragged.{n}" for n in ragged]
        _assemble(shards, tmp / "images", names)
        _write_json(tmp / "images" / "ids.json", ids)
        embeddings: dict[str, Any] = {"class": _class_name(emb_class), "fields": field_names}
        if codec:
            embeddings["codec"] = _finish_codec(work, tmp / "images", codec, ragged, exact_copy)
            embeddings["codec"]["derived"] = [
                f.name for f in dataclasses.fields(emb_class) if f.name == "gram"
            ]
        checkpoint = {**checkpoint, "path_from_index": _relative(checkpoint["path"], out)}
        info: dict[str, Any] = {
            "format": FORMAT,
            "version": COMPRESSED_VERSION if codec else VERSION,
            "checkpoint": checkpoint,
            "config": config,
            "regions": str(store.path),
            "regions_from_index": _relative(store.path, out),
            "images_root": images_root,
            "images_root_from_index": _relative(images_root, out) if images_root else None,
            "count": len(ids),
            "ids_sha256": ids_digest(ids),
            "build_key": key,
            "label_names": list(store.meta.get("label_names", [])),
            "dtype": dtype,
            "image_embeddings": embeddings,
            "captions": None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if captions:
            info["captions"] = _index_captions(
                model, tmp / "captions", captions, caption_image_ids, encoding
            )
        _write_json(tmp / "index.json", info)
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        return IndexBuild(out, up_to_date=False)


@dataclasses.dataclass(frozen=True)
class IndexBuild:
    """What `build_index` did: the index folder, and whether it was current already."""

    path: Path
    up_to_date: bool


def _built_from(out: Path, key: str) -> bool:
    """The index at ``out`` was built from exactly the inputs that ``key`` digests."""
    try:
        meta = json.loads((out / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("build_key") == key


@dataclasses.dataclass(frozen=True)
class _Encoding:
    """How a build encodes (batch size, device, progress) and stores (float dtype) embeddings."""

    batch_size: int
    dtype: str
    device: torch.device | str
    progress: bool
    codec: str | None = None
    exact_copy: bool = False


def _encode_gallery(
    model: Matcher,
    store: Any,
    ids: list[str],
    work: Path,
    checkpoint_sha256: str,
    shard_size: int,
    enc: _Encoding,
    log: Callable[[str], None],
) -> tuple[list[Path], type]:
    """Encode the gallery into whole shards under ``work`` (skipping those an interrupted run of
    the same build left); returns the shard folders and the embeddings class."""
    plan = {
        "checkpoint_sha256": checkpoint_sha256,
        "ids_sha256": ids_digest(ids),
        "count": len(ids),
        "shard_size": shard_size,
        "dtype": enc.dtype,
        "store": str(Path(store.path).absolute()),
        "store_content": store.fingerprint() if hasattr(store, "fingerprint") else None,
    }
    if enc.codec:
        plan.update(codec=enc.codec, exact_copy=enc.exact_copy)
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
    codec = _fitted_codec(model, store, ids, work, enc, log) if enc.codec else None
    emb_class = None
    for k in progress_of(todo, desc="encode gallery", unit="shard", enabled=enc.progress):
        emb, geometry = _encode_shard(
            model, store, ids[k * shard_size : (k + 1) * shard_size], enc.batch_size, enc.device
        )
        emb_class = type(emb)
        _write_shard(shards[k], emb, geometry, enc, codec)
    if emb_class is None:  # every shard came from an earlier run: ask the model for the type
        emb_class = type(_encode_shard(model, store, ids[:1], 1, enc.device)[0])
    return shards, emb_class


CODEC_FILE = "codec.npy"


def _fitted_codec(
    model: Matcher,
    store: Any,
    ids: list[str],
    work: Path,
    enc: _Encoding,
    log: Callable[[str], None],
) -> RegionCodec:
    """The build's codec: the one an interrupted run of it fitted, else fitted now on the valid
    regions of up to 4,096 images spread over the gallery (at most ``TRAIN_REGIONS``)."""
    assert enc.codec is not None
    path = work / CODEC_FILE
    if path.is_file():
        return RegionCodec.from_bytes(np.load(path, allow_pickle=False), enc.codec)
    picks = np.unique(np.linspace(0, len(ids) - 1, min(len(ids), 4096)).astype(np.int64))
    sample = []
    for start in range(0, len(picks), 512):
        emb, _ = _encode_shard(
            model, store, [ids[i] for i in picks[start : start + 512]], enc.batch_size, enc.device
        )
        sample.append(emb.regions.float().cpu().numpy()[emb.mask.cpu().numpy().astype(bool)])
    regions = np.concatenate(sample)
    if len(regions) > TRAIN_REGIONS:
        keep = np.random.default_rng(0).choice(len(regions), TRAIN_REGIONS, replace=False)
        regions = regions[np.sort(keep)]
    log(f"fitting codec {enc.codec} on {len(regions)} regions of {len(picks)} images")
    codec = RegionCodec.fit(enc.codec, regions)
    _save_npy(path, codec.to_bytes())
    return codec


def _finish_codec(
    work: Path, dest: Path, codec: str, ragged: list[str], exact_copy: bool
) -> dict[str, Any]:
    """Copy the fitted codec beside the codes, write the images' region offsets, and say in
    index.json how the fields are kept."""
    shutil.copyfile(work / CODEC_FILE, dest / CODEC_FILE)
    mask = np.load(dest / "emb.mask.npy", mmap_mode="r")
    counts = [mask[s : s + 65536].sum(1) for s in range(0, len(mask), 65536)]
    _save_npy(dest / "offsets.npy", np.cumsum(np.concatenate([[0], *counts]), dtype=np.int64))
    code_size = np.load(dest / "codes.npy", mmap_mode="r").shape[1]
    return {
        "factory": codec,
        "code_size": int(code_size),
        "ragged": [n for n in ragged if n != "regions"],
        "exact_copy": exact_copy,
    }


@torch.no_grad()
def _index_captions(
    model: Matcher,
    dest: Path,
    captions: Sequence[str],
    image_ids: Sequence[str] | None,
    enc: _Encoding,
) -> dict:
    dest.mkdir(parents=True)
    txt = encode_captions(
        model, list(captions), batch_size=enc.batch_size, device=enc.device, progress=enc.progress
    )
    for name, t in _fields(txt).items():
        _save_npy(dest / f"emb.{name}.npy", _on_disk(t, enc.dtype))
    _save_npy(dest / "pooled.npy", pooled_texts(txt))
    owners = list(image_ids) if image_ids is not None else [""] * len(captions)
    _write_json(dest / "texts.json", {"captions": list(captions), "image_ids": owners})
    return {
        "count": len(captions),
        "class": _class_name(type(txt)),
        "fields": sorted(f.name for f in dataclasses.fields(txt)),
    }
