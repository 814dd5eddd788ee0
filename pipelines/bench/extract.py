"""``python -m pipelines.benchmark extract [--images DIR] [--num N] [--quick] ...``

Region-extraction throughput and peak memory, two ways, on the same images and detector:

- **cpfean**: `pipelines.extract`'s loop - decoding in DataLoader workers, batched
  `RegionExtractor` (one forward pass gives boxes and their features), records written to a
  region store.
- **naive**: what one writes without it - `cv2.imread` in the main process, Detectron2's
  `DefaultPredictor` one image at a time, then a second backbone pass to pool the features of
  the kept boxes (top 36).

Each variant runs in its own fresh process (so peak RSS is its own). Prints a markdown table.
Images default to generated scenes (320x240); the detector defaults to the trained scenes
config when `weights/scenes_effl0_fpn/config.yaml` exists, else the untrained bundled one (same
speed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpfean.fileio import atomic_write_json
from pipelines import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m pipelines.benchmark extract", __doc__)
    p.add_argument(
        "--images",
        type=Path,
        help="images folder (default: generate --num scenes in a temp folder)",
    )
    p.add_argument("--num", type=int, default=64, help="images to use")
    p.add_argument("--config", default=None, help="detector config (see module doc)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 images, batch 4")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--run", choices=("cpfean", "naive"), default=None, help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)


def _peak_rss_mb() -> tuple[float, float]:
    """Peak RSS of this process and of its largest finished child, in MB (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, child


def _cfg(args: argparse.Namespace):
    from detector.config import DEFAULT_DETECTOR, TRAINED_DEFAULT, get_region_cfg

    config = args.config or (
        str(TRAINED_DEFAULT) if TRAINED_DEFAULT.is_file() else DEFAULT_DETECTOR
    )
    return get_region_cfg(config, ["MODEL.DEVICE", args.device])


def _run_cpfean(args: argparse.Namespace, ids: list[str]) -> dict:
    from detector.extract import extract_images
    from detector.extractor import RegionExtractor

    extractor = RegionExtractor(_cfg(args))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.lmdb"
        start = time.perf_counter()
        counts = extract_images(
            extractor,
            args.images,
            ids,
            store,
            Path(tmp) / "skipped.jsonl",
            batch_size=args.batch_size,
            workers=args.workers,
        )
        seconds = time.perf_counter() - start
    return {"images": counts["written"], "seconds": seconds}


def _second_pass(predictor, image, boxes):
    """Features of `boxes` (original pixels) with another backbone pass, as users write it."""
    import torch
    from detectron2.structures import Boxes

    model = predictor.model
    h, w = image.shape[:2]
    resized = predictor.aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    with torch.no_grad():
        batch = model.preprocess_image([{"image": tensor}])
        features = model.backbone(batch.tensor)
        rh, rw = batch.image_sizes[0]
        device = batch.tensor.device  # the predictor's; the boxes came back on the CPU
        scaled = boxes.to(device) * torch.tensor([rw / w, rh / h, rw / w, rh / h], device=device)
        heads = model.roi_heads
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], [Boxes(scaled)])
        return heads.box_head(pooled)


def _run_naive(args: argparse.Namespace, ids: list[str]) -> dict:
    import cv2
    import torch
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(_cfg(args))
    start = time.perf_counter()
    done = 0
    for image_id in ids:
        image = cv2.imread(str(args.images / image_id))
        instances = predictor(image)["instances"].to("cpu")
        top = instances[torch.argsort(instances.scores, descending=True)[:36]]
        _second_pass(predictor, image, top.pred_boxes.tensor)
        done += 1
    return {"images": done, "seconds": time.perf_counter() - start}


def _child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from detector.data import list_images

    ids = list_images(args.images)[: args.num]
    result = (_run_cpfean if args.run == "cpfean" else _run_naive)(args, ids)
    own, child = _peak_rss_mb()
    result.update(peak_rss_mb=round(own, 1), peak_worker_rss_mb=round(child, 1))
    print(json.dumps(result))
    return 0


def _generate(folder: Path, num: int) -> Path:
    from cpfean.scenes.generate import generate_dataset

    generate_dataset(folder, max(num, 3), seed=0)
    return folder / "images"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.num, args.batch_size, args.workers = 8, 4, 1
    if args.run:
        return _child(args)
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images or _generate(Path(tmp) / "scenes", args.num)
        rows = []
        for variant in ("cpfean", "naive"):
            cmd = [
                sys.executable,
                "-m",
                "pipelines.bench.extract",
                "--run",
                variant,
                "--images",
                str(images),
                "--num",
                str(args.num),
                "--batch-size",
                str(args.batch_size),
                "--workers",
                str(args.workers),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ]
            if args.config:
                cmd += ["--config", args.config]
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            res = json.loads(done.stdout.strip().splitlines()[-1])
            res.update(variant=variant, images_per_s=res["images"] / res["seconds"])
            rows.append(res)
    batch = {"cpfean": f"{args.batch_size}", "naive": "1"}
    workers = {"cpfean": f"{args.workers}", "naive": "0 (main)"}
    print(
        f"\nRegion extraction, {rows[0]['images']} images, device {args.device}, "
        f"{args.threads} torch threads\n"
    )
    print(
        "| pipeline | batch | decode workers | images/s | ms/image | peak RSS main (MB) "
        "| peak RSS worker (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["variant"]
        # the naive run starts no workers; a child RSS there would be a short-lived fork
        worker_rss = f"{r['peak_worker_rss_mb']:.0f}" if v == "cpfean" and args.workers else "-"
        print(
            f"| {v} | {batch[v]} | {workers[v]} | {r['images_per_s']:.2f} | "
            f"{1000 / r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {worker_rss} |"
        )
    speedup = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    print(f"\nspeed-up of the batched one-pass pipeline: {speedup:.2f}x")
    if args.json:
        atomic_write_json(args.json, rows, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
