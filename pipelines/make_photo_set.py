"""Build the photo detection set: drawings of real things on crops of real photographs.

    python -m pipelines.make_photo_set OUT [--train 1000] [--val 200] [--seed 0] [--size 320x240]
                                       [--captions-only]

Writes `OUT/images/*.jpg`, `OUT/instances_{train,val}.json` (COCO detection, 16 categories),
`OUT/SOURCES.json` (every photograph and drawing used, with its package, author and licence;
see `cpfean.scenes.photos`) and `OUT/captions.json`: five captions per image written from the
annotations in the scenes' grammar, for retrieval (`cpfean.scenes.photo_captions`; the train
split gives train and val images, the val split's unseen drawings are the test images).
``--captions-only`` writes the captions of a set already made. Needs Debian's openclipart-png,
mate-backgrounds and plasma-workspace-wallpapers (`make install` installs them). Train a
detector on it with `python -m pipelines.train_detector --data OUT`. OUT must be absent, empty
or a set this command made: a folder holding anything else (annotations of your own) is
refused.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from cpfean.fileio import atomic_write_json
from cpfean.scenes.photo_captions import caption_photo_set
from cpfean.scenes.photos import MissingPackageError, check_replaceable, generate_photo_set
from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.make_photo_set", __doc__)
    p.add_argument("out", help="output directory")
    p.add_argument("--train", type=int, default=1000, help="training images")
    p.add_argument("--val", type=int, default=200, help="validation images (unseen drawings)")
    p.add_argument("--seed", type=int, default=0, help="data set seed")
    p.add_argument("--size", type=cli.image_size, default=(320, 240), help="WIDTHxHEIGHT (320x240)")
    p.add_argument(
        "--captions-only", action="store_true", help="caption the set in OUT, draw nothing"
    )
    args = p.parse_args(argv)
    if args.captions_only:
        return _captions(Path(args.out), args.seed)
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
    return _captions(Path(args.out), args.seed)


def _captions(out: Path, seed: int) -> int:
    try:
        check_replaceable(out)  # a captions.json of the user's own is never overwritten
        if out.is_dir() and not (out / "SOURCES.json").is_file():
            raise ValueError(f"{out} is not a photo set made by this command (no SOURCES.json)")
        captions = caption_photo_set(out, seed)
    except (FileNotFoundError, ValueError) as e:
        return cli.fail(e)
    atomic_write_json(out / "captions.json", captions)
    splits = Counter(im["split"] for im in captions["images"])
    print(f"wrote {out / 'captions.json'}: " + ", ".join(f"{n} {s}" for s, n in splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
