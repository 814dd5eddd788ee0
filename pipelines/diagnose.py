"""What a checkpoint's components do on data (``cpfean.diagnostics``), as JSON.

    python -m pipelines.diagnose --checkpoint RUN/best.pt [--regions STORE] [--captions FILE]
        [--split SPLIT] [--images 200] [--recurrence-split train] [--batches 20] [--json OUT]

"regions": how alike an image's region embeddings are, over the first ``--images`` images of
``--split`` (default: the config's test split; "all" = every image of the caption file), and
for a region Transformer the size and sameness of each layer's updates and its attention's
entropy. "recurrence" (models with prominence): how the prominence fits the recurrence targets
on seeded batches of ``--recurrence-split`` of the checkpoint's own training data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cpfean.checkpoint import load_model, resolve_device
from cpfean.data.captions import MissingImagesError, check_ids, load_captions
from cpfean.data.region_store import RegionStore
from cpfean.diagnostics import recurrence_report, region_report
from cpfean.fileio import atomic_write_json
from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.diagnose", __doc__)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--regions", help="region store (default: the checkpoint's)")
    p.add_argument("--captions", help="caption source (default: the checkpoint's)")
    p.add_argument("--split", help="split of --captions for the region report")
    p.add_argument("--images", type=int, default=200, help="images for the region report")
    p.add_argument("--recurrence-split", default="train", help="split of the training captions")
    p.add_argument("--batches", type=int, default=20, help="batches for the recurrence report")
    p.add_argument("--seed", type=int, default=0, help="draws the recurrence batches")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    if args.images < 2 or args.batches < 1:
        return cli.fail("--images must be at least 2 and --batches at least 1")
    if args.json and args.json.is_dir():
        return cli.fail(f"--json {args.json} is a folder; give a file name")
    if not args.checkpoint.is_file():
        return cli.fail(f"{args.checkpoint}: no such checkpoint")
    torch.manual_seed(args.seed)
    try:
        model, cfg, _ = load_model(args.checkpoint, resolve_device(args.device))
        store = RegionStore(args.regions or cfg.data.regions)
        split = None if args.split == "all" else (args.split or cfg.data.test_split)
        captions = load_captions(args.captions or cfg.data.captions, split=split)
        check_ids(captions, store.ids())
        report = {
            "checkpoint": str(args.checkpoint),
            "regions": region_report(model, store, captions.image_ids[: args.images]),
        }
        if model.prominence is not None:
            train_store = RegionStore(cfg.data.regions)
            train = load_captions(cfg.data.captions, split=args.recurrence_split)
            check_ids(train, train_store.ids())
            report["recurrence"] = recurrence_report(
                model, train_store, train, batches=args.batches, seed=args.seed
            )
    except (OSError, ValueError, KeyError, MissingImagesError) as err:
        return cli.fail(err)
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
