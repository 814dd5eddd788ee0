"""Generate the bundled captioned-scene data set (images, captions, detection boxes).

    python -m pipelines.make_demo_data OUT --images 500 --seed 0 [--size 320x240] [--workers 2]

Writes `OUT/images/*.jpg`, `OUT/instances_{train,val,test}.json` (COCO detection) and, last,
`OUT/captions.json` (Karpathy split format); see `cpfean.scenes.generate`. A run that stops early
leaves no `captions.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cpfean.progress import progress as progress_of
from cpfean.scenes.generate import generate_dataset, split_sizes
from cpfean.scenes.photos import catalogue
from pipelines import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m pipelines.make_demo_data", __doc__)
    p.add_argument("out", help="output directory")
    p.add_argument("--images", type=int, default=500, help="number of images (>= 3)")
    p.add_argument("--seed", type=int, default=0, help="data set seed")
    p.add_argument("--size", type=cli.image_size, default=(320, 240), help="WIDTHxHEIGHT (320x240)")
    p.add_argument(
        "--workers", type=int, default=0, help="processes drawing images (0 = one per CPU core)"
    )
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image file format")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = split_sizes(args.images)
    except ValueError as e:
        return cli.fail(e)
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    workers = min(workers, max(1, args.images // 16))  # a pool is not worth it for tiny runs
    width, height = args.size
    start = time.perf_counter()
    try:
        catalogue()
    except (OSError, ValueError) as e:
        return cli.fail(e)
    with progress_of(total=args.images, desc="scenes", unit="img", enabled=not args.quiet) as bar:
        generate_dataset(
            args.out,
            args.images,
            args.seed,
            width=width,
            height=height,
            workers=workers,
            ext=args.format,
            on_image=bar.update,
        )
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.images} images ({sizes['train']} train / {sizes['val']} val / "
        f"{sizes['test']} test, {width}x{height}) to {args.out} in {seconds:.1f} s "
        f"with {workers} worker(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
