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

    from pipelines import (
        evaluate,
        extract,
        index,
        make_demo_data,
        queries,
        retrieve,
        train,
        train_detector,
    )

    images, iters, epochs = SIZES["quick" if args.quick else "full"]
    images, iters = args.images or images, args.detector_iters or iters
    epochs = args.epochs or epochs
    out = Path(args.out)
    data, det, regions, run, idx = (
        out / "data",
        out / "detector",
        out / "regions",
        out / "cpfean",
        out / "index",
    )
    timings: dict[str, float] = {}
    started = time.time()

    _stage(
        "generate scenes",
        (data / "captions.json").is_file(),
        lambda: make_demo_data.main([str(data), "--images", str(images), "--seed", "0"]),
        timings,
    )
    _stage(
        "train detector",
        (det / "model_final.pth").is_file(),
        lambda: train_detector.main(
            ["--data", str(data), "--out", str(det), "--iters", str(iters)]
            + ["MODEL.DEVICE", args.device]
        ),
        timings,
    )
    _stage(
        "extract regions",
        (regions / "COMPLETE").is_file(),
        lambda: extract.main(
            [
                str(data / "images"),
                "--out",
                str(regions),
                "--config",
                str(det / "config.yaml"),
                "--weights",
                str(det / "model_final.pth"),
                "--device",
                args.device,
            ]
        ),
        timings,
    )
    (regions / "COMPLETE").touch()

    train_args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"run_dir={run}",
        f"data.regions={regions}",
        f"data.captions={data / 'captions.json'}",
        f"train.device={args.device}",
    ]
    if epochs:  # as configs/demo.yaml: hardest negatives only after 6 epochs, for the last 4
        train_args += [f"train.epochs={epochs}", f"train.all_negatives_epochs={max(6, epochs - 4)}"]
    if args.quick:
        train_args += ["train.batch_size=16", "train.lr_decay_epochs=[]"]
    if (run / "last.pt").is_file():
        train_args.insert(0, "--resume")
    _stage("train CPFEAN", (run / "best.json").is_file(), lambda: train.main(train_args), timings)
    metrics_path = run / "test_metrics.json"
    _stage(
        "evaluate",
        metrics_path.is_file(),
        lambda: evaluate.main(
            [
                "--checkpoint",
                str(run / "best.pt"),
                "--json",
                str(metrics_path),
                "--name",
                "CPFEAN",
                "--device",
                args.device,
            ]
        ),
        timings,
    )
    _stage(
        "build index",
        (idx / "index.json").is_file(),
        lambda: index.main(
            [
                "--checkpoint",
                str(run / "best.pt"),
                "--regions",
                str(regions),
                "--captions",
                str(data / "captions.json"),
                "--split",
                "test",
                "--out",
                str(idx),
                "--device",
                args.device,
            ]
        ),
        timings,
    )
    queries_path = out / "queries.json"
    _stage(
        "plain-English queries",
        queries_path.is_file(),
        lambda: queries.main(
            [
                "--index",
                str(idx),
                "--captions",
                str(data / "captions.json"),
                "--device",
                args.device,
                "--json",
                str(queries_path),
            ]
        ),
        timings,
    )
    print(f'[demo] example query: "{args.query}"', flush=True)
    status = retrieve.main(
        ["--query", args.query, "--index", str(idx), "--top-k", "5", "--device", args.device]
    )

    metrics = json.loads(metrics_path.read_text())
    print("\n[demo] summary")
    print(f"  scenes:      {data}  ({images} images)")
    print(f"  detector:    {det / 'model_final.pth'}")
    print(f"  regions:     {regions}")
    print(f"  checkpoint:  {run / 'best.pt'}")
    print(f"  index:       {idx}")
    print(
        f"  test rSum:   {metrics['rsum']:.1f}  (i2t R@1 {metrics['i2t']['r1']:.1f}, "
        f"t2i R@1 {metrics['t2i']['r1']:.1f})"
    )
    precision = json.loads(queries_path.read_text())["mean_precision@5"]
    print(f"  queries:     precision@5 {precision:.2f} over the plain-English queries")
    print(f"  stage times: {json.dumps(timings)}; total {time.time() - started:.0f} s")
    print(f'  try:         python -m pipelines.retrieve --query "{args.query}"')
    serve = "python -m pipelines.serve" + (
        "" if idx == Path("runs/demo/index") else f" --index {idx}"
    )
    print(f"  serve it:    {serve}   (then open http://127.0.0.1:8000/)")
    return status


if __name__ == "__main__":
    sys.exit(main())
