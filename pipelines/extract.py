"""``python -m pipelines.extract IMAGES_DIR [--out STORE] [options] [KEY VALUE ...]``

Images folder -> region store (36 regions per image), resumable and shardable.

- Walks IMAGES_DIR recursively (jpg/jpeg/png/webp/bmp, any case); image id = path relative to
  IMAGES_DIR with / separators. Ids already in the store are skipped, so a re-run after a crash
  (even ``kill -9``) finishes the job: the store keeps only whole records.
- Images are decoded in DataLoader worker processes and run through `RegionExtractor` in
  batches; records are written through `RegionWriter` in transactions.
- Unusable images (empty, not an image, truncated/corrupt, > REGIONS.MAX_IMAGE_PIXELS) and
  file names that cannot be image ids (not UTF-8, a backslash, longer than a store key) are
  skipped and listed with the reason in ``STORE.skipped.jsonl`` (rewritten by each run).
- One run writes a store at a time (a second is refused, naming the first). Arguments, the
  config and the detector weights are checked before the store is created or changed.
- Under ``torchrun --nproc_per_node N``, rank r takes every N-th image of the sorted list,
  writes ``STORE.rank{r}``, and rank 0 merges all into STORE at the end (gloo barrier).

Exit status: 0 = every image is in the store; 3 = some images were skipped (see the report);
2 = bad arguments, config or an incompatible existing store. Under torchrun every rank exits 0
when the run completes (a non-zero rank status would make torchrun report a crash); rank 0
prints the skip count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from cpfean.data.region_store import RegionStore, RegionStoreError, RegionWriter, merge_stores
from cpfean.fileio import WriterLock, atomic_output, atomic_write
from cpfean.progress import progress as progress_of
from detector.config import DEFAULT_DETECTOR, TRAINED_DEFAULT, get_region_cfg
from detector.data import ImageFolder, list_images, shard
from detector.extractor import RegionExtractor, check_weights_file
from pipelines import cli

EXIT_OK, EXIT_USAGE, EXIT_SKIPPED = 0, 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m pipelines.extract", __doc__)
    p.add_argument("images", type=Path, help="images root folder (walked recursively)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="region store to write (default: IMAGES_DIR + '_regions.lmdb')",
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"detector config: a YAML path or a bundled name (default: "
        f"{TRAINED_DEFAULT} when present, else {DEFAULT_DETECTOR})",
    )
    p.add_argument("--weights", default=None, help="checkpoint (overrides MODEL.WEIGHTS)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward pass (default: the config's REGIONS.IMAGES_PER_BATCH)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per process (0: cores / processes)",
    )
    p.add_argument("--commit-every", type=int, default=64, help="records per transaction")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("opts", nargs="*", help="config overrides: KEY VALUE ... or KEY=VALUE ...")
    return p.parse_intermixed_args(argv)


def _rank_world() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first out-of-range option."""
    for name, low in (("batch_size", 1), ("workers", 0), ("threads", 0), ("commit_every", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")


def build_cfg(args: argparse.Namespace, local_rank: int, world: int):
    """The frozen region config from the command line."""
    config = args.config or (
        str(TRAINED_DEFAULT) if TRAINED_DEFAULT.is_file() else DEFAULT_DETECTOR
    )
    opts = list(args.opts)
    if args.weights is not None:
        opts += ["MODEL.WEIGHTS", args.weights]
    if args.device is not None:
        opts += ["MODEL.DEVICE", args.device]
    cfg = get_region_cfg(config, opts, freeze=False)
    if cfg.MODEL.DEVICE == "cuda" and world > 1:
        cfg.MODEL.DEVICE = f"cuda:{local_rank}"
    cfg.freeze()
    return cfg


def _recover_swap(store: Path) -> None:
    """Finish a merge swap that a crash interrupted (STORE moved aside, merged copy ready)."""
    old, merging = _sibling(store, ".old"), _sibling(store, ".merging")
    if not store.exists() and merging.exists():
        os.replace(merging, store)
    if not store.exists() and old.exists():
        os.replace(old, store)
    if store.exists() and old.exists():
        shutil.rmtree(old)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def extract_shard(
    extractor: RegionExtractor,
    root: Path,
    ids: list[str],
    store: Path,
    report: Path,
    *,
    already: set[str],
    rejected: list[tuple[str, str]],
    batch_size: int,
    workers: int,
    commit_every: int,
    max_pixels: int,
    progress: bool,
    desc: str,
) -> dict[str, int]:
    """Extract `ids` (minus those already stored) into `store`; skipped ones go to `report`.

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
        done = writer.done_ids() | already
        todo = [i for i in ids if i not in done]
        counts["present"] = len(ids) - len(todo)
        loader = DataLoader(
            ImageFolder(root, todo, max_pixels),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=list,
        )
        bar = progress_of(total=len(todo), unit="img", desc=desc, enabled=progress)

        def skip(image_id: str, reason: str) -> None:
            rep.write(
                json.dumps({"image_id": image_id, "path": str(root / image_id), "reason": reason})
                + "\n"
            )
            rep.flush()
            counts["skipped"] += 1

        for name, reason in rejected:
            skip(name, reason)

        for batch in loader:
            good = [item for item in batch if item.image is not None]
            for item in batch:
                if item.error is not None:
                    skip(item.image_id, item.error)
            try:
                records = extractor([item.image for item in good], image_format="RGB")
                pairs = list(zip(good, records, strict=True))
            except Exception:  # find the image at fault, keep the rest
                pairs = []
                for item in good:
                    try:
                        pairs.append((item, extractor([item.image], image_format="RGB")[0]))
                    except Exception as e:
                        skip(item.image_id, f"detector failed: {type(e).__name__}: {e}")
            for item, record in pairs:
                writer.put(item.image_id, record)
                counts["written"] += 1
            bar.update(len(batch))
        bar.close()
    return counts


def _merge(store: Path, world: int) -> int:
    """Rank 0: merge STORE (if any) and the per-rank stores into STORE; drop the rank files."""
    ranks = [_sibling(store, f".rank{r}") for r in range(world)]
    sources = ([store] if store.exists() else []) + [p for p in ranks if p.exists()]
    merging = _sibling(store, ".merging")
    if merging.exists():
        shutil.rmtree(merging)
    count = merge_stores(sources, merging)
    if store.exists():
        os.replace(store, _sibling(store, ".old"))
    os.replace(merging, store)
    _recover_swap(store)
    lines = []
    for r in range(world):
        rep = _sibling(store, f".rank{r}.skipped.jsonl")
        if rep.exists():
            lines += rep.read_text(encoding="utf-8").splitlines(keepends=True)
            rep.unlink()
    atomic_write(_sibling(store, ".skipped.jsonl"), "".join(lines))
    for path in ranks:
        if path.exists():
            shutil.rmtree(path)
    return count


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, local_rank = _rank_world()
    root = args.images.resolve()
    store = (args.out or Path(str(args.images).rstrip("/") + "_regions.lmdb")).resolve()
    rejected: list[tuple[str, str]] = []
    try:
        check_args(args)
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
        cfg = build_cfg(args, local_rank, world)
        ids = list_images(root, rejected)
        if store.exists() and not store.is_dir():
            raise ValueError(f"--out {store} is a file, not a region store")
        lock = WriterLock(store / "writer.lock", f"region store {store}")
        if world == 1 and lock.is_held_elsewhere():  # say so before the detector loads
            raise ValueError(f"region store {store} is being written by {lock.holder()}")
        if cfg.MODEL.WEIGHTS:
            check_weights_file(cfg.MODEL.WEIGHTS)
    except (OSError, ValueError, AssertionError, KeyError) as e:
        return cli.fail(e)
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    try:
        if rank == 0:
            _recover_swap(store)
        if world > 1:
            dist.barrier()
        start = time.time()
        try:
            extractor = RegionExtractor(cfg)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            if world > 1:
                raise
            return cli.fail(e)
        already = set(RegionStore(store).ids()) if world > 1 and store.exists() else set()
        mine = shard(ids, rank, world)
        out = store if world == 1 else _sibling(store, f".rank{rank}")
        report = _sibling(out, ".skipped.jsonl")
        try:
            counts = extract_shard(
                extractor,
                root,
                mine,
                out,
                report,
                already=already,
                rejected=rejected if rank == 0 else [],
                batch_size=args.batch_size or cfg.REGIONS.IMAGES_PER_BATCH,
                workers=args.workers,
                commit_every=args.commit_every,
                max_pixels=cfg.REGIONS.MAX_IMAGE_PIXELS,
                progress=not args.no_progress,
                desc=f"extract[{rank}]" if world > 1 else "extract",
            )
        except RegionStoreError as e:
            if world > 1:
                raise  # torchrun then stops every rank instead of leaving them at the barrier
            return cli.fail(e)
        if world > 1:
            dist.barrier()
            if rank != 0:
                return EXIT_OK
            total = _merge(store, world)
            skipped = len(
                _sibling(store, ".skipped.jsonl").read_text(encoding="utf-8").splitlines()
            )
        else:
            total, skipped = len(RegionStore(store)), counts["skipped"]
        summary = {
            "store": str(store),
            "images": len(ids) + len(rejected),
            "in_store": total,
            "skipped": skipped,
            "seconds": round(time.time() - start, 1),
        }
        if world == 1:
            summary.update(written=counts["written"], already_present=counts["present"])
        print(json.dumps(summary))
        if skipped:
            print(
                f"extract: {skipped} image(s) skipped, reasons in "
                f"{_sibling(store, '.skipped.jsonl')}",
                file=sys.stderr,
            )
        return EXIT_SKIPPED if skipped and world == 1 else EXIT_OK
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
