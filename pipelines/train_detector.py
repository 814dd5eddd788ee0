"""``python -m pipelines.train_detector --data DEMO_DIR [--config C] [--iters N] [--out DIR]
[KEY VALUE ...]``

Train a region detector on a COCO-instances data set (the generated scenes by default:
`DEMO_DIR/instances_{train,val}.json`, images under `DEMO_DIR/images`), evaluate box AP on the
val split with COCOEvaluator, and write `model_final.pth`, `config.yaml` and `metrics.json` to
the output folder (Detectron2's own logs and checkpoints go to `OUT/train/`). Prints the AP.
Extraction then uses ``--config OUT/config.yaml`` (the weights are found beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from detector.config import DEFAULT_DETECTOR, TRAINED_DEFAULT, get_region_cfg
from detector.extractor import check_weights_file
from detector.train import RegionTrainer, export_run, register_scenes, scale_schedule
from pipelines import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m pipelines.train_detector", __doc__)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder with instances_{train,val}.json and images/",
    )
    p.add_argument("--config", default=DEFAULT_DETECTOR, help="YAML path or bundled name")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="training iterations (LR steps and warm-up scale with it)",
    )
    p.add_argument("--out", type=Path, default=TRAINED_DEFAULT.parent, help="output folder")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument(
        "--resume", action="store_true", help="resume from the last checkpoint in OUT/train"
    )
    p.add_argument("opts", nargs="*", help="config overrides: KEY VALUE ... or KEY=VALUE ...")
    return p.parse_intermixed_args(argv)


def _finite(value: Any) -> Any:
    """NaN (COCO's "not computable") -> None, recursively, so metrics.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    try:
        if args.iters is not None and args.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {args.iters}")
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        splits, classes = register_scenes(args.data)
        cfg = get_region_cfg(args.config, args.opts, freeze=False)
        if cfg.MODEL.WEIGHTS:  # initial weights: tensors only, never a pickle
            check_weights_file(cfg.MODEL.WEIGHTS)
    except (OSError, ValueError, AssertionError, KeyError) as e:
        return cli.fail(e)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg.DATASETS.TRAIN = (splits["train"],)
    cfg.DATASETS.TEST = (splits["val"],)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
    cfg.REGIONS.LABEL_NAMES = classes
    cfg.REGIONS.LABEL_NAMES_FILE = ""
    cfg.OUTPUT_DIR = str(out / "train")
    if args.iters is not None:
        scale_schedule(cfg, args.iters)
    cfg.freeze()
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR, name="detectron2")
    # SEED -1 is detectron2's "draw one"; from a fixed seed the same data trains the same
    # detector, so a study can extract a set later with the detector its first sets had
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)

    start = time.time()
    trainer = RegionTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()  # the evaluation hook runs COCOEvaluator on the val split at the end
    wall = time.time() - start
    bbox = trainer.last_eval_results.get("bbox", {})
    ap = bbox.get("AP", float("nan"))
    metrics = {
        "AP": ap,
        "AP50": bbox.get("AP50", float("nan")),
        "AP75": bbox.get("AP75", float("nan")),
        "bbox": bbox,
        "iterations": cfg.SOLVER.MAX_ITER,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "wall_seconds": round(wall, 1),
        "config": cfg.REGIONS.CONFIG_NAME,
        "data": str(args.data),
        "num_classes": len(classes),
        "threads": torch.get_num_threads(),
        "command": "python -m pipelines.train_detector "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    metrics = _finite(metrics)
    ckpt = export_run(cfg, trainer.model, out, metrics)
    print(
        json.dumps(
            {
                "AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "wall_seconds": metrics["wall_seconds"],
                "weights": str(ckpt),
                "config": str(out / "config.yaml"),
            }
        )
    )
    return 0 if os.path.isfile(ckpt) else 1


if __name__ == "__main__":
    sys.exit(main())
