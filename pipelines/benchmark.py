"""``python -m pipelines.benchmark NAME [options]``: performance figures.

NAME: score, extract, retrieve, eval (COCO 5K at paper scale), data (store -> batches),
serve (search latency through HTTP), train (training images/s and a step's split).

Each benchmark lives in its own module (``pipelines/bench_*.py``) and prints a markdown table;
docs/benchmarks.md quotes the figures with the command that produced them.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "score": "pipelines.bench_score",
    "extract": "pipelines.bench_extract",
    "retrieve": "pipelines.bench_retrieve",
    "eval": "pipelines.bench_paper_scale",
    "data": "pipelines.bench_paper_scale",
    "serve": "pipelines.bench_serve",
    "train": "pipelines.bench_train",
}
PASS_NAME = {"eval", "data"}  # modules that serve several benchmarks take the name too


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(
            f"error: usage: python -m pipelines.benchmark {{{','.join(BENCHMARKS)}}} [options]",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return module.main(argv if argv[0] in PASS_NAME else argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
