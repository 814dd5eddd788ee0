"""Encoding a gallery into resumable shards: each shard a folder of arrays, written under a
temporary name and renamed when whole, so a re-run of an interrupted build skips it; then the
shards concatenated into an index's arrays (``cpfean.index.build``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.encode import Matcher, RecordSource, encode_records
from cpfean.fileio import atomic_path
from cpfean.index.codec import TRAIN_REGIONS, CodecError, RegionCodec
from cpfean.index.format import _fields, _on_disk, _save_npy, _write_json, pooled_images
from cpfean.index.generations import CODEC_FILE, offsets
from cpfean.progress import progress as progress_of


def ids_digest(image_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How a build encodes (batch size, device, progress) and stores (float dtype) embeddings."""

    batch_size: int
    dtype: str
    device: torch.device | str
    progress: bool
    codec: str | None = None
    exact_copy: bool = False


def encode_gallery(
    job: Job, ids: list[str], codec_from: Path | None = None
) -> tuple[list[Path], type]:
    """Encode ``ids`` into whole shards under the work folder (skipping those an interrupted run
    of the same build left), with the codec saved at ``codec_from`` when given, else one fitted
    on the gallery; returns the shard folders and the embeddings class."""
    model, store, work, shard_size, enc, log = (
        job.model,
        job.store,
        job.work,
        job.shard_size,
        job.enc,
        job.log,
    )
    checkpoint_sha256 = job.checkpoint_sha256
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
    codec = fitted_codec(job, ids) if enc.codec else None
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


def fitted_codec(job: Job, ids: list[str]) -> RegionCodec:
    """The build's codec: the one an interrupted run of it fitted, else fitted now on the valid
    regions of up to 4,096 images spread over the gallery (at most ``TRAIN_REGIONS``)."""
    model, store, enc = job.model, job.store, job.enc
    assert enc.codec is not None
    path = job.work / CODEC_FILE
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
    job.log(f"fitting codec {enc.codec} on {len(regions)} regions of {len(picks)} images")
    codec = RegionCodec.fit(enc.codec, regions)
    _save_npy(path, codec.to_bytes())
    return codec


def finish_codec(
    work: Path, dest: Path, codec: str, ragged: list[str], exact_copy: bool
) -> dict[str, Any]:
    """Copy the fitted codec beside the codes, write the images' region offsets, and say in
    index.json how the fields are kept."""
    shutil.copyfile(work / CODEC_FILE, dest / CODEC_FILE)
    _save_npy(dest / "offsets.npy", offsets(dest / "emb.mask.npy"))
    code_size = np.load(dest / "codes.npy", mmap_mode="r").shape[1]
    return {
        "factory": codec,
        "code_size": int(code_size),
        "ragged": [n for n in ragged if n != "regions"],
        "exact_copy": exact_copy,
    }


@dataclasses.dataclass(frozen=True)
class Job:
    """What every step of one build needs."""

    model: Matcher
    store: RecordSource
    out: Path
    checkpoint_sha256: str
    shard_size: int
    enc: Encoding
    log: Callable[[str], None]

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".building")


@torch.no_grad()
def _encode_shard(
    model: Matcher,
    store: RecordSource,
    ids: Sequence[str],
    batch_size: int,
    device: torch.device | str,
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
    enc: Encoding,
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


def assemble(shards: list[Path], dest: Path, names: list[str]) -> None:
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


def array_names(shard: Path) -> list[str]:
    """The arrays of a shard, in the order an index lists them."""
    fields = sorted(p.name[:-4] for p in shard.glob("emb.*.npy"))
    ragged = sorted(p.name[:-4] for p in shard.glob("ragged.*.npy"))
    codes = ["codes"] if (shard / "codes.npy").is_file() else []
    return fields + ["pooled", "boxes", "labels", "hw"] + codes + ragged
