"""Training benchmark: images/s of the real training loop, and where a step's time goes.

``python -m pipelines.benchmark train [--shape demo,butd] [--epochs 1] [--json F]``

``demo``: ``configs/demo.yaml`` on the demo's region store and captions (``make demo`` writes
them; ``--store``/``--captions`` point elsewhere). ``butd``: the paper's Flickr30K config
(``configs/f30k_butd.yaml``: d = 1024, region Transformer, spatial and label priors) on a
synthetic store of 36 x 2048 features written once to ``--workdir``, with the offline MiniLM
in place of BERT-base (which cannot be loaded offline).

Each shape runs ``cpfean.engine.train_one_epoch`` as training does, twice:

1. timed: ``--epochs`` passes with nothing added; pairs/s = caption-image pairs a second
   (each pair is one image's regions and one of its captions, a row of the in-batch matrix);
2. split: ``--split-steps`` steps with timers around the data loader, the text encoder and
   region encoder forwards, in-batch scoring (the rest of the model's forward), the loss,
   and the optimizer step; what remains of each step is the backward pass (and the gradient
   clip). On CUDA each timer waits for the device, so the split costs speed the timed pass
   does not pay. Then one validation pass (the encode-and-score of the validation split).

``--json F`` writes the rows.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from cpfean.checkpoint import resolve_device
from cpfean.config import load_config
from cpfean.data.region_store import NUM_REGIONS, RegionRecord, RegionWriter
from cpfean.engine import Run, load_run_data, setup_run, train_one_epoch
from cpfean.evaluation import evaluate_split
from cpfean.fileio import atomic_write_json
from pipelines import cli

REPO = Path(__file__).resolve().parents[2]
PHASES = ("data", "text encoder", "region encoder", "scoring", "loss", "backward", "optimizer")
WORDS = "a man woman dog riding red bike on the street with two people near green grass".split()


class Timers:
    """Seconds spent in each phase; ``wrap`` puts a timer around a callable."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self._now()
            out = fn(*args, **kwargs)
            self.seconds[name] += self._now() - start
            return out

        return timed


class TimedLoader:
    """A loader whose every ``next`` is timed, and that stops after ``steps`` batches."""

    def __init__(self, loader, timers: Timers, steps: int):
        self.loader, self.timers, self.steps = loader, timers, min(steps, len(loader))
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        for _ in range(self.steps):
            start = self.timers._now()
            batch = next(batches)
            self.timers.seconds["data"] += self.timers._now() - start
            yield batch


def split_step(run: Run, steps: int) -> dict[str, float]:
    """Mean milliseconds per step of each phase over ``steps`` training steps."""
    timers = Timers(run.device)
    model = run.model
    model.encode_texts = timers.wrap("text encoder", model.encode_texts)
    model.encode_images = timers.wrap("region encoder", model.encode_images)
    model.forward = timers.wrap("forward", model.forward)
    run.loss_fn.forward = timers.wrap("loss", run.loss_fn.forward)
    run.optimizer.step = timers.wrap("optimizer", run.optimizer.step)
    loader = run.loader
    run.loader = timed = TimedLoader(loader, timers, steps)
    start = timers._now()
    try:
        train_one_epoch(run, 0, progress=False)
    finally:
        run.loader = loader
        for name in ("encode_texts", "encode_images", "forward"):
            delattr(model, name)
        del run.loss_fn.forward, run.optimizer.step
    total = timers._now() - start
    s = timers.seconds
    s["scoring"] = s["forward"] - s["text encoder"] - s["region encoder"]
    s["backward"] = total - s["data"] - s["forward"] - s["loss"] - s["optimizer"]
    n = len(timed)
    return {phase: 1000 * s[phase] / n for phase in PHASES} | {"step": 1000 * total / n}


