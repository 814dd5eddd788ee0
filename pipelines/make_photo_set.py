"""Build the photo detection set: drawings of real things on crops of real photographs.

    python -m pipelines.make_photo_set OUT [--train 1000] [--val 200] [--seed 0] [--size 320x240]

Writes `OUT/images/*.jpg`, `OUT/instances_{train,val}.json` (COCO detection, 16 categories) and
`OUT/SOURCES.json` (every photograph and drawing used, with its package, author and licence);
see `cpfean.scenes.photos`. Needs Debian's openclipart-png, mate-backgrounds and
plasma-workspace-wallpapers (`make install` installs them). Train a detector on it with
`python -m pipelines.train_detector --data OUT`. OUT must be absent, empty or a set this command
made: a folder holding anything else (annotations of your own) is refused.
"""

from __future__ import annotations

import sys
import time

from cpfean.scenes.photos import MissingPackageError, generate_photo_set
from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.make_photo_set", __doc__)
    p.add_argument("out", help="output directory")
    p.add_argument("--train", type=int, default=1000, help="training images")
    p.add_argument("--val", type=int, default=200, help="validation images (unseen drawings)")
    p.add_argument("--seed", type=int, default=0, help="data set seed")
    p.add_argument("--size", type=cli.image_size, default=(320, 240), help="WIDTHxHEIGHT (320x240)")
    args = p.parse_args(argv)
    if args.train < 1 or args.val < 1:
        p.error("--train and --val must be >= 1")
    start = time.perf_counter()
    try:
        generate_photo_set(
            args.out,
            train=args.train,
            val=args.val,
            seed=args.seed,
            width=args.size[0],
            height=args.size[1],
        )
    except (MissingPackageError, ValueError) as e:
        return cli.fail(e)
    print(
        f"wrote {args.train} train / {args.val} val photo images to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
