"""Train CPFEAN on a region store and a caption source.

    python -m pipelines.train [--config configs/demo.yaml] [--resume] [key.sub=value ...]
    torchrun --nproc_per_node 2 -m pipelines.train ...      # DistributedDataParallel

The resolved config goes to RUN_DIR/config.yaml and into every checkpoint; RUN_DIR gets
last.pt (resume), best.pt (best validation rSum), metrics.csv and best.json.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from cpfean.config import ConfigError, load_config
from cpfean.data.captions import MissingImagesError
from cpfean.engine import train
from cpfean.fileio import LockedError
from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.train", __doc__)
    parser.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    parser.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt exactly")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.lr=1e-4")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return cli.fail(exc)
    if args.resume and not (Path(cfg.run_dir) / "last.pt").is_file():
        return cli.fail(f"--resume: no {Path(cfg.run_dir) / 'last.pt'} to continue")
    try:
        best = train(cfg, resume=args.resume, progress=not args.quiet)
    except (OSError, ValueError, MissingImagesError, LockedError, FloatingPointError) as exc:
        return cli.fail(exc)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the other ranks hold no result
        print(
            f"best validation rSum {best['rsum']:.2f} (epoch {best.get('epoch')}); "
            f"checkpoints in {cfg.run_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
