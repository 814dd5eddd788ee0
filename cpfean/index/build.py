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

from cpfean.encode import Matcher, RecordSource, encode_captions
from cpfean.fileio import WriterLock, fsync_dir
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
    pooled_texts,
)
from cpfean.index.generations import (
    CODEC_FILE,
    DIGESTS_FILE,
    GENERATION,
    PreviousIndex,
    UpdatePlan,
    carry_rows,
    drop_generations,
    is_index_entry,
    link_tree,
)
from cpfean.index.shards import (
    Encoding,
    Job,
    array_names,
    assemble,
    encode_gallery,
    finish_codec,
    ids_digest,
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
    foreign = sorted(e for e in entries if not is_index_entry(e))
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
    store: RecordSource,
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


def images_root_of(store_meta: dict, given: str | None = None) -> str | None:
    """The images root: given, else recorded by the extractor in the store's meta."""
    if given:
        return given
    root = store_meta.get("images_root")
    return str(root) if root else None


# ---------------------------------------------------------------------------------- building
def build_index(
    model: Matcher,
    store: RecordSource,
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
        encoding = Encoding(
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            progress=progress,
            codec=codec,
            exact_copy=exact_copy,
        )
        job = Job(model, store, out, checkpoint["sha256"], shard_size, encoding, log)
        previous = PreviousIndex.read(out)
        generation = GENERATION.format(previous.number + 1 if previous else 1)
        dest = out / generation
        shutil.rmtree(dest, ignore_errors=True)  # left by a build that was killed
        (dest / "images").mkdir(parents=True)
        counts, embeddings = _write_gallery(job, ids, dest / "images", previous, images_root, force)
        info = _index_info(job, ids, key, config, images_root, embeddings, checkpoint)
        info["generation"] = generation
        if captions:
            reused = (
                previous
                and not force
                and previous.captions_for(captions, caption_image_ids, checkpoint["sha256"], dtype)
            )
            if reused:
                link_tree(previous.data / "captions", dest / "captions")
            info["captions"] = reused or _index_captions(
                model, dest / "captions", captions, caption_image_ids, encoding
            )
        for folder in (dest / "images", dest / "captions", dest):  # each array synced already
            fsync_dir(folder)
        _write_json(out / "index.json", info)  # the switch: one atomic rename
        fsync_dir(out)
        drop_generations(out, keep={generation, previous.generation if previous else None})
        shutil.rmtree(job.work, ignore_errors=True)
        return IndexBuild(out, up_to_date=False, **counts)


def _write_gallery(
    job: Job,
    ids: list[str],
    dest: Path,
    previous: PreviousIndex | None,
    images_root: str | None,
    force: bool,
) -> tuple[dict[str, int], dict[str, Any]]:
    """The gallery's arrays in ``dest``: an update of ``previous`` when it allows one, else
    every image encoded. Returns the counts and index.json's ``image_embeddings`` entry."""
    enc = job.enc
    # a store that cannot tell its records' digests (a synthetic one) is never updated
    digests = job.store.digests(ids) if hasattr(job.store, "digests") else None
    update = (
        not force
        and digests is not None
        and previous is not None
        and previous.updatable_by(
            job.checkpoint_sha256, enc.dtype, enc.codec, enc.exact_copy, images_root
        )
    )
    if update:
        assert previous is not None and digests is not None
        counts, emb_class = _update_gallery(job, ids, digests, previous, dest)
    else:
        shards, emb_class = encode_gallery(job, ids)
        assemble(shards, dest, array_names(shards[0]))
        gone = set(previous.ids) - set(ids) if previous else set()
        counts = {"encoded": len(ids), "removed": len(gone), "kept": 0}
    _write_json(dest / "ids.json", ids)
    if digests is not None:
        _save_npy(dest / DIGESTS_FILE, np.array(digests, dtype="S32"))
    fields = sorted(p.name[4:-4] for p in dest.glob("emb.*.npy"))
    embeddings: dict[str, Any] = {"class": _class_name(emb_class), "fields": fields}
    if enc.codec:
        ragged = sorted(p.name[7:-4] for p in dest.glob("ragged.*.npy"))
        spec = finish_codec(job.work, dest, enc.codec, ragged, enc.exact_copy)
        spec["derived"] = [f.name for f in dataclasses.fields(emb_class) if f.name == "gram"]
        embeddings["codec"] = spec
    return counts, embeddings


def _index_info(
    job: Job,
    ids: list[str],
    key: str,
    config: dict[str, Any],
    images_root: str | None,
    embeddings: dict[str, Any],
    checkpoint: dict[str, str],
) -> dict[str, Any]:
    """index.json of a build (its generation and captions filled in by the caller)."""
    out, store = job.out, job.store
    return {
        "format": FORMAT,
        "version": COMPRESSED_VERSION if job.enc.codec else VERSION,
        "checkpoint": {**checkpoint, "path_from_index": _relative(checkpoint["path"], out)},
        "config": config,
        "regions": str(store.path),
        "regions_from_index": _relative(store.path, out),
        "images_root": images_root,
        "images_root_from_index": _relative(images_root, out) if images_root else None,
        "count": len(ids),
        "ids_sha256": ids_digest(ids),
        "build_key": key,
        "label_names": list(store.meta.get("label_names", [])),
        "dtype": job.enc.dtype,
        "image_embeddings": embeddings,
        "captions": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclasses.dataclass(frozen=True)
class IndexBuild:
    """What `build_index` did: the index folder, whether it was current already, and how many
    images it encoded, dropped (gone from the gallery) and kept from the index it replaced."""

    path: Path
    up_to_date: bool
    encoded: int = 0
    removed: int = 0
    kept: int = 0


def _update_gallery(
    job: Job, ids: list[str], digests: list[str], previous: PreviousIndex, dest: Path
) -> tuple[dict[str, int], type]:
    """Write the gallery ``ids`` into ``dest``: rows of images whose record is unchanged
    carried from the previous index, the others encoded (a codec index keeps its fitted codec,
    so the carried codes stay valid). Returns the counts and the embeddings class."""
    plan = UpdatePlan.of(previous, ids, digests)
    counts = plan.counts
    job.log(
        f"updating: {counts['kept']} images kept, {counts['encoded']} to encode, "
        f"{counts['removed']} gone"
    )
    before = previous.data / "images"
    kept_codec = before / CODEC_FILE if job.enc.codec else None
    emb_class = _resolve_class(previous.meta["image_embeddings"]["class"])
    delta = job.work / "delta"
    if plan.todo:
        shards, emb_class = encode_gallery(job, plan.todo, codec_from=kept_codec)
        shutil.rmtree(delta, ignore_errors=True)
        delta.mkdir(parents=True)
        assemble(shards, delta, array_names(shards[0]))
    elif kept_codec is not None:  # the codec goes on to the new generation from the work folder
        job.work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept_codec, job.work / CODEC_FILE)
    carry_rows(before, delta, dest, plan)
    return counts, emb_class


def _built_from(out: Path, key: str) -> bool:
    """The index at ``out`` was built from exactly the inputs that ``key`` digests."""
    try:
        meta = json.loads((out / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("build_key") == key


@torch.no_grad()
def _index_captions(
    model: Matcher,
    dest: Path,
    captions: Sequence[str],
    image_ids: Sequence[str] | None,
    enc: Encoding,
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
