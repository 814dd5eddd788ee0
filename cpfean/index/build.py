"""Building an index: the gallery encoded in resumable shards and assembled into a new
generation folder, which a replaced ``index.json`` then names; an index built by the same model
is updated (only new and changed images encoded, the rest copied). Layout and guarantees:
``cpfean.index``."""

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
    _resolve_class,
    _save_npy,
    _write_json,
    pooled_images,
    pooled_texts,
)
from cpfean.progress import progress as progress_of

# what a build may find in (and so replace) an existing index folder: index.json, the arrays of
# an index from before generations, generation folders, and the temporary files of a killed build
_INDEX_ENTRIES = {"index.json", "images", "captions"}
GENERATION = "gen-{:06d}"


def _ours(name: str) -> bool:
    return (
        name in _INDEX_ENTRIES
        or (name.startswith("gen-") and name[4:].isdigit())
        or (name.startswith(".index.json.") and name.endswith(".tmp"))
    )


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
    foreign = sorted(e for e in entries if not _ours(e))
    first_build_killed = "index.json" not in entries and not foreign and "images" not in entries
    if (fmt != FORMAT and not first_build_killed) or foreign:
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
        # a store that cannot tell its records' digests (a synthetic one) is never updated
        digests = store.digests(ids) if hasattr(store, "digests") else None
        previous = _Previous.read(out)
        update = (
            not force
            and digests is not None
            and previous is not None
            and previous.updatable_by(checkpoint["sha256"], encoding, images_root)
        )
        generation = GENERATION.format(previous.number + 1 if previous else 1)
        dest = out / generation
        shutil.rmtree(dest, ignore_errors=True)  # left by a build that was killed
        (dest / "images").mkdir(parents=True)
        if update:
            assert previous is not None
            counts, emb_class = _update_gallery(
                model,
                store,
                ids,
                digests,
                previous,
                dest / "images",
                work,
                shard_size,
                encoding,
                checkpoint["sha256"],
                log,
            )
        else:
            shards, emb_class = _encode_gallery(
                model, store, ids, work, checkpoint["sha256"], shard_size, encoding, log
            )
            _assemble(shards, dest / "images", _array_names(shards[0]))
            gone = set(previous.ids) - set(ids) if previous else set()
            counts = {"encoded": len(ids), "removed": len(gone), "kept": 0}
        _write_json(dest / "images" / "ids.json", ids)
        if digests is not None:
            _save_npy(dest / "images" / DIGESTS_FILE, np.array(digests, dtype="S32"))
        field_names = sorted(p.name[4:-4] for p in (dest / "images").glob("emb.*.npy"))
        ragged = sorted(p.name[7:-4] for p in (dest / "images").glob("ragged.*.npy"))
        embeddings: dict[str, Any] = {"class": _class_name(emb_class), "fields": field_names}
        if codec:
            embeddings["codec"] = _finish_codec(work, dest / "images", codec, ragged, exact_copy)
            embeddings["codec"]["derived"] = [
                f.name for f in dataclasses.fields(emb_class) if f.name == "gram"
            ]
        checkpoint = {**checkpoint, "path_from_index": _relative(checkpoint["path"], out)}
        info: dict[str, Any] = {
            "format": FORMAT,
            "version": COMPRESSED_VERSION if codec else VERSION,
            "generation": generation,
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
            reused = (
                previous.captions_for(captions, caption_image_ids, checkpoint["sha256"], dtype)
                if (previous and not force)
                else None
            )
            info["captions"] = reused or _index_captions(
                model, dest / "captions", captions, caption_image_ids, encoding
            )
            if reused:
                _link_tree(previous.data / "captions", dest / "captions")
        for folder in (dest / "images", dest / "captions", dest):  # each array synced already
            fsync_dir(folder)
        _write_json(out / "index.json", info)  # the switch: one atomic rename
        fsync_dir(out)
        _drop_generations(out, keep={generation, previous.generation if previous else None})
        shutil.rmtree(work, ignore_errors=True)
        return IndexBuild(out, up_to_date=False, **counts)


@dataclasses.dataclass(frozen=True)
class IndexBuild:
    """What `build_index` did: the index folder, whether it was current already, and how many
    images it encoded, dropped (gone from the gallery) and kept from the index it replaced."""

    path: Path
    up_to_date: bool
    encoded: int = 0
    removed: int = 0
    kept: int = 0


DIGESTS_FILE = "digests.npy"  # [N] the region store's digest of each image's record


@dataclasses.dataclass(frozen=True)
class _Previous:
    """The index a build replaces: its generation folder, meta, ids and record digests."""

    data: Path
    generation: str | None
    meta: dict
    ids: list[str]
    digests: np.ndarray | None

    @property
    def number(self) -> int:
        name = self.generation or ""
        return int(name[4:]) if name.startswith("gen-") and name[4:].isdigit() else 0

    @classmethod
    def read(cls, out: Path) -> _Previous | None:
        """The index at ``out`` (None when there is none, or it cannot be read)."""
        try:
            meta = json.loads((out / "index.json").read_text(encoding="utf-8"))
            generation = meta.get("generation")
            data = out / generation if generation else out
            ids = json.loads((data / "images" / "ids.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        digests_path = data / "images" / DIGESTS_FILE
        digests = np.load(digests_path, allow_pickle=False) if digests_path.is_file() else None
        return cls(data, generation, meta, ids, digests)

    def updatable_by(self, checkpoint_sha256: str, enc: _Encoding, images_root: str | None) -> bool:
        """Whether a build with these settings may keep this index's rows: the same model,
        dtype, codec and images root, and digests to tell unchanged records by."""
        meta, spec = self.meta, self.meta.get("image_embeddings") or {}
        codec = spec.get("codec") or {}
        return (
            self.digests is not None
            and len(self.digests) == len(self.ids) == meta.get("count")
            and meta.get("checkpoint", {}).get("sha256") == checkpoint_sha256
            and meta.get("dtype") == enc.dtype
            and codec.get("factory") == enc.codec
            and bool(codec.get("exact_copy")) == enc.exact_copy
            and meta.get("images_root") == images_root
        )

    def captions_for(
        self,
        captions: Sequence[str],
        image_ids: Sequence[str] | None,
        checkpoint_sha256: str,
        dtype: str,
    ) -> dict | None:
        """This index's caption entry when it encoded exactly these captions with this model."""
        spec = self.meta.get("captions")
        if (
            not spec
            or self.meta.get("checkpoint", {}).get("sha256") != checkpoint_sha256
            or self.meta.get("dtype") != dtype
        ):
            return None
        try:
            texts = json.loads((self.data / "captions" / "texts.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        owners = list(image_ids) if image_ids is not None else [""] * len(captions)
        same = texts.get("captions") == list(captions) and texts.get("image_ids") == owners
        return spec if same else None


def _array_names(shard: Path) -> list[str]:
    """The arrays of a shard, in the order an index lists them."""
    fields = sorted(p.name[:-4] for p in shard.glob("emb.*.npy"))
    ragged = sorted(p.name[:-4] for p in shard.glob("ragged.*.npy"))
    codes = ["codes"] if (shard / "codes.npy").is_file() else []
    return fields + ["pooled", "boxes", "labels", "hw"] + codes + ragged


def _update_gallery(
    model: Matcher,
    store: Any,
    ids: list[str],
    digests: list[str],
    previous: _Previous,
    dest: Path,
    work: Path,
    shard_size: int,
    enc: _Encoding,
    checkpoint_sha256: str,
    log: Callable[[str], None],
) -> tuple[dict[str, int], type]:
    """Write the gallery ``ids`` into ``dest``: rows of images whose record is unchanged copied
    from the previous index, the others encoded (a codec index keeps its fitted codec, so the
    copied codes stay valid). Returns the counts and the embeddings class."""
    assert previous.digests is not None
    position = {image_id: k for k, image_id in enumerate(previous.ids)}
    old_row = np.full(len(ids), -1, dtype=np.int64)
    for k, (image_id, digest) in enumerate(zip(ids, digests, strict=True)):
        j = position.get(image_id, -1)
        if j >= 0 and previous.digests[j].decode() == digest:
            old_row[k] = j
    kept = old_row >= 0
    todo = [image_id for image_id, keep in zip(ids, kept, strict=True) if not keep]
    counts = {
        "encoded": len(todo),
        "removed": len(set(previous.ids) - set(ids)),
        "kept": int(kept.sum()),
    }
    log(f"updating: {counts['kept']} images kept, {len(todo)} to encode, {counts['removed']} gone")
    before = previous.data / "images"
    emb_class = _resolve_class(previous.meta["image_embeddings"]["class"])
    delta = work / "delta"
    names = [p.name[:-4] for p in before.glob("*.npy") if _is_row_array(p.name)]
    if todo:
        shards, emb_class = _encode_gallery(
            model,
            store,
            todo,
            work,
            checkpoint_sha256,
            shard_size,
            enc,
            log,
            codec_from=before / CODEC_FILE if enc.codec else None,
        )
        shutil.rmtree(delta, ignore_errors=True)
        delta.mkdir(parents=True)
        _assemble(shards, delta, _array_names(shards[0]))
    if enc.codec and not todo:  # the codec goes on to the new generation from the work folder
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(before / CODEC_FILE, work / CODEC_FILE)
    new_row = np.where(kept, -1, np.cumsum(~kept) - 1)
    dense = [n for n in names if not n.startswith("ragged.") and n != "codes"]
    for name in dense:
        _merge_rows(
            dest / f"{name}.npy",
            before / f"{name}.npy",
            delta / f"{name}.npy",
            kept,
            np.where(kept, old_row, new_row),
        )
    ragged = [n for n in names if n.startswith("ragged.") or n == "codes"]
    if ragged:
        old_offsets = np.load(before / "offsets.npy", allow_pickle=False)
        new_offsets = _offsets(delta / "emb.mask.npy") if todo else np.zeros(1, np.int64)
        out_counts = np.where(
            kept,
            np.diff(old_offsets)[np.maximum(old_row, 0)],
            np.diff(new_offsets)[np.maximum(new_row, 0)] if todo else 0,
        )
        starts = np.where(
            kept,
            old_offsets[:-1][np.maximum(old_row, 0)],
            new_offsets[:-1][np.maximum(new_row, 0)] if todo else 0,
        )
        out_offsets = np.concatenate([[0], np.cumsum(out_counts)])
        per_row_old = np.repeat(kept, out_counts)
        rows = np.repeat(starts - out_offsets[:-1], out_counts) + np.arange(out_offsets[-1])
        for name in ragged:
            _merge_rows(
                dest / f"{name}.npy",
                before / f"{name}.npy",
                delta / f"{name}.npy",
                per_row_old,
                rows,
            )
    return counts, emb_class


def _is_row_array(name: str) -> bool:
    """An array with one row per image (or per region, for the ragged ones) that an update
    carries over; the codec, offsets and digests are written afresh."""
    return name not in (CODEC_FILE, "offsets.npy", DIGESTS_FILE)


def _offsets(mask_path: Path) -> np.ndarray:
    """[N + 1] start of each image's regions in the ragged arrays, from the padded mask."""
    mask = np.load(mask_path, mmap_mode="r")
    counts = [mask[s : s + 65536].sum(1) for s in range(0, len(mask), 65536)]
    return np.cumsum(np.concatenate([[0], *counts]), dtype=np.int64)


def _merge_rows(
    dest: Path, old: Path, new: Path, from_old: np.ndarray, rows: np.ndarray, chunk: int = 65536
) -> None:
    """``dest[r] = (old if from_old[r] else new)[rows[r]]``, written in chunks."""
    a = np.load(old, mmap_mode="r")
    b = np.load(new, mmap_mode="r") if new.is_file() else a[:0]
    with atomic_path(dest) as tmp:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=a.dtype, shape=(len(rows), *a.shape[1:])
        )
        for s in range(0, len(rows), chunk):
            take, at = from_old[s : s + chunk], rows[s : s + chunk]
            block = np.empty((len(at), *a.shape[1:]), dtype=a.dtype)
            block[take] = a[at[take]]
            block[~take] = b[at[~take]]
            out[s : s + len(at)] = block
        out.flush()
        del out


def _link_tree(src: Path, dest: Path) -> None:
    """``dest`` holding the files of ``src``: hard links where the disk allows, else copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        try:
            os.link(path, dest / path.name)
        except OSError:
            shutil.copyfile(path, dest / path.name)


def _drop_generations(out: Path, keep: set[str | None]) -> None:
    """Remove the generations a build left behind, but the new one and the one it replaced
    (a server may still be answering from that one); arrays from before generations count
    as the generation None."""
    for path in out.iterdir():
        name = path.name
        if name.startswith("gen-") and name not in keep:
            shutil.rmtree(path, ignore_errors=True)
        elif name in ("images", "captions") and None not in keep:
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".index.json.") and name.endswith(".tmp"):
            path.unlink(missing_ok=True)


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
    codec_from: Path | None = None,
) -> tuple[list[Path], type]:
    """Encode the gallery into whole shards under ``work`` (skipping those an interrupted run of
    the same build left), with the codec saved at ``codec_from`` when given, else one fitted
    on the gallery; returns the shard folders and the embeddings class."""
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
    if codec_from is not None and not (work / CODEC_FILE).is_file():
        shutil.copyfile(codec_from, work / CODEC_FILE)

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
    _save_npy(dest / "offsets.npy", _offsets(dest / "emb.mask.npy"))
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
