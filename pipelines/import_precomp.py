"""``python -m pipelines.import_precomp DIR [--splits train,dev,...] [--karpathy JSON]``

Published precomputed features (SCAN / VSE-infinity ``f30k_precomp``, ``coco_precomp``) ->
one region store and one JSONL caption file, every split present, ids and split names kept.

- Reads, per split, ``DIR/{split}_ims.npy`` ([rows, 36, D] float, memory-mapped),
  ``DIR/{split}_caps.txt`` (one caption per line) and, when present, ``DIR/{split}_ids.txt``
  (one image id per line: Flickr30K photo ids, COCO image ids). Splits: every published one
  present (``train``, ``dev``, ``test``, ``testall``), or ``--splits``.
- SCAN's rule for rows: 5 captions per row -> one row per image; as many rows as captions ->
  one row per caption, five consecutive rows per image (image k is row 5k, as SCAN's
  evaluation takes every fifth). Any other count is an error naming the files and counts; so
  is an ids file whose length fits neither the images nor the rows.
- Image ids: the ids file's, or, with ``--karpathy dataset_{flickr30k,coco}.json``, the
  Karpathy image id each maps to (``filepath/filename``: the key an extracted store of the same
  images has), so the store joins the Karpathy captions and the raw images. Without an ids file,
  ``{split}/{k:06d}``. An image in several splits (COCO's ``test`` is part of ``testall``) is
  stored once; its rows must agree.
- Every region is valid (36); there are no boxes, labels or image sizes, and the meta says so
  (``has_boxes``, ``has_labels`` false): training then switches the spatial and label priors
  off, with one logged line.
- Captions go to ``DIR/captions.jsonl`` (``{"image", "caption", "split"}`` per line), the store
  to ``DIR/regions.lmdb``. Resumable: ids already in the store are skipped, so a re-run after a
  crash (even ``kill -9``) finishes the job; a store imported from another folder is refused.

Exit status: 0 = done; 2 = missing or malformed input, or an incompatible existing store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpfean.data.precomp import import_precomp, present_splits
from pipelines import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m pipelines.import_precomp", __doc__)
    p.add_argument(
        "dir",
        type=Path,
        help="folder holding {split}_ims.npy, {split}_caps.txt and {split}_ids.txt",
    )
    p.add_argument(
        "--splits",
        "--split",
        dest="splits",
        help="comma-separated splits (default: every split present)",
    )
    p.add_argument(
        "--karpathy",
        type=Path,
        help="dataset_flickr30k.json / dataset_coco.json: store Karpathy image ids",
    )
    p.add_argument("--out", type=Path, help="region store (default DIR/regions.lmdb)")
    p.add_argument("--captions-out", type=Path, help="JSONL captions (default DIR/captions.jsonl)")
    p.add_argument("--commit-every", type=int, default=256, help="records per transaction")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.commit_every < 1:
        return cli.fail(f"--commit-every must be >= 1, got {args.commit_every}")
    out = args.out or args.dir / "regions.lmdb"
    captions_out = args.captions_out or args.dir / "captions.jsonl"
    try:
        splits = (
            [s.strip() for s in args.splits.split(",") if s.strip()]
            if args.splits
            else present_splits(args.dir)
        )
        if args.karpathy is not None and not args.karpathy.is_file():
            raise FileNotFoundError(f"--karpathy {args.karpathy} not found")
        counts = import_precomp(
            args.dir,
            splits,
            out,
            captions_out,
            karpathy=args.karpathy,
            commit_every=args.commit_every,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as e:  # RegionStoreError is a ValueError
        return cli.fail(e)
    for split, c in counts.items():
        print(
            f"{split:>8}: {c['images']} images, {c['captions']} captions "
            f"({c['written']} written now, {c['present']} already there)"
        )
    print(f"regions:  {out}")
    print(f"captions: {captions_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
