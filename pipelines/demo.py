"""The whole pipeline end to end on the bundled default (generated captioned scenes).

    python -m pipelines.demo [--out runs/demo] [--quick]

generate scenes -> train the detector -> extract 36 regions per image -> train CPFEAN ->
evaluate on the test split -> build the retrieval index -> score the plain-English queries
(precision@5, `pipelines.queries`) -> answer an example query.
Each stage is skipped when its output is already whole, so a re-run after an interrupt
continues where it stopped. ``--quick`` is a small variant for smoke tests.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipelines import cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_QUERY = "a dog on grass"

# (images, detector iterations, CPFEAN epochs) for the full and the quick variant;
# None = the epochs of configs/demo.yaml.
SIZES = {"full": (1000, 300, None), "quick": (40, 4, 1)}


def _stage(name: str, done: bool, run: Callable[[], int | None], timings: dict) -> None:
    if done:
        print(f"[demo] {name}: already done, skipping", flush=True)
        return
    print(f"[demo] {name} ...", flush=True)
    started = time.time()
    status = run() or 0
    timings[name] = round(time.time() - started, 1)
    if status not in (0, 3):  # 3 = extraction finished but skipped some images (reported)
        raise SystemExit(f"[demo] {name} failed with exit status {status}")
    print(f"[demo] {name}: done in {timings[name]:.0f} s", flush=True)


class _Paths:
    """Where each stage of a demo run writes, under ``out``."""

    def __init__(self, out: Path):
        self.out, self.data, self.det = out, out / "data", out / "detector"
        self.regions, self.run, self.idx = out / "regions", out / "cpfean", out / "index"
        self.metrics, self.queries = self.run / "test_metrics.json", out / "queries.json"


def _stages(args, p: _Paths, images: int, iters: int, epochs: int | None) -> list[tuple]:
    """(name, done already, the command's module, its argv) of every stage, in order."""
    from pipelines import evaluate, extract, index, make_demo_data, queries, train, train_detector

    dev, captions = args.device, str(p.data / "captions.json")
    detector = ["--config", str(p.det / "config.yaml"), "--weights", str(p.det / "model_final.pth")]
    train_args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"run_dir={p.run}",
        f"data.regions={p.regions}",
        f"data.captions={captions}",
        f"train.device={dev}",
    ]
    if epochs:  # as configs/demo.yaml: hardest negatives only after 6 epochs, for the last 4
        train_args += [f"train.epochs={epochs}", f"train.all_negatives_epochs={max(6, epochs - 4)}"]
    if args.quick:
        train_args += ["train.batch_size=16", "train.lr_decay_epochs=[]"]
    if (p.run / "last.pt").is_file():
        train_args.insert(0, "--resume")
    best = str(p.run / "best.pt")
    return [
        (
            "generate scenes",
            (p.data / "captions.json").is_file(),
            make_demo_data,
            [str(p.data), "--images", str(images), "--seed", "0"],
        ),
        (
            "train detector",
            (p.det / "model_final.pth").is_file(),
            train_detector,
            [
                "--data",
                str(p.data),
                "--out",
                str(p.det),
                "--iters",
                str(iters),
                "MODEL.DEVICE",
                dev,
            ],
        ),
        (
            "extract regions",
            (p.regions / "COMPLETE").is_file(),
            extract,
            [str(p.data / "images"), "--out", str(p.regions), *detector, "--device", dev],
        ),
        ("train CPFEAN", (p.run / "best.json").is_file(), train, train_args),
        (
            "evaluate",
            p.metrics.is_file(),
            evaluate,
            ["--checkpoint", best, "--json", str(p.metrics), "--name", "CPFEAN", "--device", dev],
        ),
        (
            "build index",
            (p.idx / "index.json").is_file(),
            index,
            [
                "--checkpoint",
                best,
                "--regions",
                str(p.regions),
                "--captions",
                captions,
                "--split",
                "test",
                "--out",
                str(p.idx),
                "--device",
                dev,
            ],
        ),
        (
            "plain-English queries",
            p.queries.is_file(),
            queries,
            [
                "--index",
                str(p.idx),
                "--captions",
                captions,
                "--device",
                dev,
                "--json",
                str(p.queries),
            ],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.demo", __doc__)
    parser.add_argument("--out", default="runs/demo", help="where every stage writes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--images", type=int, help="number of generated scenes")
    parser.add_argument("--detector-iters", type=int, help="detector training iterations")
    parser.add_argument("--epochs", type=int, help="CPFEAN training epochs")
    parser.add_argument("--query", default=EXAMPLE_QUERY, help="the example query at the end")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from pipelines import retrieve

    images, iters, epochs = SIZES["quick" if args.quick else "full"]
    images, iters = args.images or images, args.detector_iters or iters
    paths, timings, started = _Paths(Path(args.out)), {}, time.time()
    for name, done, module, stage_argv in _stages(
        args, paths, images, iters, args.epochs or epochs
    ):
        _stage(name, done, lambda m=module, a=stage_argv: m.main(a), timings)
        if name == "extract regions":
            (paths.regions / "COMPLETE").touch()
    print(f'[demo] example query: "{args.query}"', flush=True)
    status = retrieve.main(
        ["--query", args.query, "--index", str(paths.idx), "--top-k", "5", "--device", args.device]
    )
    _summary(paths, images, timings, started, args.query)
    return status


def _summary(p: _Paths, images: int, timings: dict, started: float, query: str) -> None:
    metrics = json.loads(p.metrics.read_text())
    print("\n[demo] summary")
    print(f"  scenes:      {p.data}  ({images} images)")
    print(f"  detector:    {p.det / 'model_final.pth'}")
    print(f"  regions:     {p.regions}")
    print(f"  checkpoint:  {p.run / 'best.pt'}")
    print(f"  index:       {p.idx}")
    print(
        f"  test rSum:   {metrics['rsum']:.1f}  (i2t R@1 {metrics['i2t']['r1']:.1f}, "
        f"t2i R@1 {metrics['t2i']['r1']:.1f})"
    )
    precision = json.loads(p.queries.read_text())["mean_precision@5"]
    print(f"  queries:     precision@5 {precision:.2f} over the plain-English queries")
    print(f"  stage times: {json.dumps(timings)}; total {time.time() - started:.0f} s")
    print(f'  try:         python -m pipelines.retrieve --query "{query}"')
    serve = "python -m pipelines.serve" + (
        "" if p.idx == Path("runs/demo/index") else f" --index {p.idx}"
    )
    print(f"  serve it:    {serve}   (then open http://127.0.0.1:8000/)")


if __name__ == "__main__":
    sys.exit(main())
