"""Images folder -> region store: the extraction driver behind ``pipelines.extract``.

``extract_folder`` runs a `RegionExtractor` over a sorted list of image ids and writes their
records through `RegionWriter`; ids already in the store are skipped, so a re-run after a crash
finishes the job. A re-run on a folder that changed first brings the store in line with it
(`sync_store`): images no longer there are dropped, and a file whose size or modification
time differs from when it was read is dropped and extracted again. Unusable images are listed
with the reason in ``STORE.skipped.jsonl``. With a process group of N ranks, rank r takes every
N-th id, writes ``STORE.rank{r}``, and rank 0 merges them into STORE, swapping the merged copy
into place so that a crash at any point leaves the old store or the new one (``recover_swap``
finishes an interrupted swap).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader

from cpfean.data.region_store import RegionStore, RegionStoreError, RegionWriter, merge_stores
from cpfean.fileio import atomic_output, atomic_write
from cpfean.progress import progress as progress_of
from detector.data import ImageFolder, file_source, shard
from detector.extractor import RegionExtractor

__all__ = ["extract_folder", "extract_images", "recover_swap", "sibling", "sync_store"]


def sibling(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended to its name (the store's companion files)."""
    return path.with_name(path.name + suffix)


def recover_swap(store: Path) -> None:
    """Finish a merge swap that a crash interrupted (STORE moved aside, merged copy ready)."""
    old, merging = sibling(store, ".old"), sibling(store, ".merging")
    if not store.exists() and merging.exists():
        os.replace(merging, store)
    if not store.exists() and old.exists():
        os.replace(old, store)
    if store.exists() and old.exists():
        shutil.rmtree(old)


def extract_images(
    extractor: RegionExtractor,
    root: Path,
    ids: list[str],
    store: Path,
    report: Path,
    *,
    already: Collection[str] = (),
    rejected: Sequence[tuple[str, str]] = (),
    batch_size: int = 4,
    workers: int = 2,
    commit_every: int = 64,
    progress: bool = False,
    desc: str = "extract",
) -> dict[str, int]:
    """Extract ``ids`` (minus those already stored) into ``store``; skipped ones, and the
    ``rejected`` (id, reason) pairs, go to ``report``.

    Returns:
        counts: written, skipped, present (already in a store before this run).
    """
    counts = {"written": 0, "skipped": 0, "present": 0}
    # the images root lets the retrieval index find and draw the images later
    meta = {**extractor.meta, "images_root": str(root.resolve())}
    with (
        RegionWriter(store, meta, commit_every=commit_every) as writer,
        atomic_output(report) as rep,
    ):
        done = writer.done_ids() | set(already)
        todo = [i for i in ids if i not in done]
        counts["present"] = len(ids) - len(todo)
        loader = DataLoader(
            ImageFolder(root, todo, extractor.cfg.REGIONS.MAX_IMAGE_PIXELS),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=list,
        )
        bar = progress_of(total=len(todo), unit="img", desc=desc, enabled=progress)

        def skip(image_id: str, reason: str) -> None:
            line = {"image_id": image_id, "path": str(root / image_id), "reason": reason}
            rep.write(json.dumps(line) + "\n")
            rep.flush()
            counts["skipped"] += 1

        for name, reason in rejected:
            skip(name, reason)
        for batch in loader:
            for item in batch:
                if item.error is not None:
                    skip(item.image_id, item.error)
            for item, record in _detect(extractor, [i for i in batch if i.image is not None], skip):
                writer.put(item.image_id, record, item.source)
                counts["written"] += 1
            bar.update(len(batch))
        bar.close()
    return counts


