"""``python -m pipelines.extract IMAGES_DIR [--out STORE] [options] [KEY VALUE ...]``

Images folder -> region store (up to REGIONS.MAX_REGIONS, 36 by default, regions per image),
resumable and shardable.

- Walks IMAGES_DIR recursively (jpg/jpeg/png/webp/bmp, any case); image id = path relative to
  IMAGES_DIR with / separators. Ids already in the store are skipped, so a re-run after a crash
  (even ``kill -9``) finishes the job: the store keeps only whole records.
- A re-run on a folder that changed brings the store in line with it: images deleted from the
  folder are dropped from the store, and a file whose size or modification time differs from
  when it was read is extracted again (``removed`` and ``changed`` in the summary). A store
  that holds none of the folder's images (another folder's) is refused, not emptied.
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
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cpfean.data.region_store import RegionStoreError, store_lock
from detector.config import DEFAULT_DETECTOR, TRAINED_DEFAULT, get_region_cfg
from detector.data import list_images
from detector.extract import extract_folder
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
        lock = store_lock(store)
        if world == 1 and lock.is_held_elsewhere():  # say so before the detector loads
            raise ValueError(f"region store {store} is being written by {lock.holder()}")
        if cfg.MODEL.WEIGHTS:
            check_weights_file(cfg.MODEL.WEIGHTS)
    except (OSError, ValueError, AssertionError, KeyError) as e:
        return cli.fail(e)
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    try:
        start = time.time()
        try:
            extractor = RegionExtractor(cfg)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            if world > 1:
                raise
            return cli.fail(e)
        try:
            summary = extract_folder(
                extractor,
                root,
                ids,
                store,
                rejected=rejected,
                rank=rank,
                world=world,
                batch_size=args.batch_size or cfg.REGIONS.IMAGES_PER_BATCH,
                workers=args.workers,
                commit_every=args.commit_every,
                progress=not args.no_progress,
            )
        except RegionStoreError as e:
            if world > 1:
                raise  # torchrun then stops every rank instead of leaving them at the barrier
            return cli.fail(e)
        if summary is None:  # a rank other than 0: rank 0 reports
            return EXIT_OK
        report, skipped = summary.pop("report"), summary["skipped"]
        print(
            json.dumps(
                {
                    "store": str(store),
                    **{k: summary.pop(k) for k in ("images", "in_store", "skipped")},
                    "seconds": round(time.time() - start, 1),
                    **summary,
                }
            )
        )
        if skipped:
            print(f"extract: {skipped} image(s) skipped, reasons in {report}", file=sys.stderr)
        return EXIT_SKIPPED if skipped and world == 1 else EXIT_OK
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
