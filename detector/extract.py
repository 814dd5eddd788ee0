"""Images folder -> region store: the extraction driver behind ``pipelines.extract``.

``extract_folder`` runs a `RegionExtractor` over a sorted list of image ids and writes their
records through `RegionWriter`; ids already in the store are skipped, so a re-run after a crash
finishes the job. Unusable images are listed with the reason in ``STORE.skipped.jsonl``. With
a process group of N ranks, rank r takes every N-th id, writes ``STORE.rank{r}``, and rank 0
merges them into STORE, swapping the merged copy into place so that a crash at any point
leaves the old store or the new one (``recover_swap`` finishes an interrupted swap).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader

from cpfean.data.region_store import RegionStore, RegionWriter, merge_stores
from cpfean.fileio import atomic_output, atomic_write
from cpfean.progress import progress as progress_of
from detector.data import ImageFolder, shard
from detector.extractor import RegionExtractor

__all__ = ["extract_folder", "extract_images", "recover_swap", "sibling"]


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
                writer.put(item.image_id, record)
                counts["written"] += 1
            bar.update(len(batch))
        bar.close()
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
    if rank == 0:
        recover_swap(store)
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
    summary = {"images": len(ids) + len(rejected)}
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