def sync_store(store: Path, root: Path, ids: Sequence[str], meta: dict) -> dict[str, int]:
    """Bring an existing store in line with the images ``ids`` now under ``root``: drop the
    records of images gone and of files changed since they were read (the run extracts those
    again), and record the source of records from before stores kept one. Refuses a store
    that holds none of these images (another folder's, which a sync would empty).

    Returns:
        counts: removed (gone from the folder), changed (to extract again).
    """
    counts = {"removed": 0, "changed": 0}
    if not (store / "data.mdb").exists():
        return counts
    reader = RegionStore(store)
    try:
        stored, sources, old_root = reader.ids(), reader.sources(), reader.meta.get("images_root")
    finally:
        reader.close()
    listed = set(ids)
    gone = [i for i in stored if i not in listed]
    if stored and len(gone) == len(stored):
        raise RegionStoreError(
            f"region store {store} holds none of the {len(ids)} images under {root} (it was "
            f"extracted from {old_root or 'another folder'}); choose another --out"
        )
    changed, adopt = [], {}
    for image_id in stored:
        if image_id not in listed:
            continue
        try:
            now = file_source(root / image_id)
        except OSError:  # gone since the listing: drop it, the run skips it with the reason
            changed.append(image_id)
            continue
        known = sources.get(image_id, {})
        if "size" not in known:
            adopt[image_id] = now  # written before stores kept sources: taken as it is now
        elif (known["size"], known.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
            changed.append(image_id)
    if gone or changed or adopt or old_root != meta.get("images_root"):
        with RegionWriter(store, meta) as writer:
            counts["removed"] = writer.delete(gone)
            counts["changed"] = writer.delete(changed)
            if adopt:
                writer.adopt_sources(adopt)
            writer.set_meta(images_root=meta.get("images_root"))
    return counts


def _detect(extractor: RegionExtractor, good: list, skip) -> list:
    """(item, record) pairs of a batch; when the batch fails, image by image, so the image at
    fault is skipped with the reason and the rest are kept."""
    try:
        records = extractor([item.image for item in good], image_format="RGB")
        return list(zip(good, records, strict=True))
    except Exception:
        pairs = []
        for item in good:
            try:
                pairs.append((item, extractor([item.image], image_format="RGB")[0]))
            except Exception as e:
                skip(item.image_id, f"detector failed: {type(e).__name__}: {e}")
        return pairs


def _merge_ranks(store: Path, world: int) -> int:
    """Rank 0: merge STORE (if any) and the per-rank stores into STORE; drop the rank files."""
    ranks = [sibling(store, f".rank{r}") for r in range(world)]
    sources = ([store] if store.exists() else []) + [p for p in ranks if p.exists()]
    merging = sibling(store, ".merging")
    if merging.exists():
        shutil.rmtree(merging)
    count = merge_stores(sources, merging)
    if store.exists():
        os.replace(store, sibling(store, ".old"))
    os.replace(merging, store)
    recover_swap(store)
    lines = []
    for r in range(world):
        rep = sibling(store, f".rank{r}.skipped.jsonl")
        if rep.exists():
            lines += rep.read_text(encoding="utf-8").splitlines(keepends=True)
            rep.unlink()
    atomic_write(sibling(store, ".skipped.jsonl"), "".join(lines))
    for path in ranks:
        if path.exists():
            shutil.rmtree(path)
    return count


def extract_folder(
    extractor: RegionExtractor,
    root: Path,
    ids: list[str],
    store: Path,
    *,
    rejected: Sequence[tuple[str, str]] = (),
    rank: int = 0,
    world: int = 1,
    **options,
) -> dict | None:
    """Bring ``store`` up to date with the images ``ids`` under ``root`` (every rank of a
    process group calls it; ``options`` go to `extract_images`).

    Returns (on rank 0; None on the others): images, in_store, skipped, report, and with one
    process written and already_present.
    """
    synced = {"removed": 0, "changed": 0}
    if rank == 0:
        recover_swap(store)
        meta = {**extractor.meta, "images_root": str(root.resolve())}
        synced = sync_store(store, root, ids, meta)
    if world > 1:
        dist.barrier()
    already = set(RegionStore(store).ids()) if world > 1 and store.exists() else set()
    out = store if world == 1 else sibling(store, f".rank{rank}")
    counts = extract_images(
        extractor,
        root,
        shard(ids, rank, world),
        out,
        sibling(out, ".skipped.jsonl"),
        already=already,
        rejected=rejected if rank == 0 else (),
        desc=f"extract[{rank}]" if world > 1 else "extract",
        **options,
    )
    report = sibling(store, ".skipped.jsonl")
    summary = {"images": len(ids) + len(rejected), **synced}
    if world == 1:
        summary.update(in_store=len(RegionStore(store)), skipped=counts["skipped"])
        summary.update(written=counts["written"], already_present=counts["present"])
        return {**summary, "report": str(report)}
    dist.barrier()
    if rank != 0:
        return None
    summary["in_store"] = _merge_ranks(store, world)
    summary["skipped"] = len(report.read_text(encoding="utf-8").splitlines())
    return {**summary, "report": str(report)}