def synthetic_butd_store(workdir: Path, images: int, seed: int) -> tuple[Path, Path]:
    """A store of ``images`` BUTD-shaped records and five captions each (written once)."""
    regions, captions = workdir / f"butd-{images}.lmdb", workdir / f"butd-{images}.json"
    if regions.exists() and captions.exists():
        return regions, captions
    rng = np.random.default_rng(seed)
    labels = [f"object{i}" for i in range(1600)]
    with RegionWriter(regions, meta={"label_names": labels, "feature_dim": 2048}) as writer:
        for i in range(images):
            xy = rng.uniform(0, 400, size=(NUM_REGIONS, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(20, 200, size=(NUM_REGIONS, 2))], 1)
            writer.put(
                f"img{i:06d}",
                RegionRecord(
                    np.maximum(rng.normal(size=(NUM_REGIONS, 2048)), 0).astype(np.float32),
                    boxes.astype(np.float32),
                    rng.integers(0, len(labels), NUM_REGIONS),
                    rng.uniform(0.2, 1, NUM_REGIONS).astype(np.float32),
                    (480, 640),
                    NUM_REGIONS,
                ),
            )
    val = max(images // 10, 1)
    data = {
        "images": [
            {
                "filename": f"img{i:06d}",
                "split": "val" if i < val else "train",
                "sentences": [
                    {"raw": " ".join(rng.choice(WORDS, int(rng.integers(8, 16))))} for _ in range(5)
                ],
            }
            for i in range(images)
        ]
    }
    atomic_write_json(captions, data)
    return regions, captions


def config_for(args: argparse.Namespace, shape: str, run_dir: Path):
    overrides = [f"run_dir={run_dir}", f"train.device={args.device}", "train.epochs=1"]
    if shape == "demo":
        path = REPO / "configs" / "demo.yaml"
        overrides += [f"data.regions={args.store}", f"data.captions={args.captions}"]
    else:
        path = REPO / "configs" / "f30k_butd.yaml"
        regions, captions = synthetic_butd_store(Path(args.workdir), args.butd_images, args.seed)
        overrides += [
            f"data.regions={regions}",
            f"data.captions={captions}",
            "data.test_split=val",
            "model.text_encoder=minilm",
            "data.num_workers=2",
        ]
    overrides += args.overrides
    return load_config(path, overrides)


def bench_shape(args: argparse.Namespace, shape: str, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, store, train_caps, val_caps = load_run_data(config_for(args, shape, Path(tmp)))
        run = setup_run(cfg, store, train_caps, val_caps, device=device, resume=False)
        pairs_per_epoch = len(run.loader) * cfg.train.batch_size
        train_one_epoch(run, 0, progress=False) if args.warmup else None
        start = time.perf_counter()
        for epoch in range(args.epochs):
            loss = train_one_epoch(run, epoch, progress=False)
        loss.item()  # the device finishes the last step
        seconds = time.perf_counter() - start
        split = split_step(run, args.split_steps)
        start = time.perf_counter()
        evaluate_split(
            run.model, store, val_caps, batch_size=cfg.train.eval_batch_size, device=device
        )
        validation = time.perf_counter() - start
    return {
        "shape": shape,
        "device": str(device),
        "precision": str(run.amp_dtype or torch.float32).replace("torch.", ""),
        "batch_size": cfg.train.batch_size,
        "steps": len(run.loader) * args.epochs,
        "pairs_per_s": round(pairs_per_epoch * args.epochs / seconds, 1),
        "epoch_s": round(seconds / args.epochs, 3),
        "split_ms": {k: round(v, 1) for k, v in split.items()},
        "validation_s": round(validation, 3),
        "validation_images": len(val_caps),
    }


EPOCH_LINE = re.compile(r"^epoch 1: .*\((\d+) s\)$", re.M)


def epoch_seconds(code: Path, args: argparse.Namespace, run_dir: Path) -> float:
    """Seconds of one epoch (validation included) of ``pipelines.train`` as the checkout at
    ``code`` runs it, on the demo store, in a process of its own with ``--threads``."""
    cmd = [
        sys.executable,
        "-m",
        "pipelines.train",  # not --quiet: the epoch line is printed with the progress
        "--config",
        str(code / "configs" / "demo.yaml"),
        f"data.regions={Path(args.store).resolve()}",
        f"data.captions={Path(args.captions).resolve()}",
        f"run_dir={run_dir}",
        f"train.device={args.device}",
        "train.epochs=1",
        *args.overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    found = EPOCH_LINE.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{code}: training failed: {(proc.stderr or proc.stdout)[-800:]}")
    return float(found.group(1))


def against(args: argparse.Namespace) -> list[dict]:
    """One demo epoch of this checkout and of ``--against``, one after the other."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in (("this checkout", REPO), (str(args.against), Path(args.against))):
            seconds = epoch_seconds(code.resolve(), args, Path(tmp) / name.replace("/", "_"))
            rows.append({"code": name, "epoch_s": seconds})
    base = rows[1]["epoch_s"]
    for r in rows:  # the epoch line gives whole seconds: under one is no ratio
        r["speed_vs_against"] = round(base / r["epoch_s"], 2) if base and r["epoch_s"] else None
    return rows


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m pipelines.benchmark train", description=__doc__)
    p.add_argument("--shape", default="demo,butd", help="comma-separated: demo, butd")
    p.add_argument("--store", default="runs/demo/regions", help="demo: the region store")
    p.add_argument("--captions", default="runs/demo/data/captions.json", help="demo: captions")
    p.add_argument("--workdir", help="butd: where the synthetic store goes (default: a temp dir)")
    p.add_argument("--butd-images", type=int, default=640, help="butd: synthetic images")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs")
    p.add_argument("--warmup", action="store_true", help="one untimed epoch first")
    p.add_argument("--split-steps", type=int, default=10, help="steps of the phase split")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument(
        "--against",
        type=Path,
        help="demo: also time one epoch of pipelines.train in this other checkout (e.g. "
        "`git archive 4d5f08a | tar -x -C DIR`) and of this one, same store and threads",
    )
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every shape")
    args = p.parse_args(argv)
    shapes = [s for s in args.shape.split(",") if s]
    if not shapes or set(shapes) - {"demo", "butd"}:
        p.error(f"--shape takes demo and/or butd, not {args.shape!r}")
    if args.against is not None and not (args.against / "pipelines" / "train.py").is_file():
        return cli.fail(f"--against {args.against}: not a cpfean checkout (no pipelines/train.py)")
    if "demo" in shapes or args.against is not None:
        for need, flag in ((args.store, "--store"), (args.captions, "--captions")):
            if not Path(need).exists():
                return cli.fail(f"{need} not found: run `make demo` first, or pass {flag}")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        for shape in shapes:
            rows.append(bench_shape(args, shape, device))
    print(f"torch {torch.__version__}, threads={args.threads}, device={device}")
    print()
    print("| shape | precision | batch | pairs/s | epoch s | " + " | ".join(PHASES) + " | step |")
    print("|---|---|---:|---:|---:|" + "---:|" * (len(PHASES) + 1))
    for r in rows:
        split = " | ".join(f"{r['split_ms'][k]:.0f}" for k in (*PHASES, "step"))
        print(
            f"| {r['shape']} | {r['precision']} | {r['batch_size']} | {r['pairs_per_s']:.1f} | "
            f"{r['epoch_s']:.1f} | {split} |"
        )
    print()
    print(
        "split: ms per step; "
        + "; ".join(
            f"{r['shape']} validation of {r['validation_images']} images {r['validation_s']:.1f} s"
            for r in rows
        )
    )
    result = {"benchmark": "train", "rows": rows}
    if args.against is not None:
        result["against"] = against(args)
        print()
        print("one demo epoch of `pipelines.train` (validation included), same store and threads:")
        print("| code | epoch s | speed |")
        print("|---|---:|---:|")
        for r in result["against"]:
            speed = r["speed_vs_against"]
            print(f"| {r['code']} | {r['epoch_s']:.0f} | {'-' if speed is None else speed}x |")
    if args.json:
        atomic_write_json(args.json, result, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
