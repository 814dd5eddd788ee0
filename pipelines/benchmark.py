"""``python -m pipelines.benchmark NAME [options]``: performance figures.

NAME: score, extract, retrieve, codec (compressed region embeddings), eval (COCO 5K at paper
scale), data (store -> batches), serve (search latency through HTTP), train (training images/s
and a step's split), sync (a changed photo folder: extract and index again, served).

Each benchmark lives in its own module (``pipelines/bench/*.py``) and prints a markdown table;
docs/benchmarks.md quotes the figures with the command that produced them.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "score": "pipelines.bench.score",
    "extract": "pipelines.bench.extract",
    "retrieve": "pipelines.bench.retrieve",
    "codec": "pipelines.bench.codec",
    "eval": "pipelines.bench.paper_scale",
    "data": "pipelines.bench.paper_scale",
    "serve": "pipelines.bench.serve",
    "train": "pipelines.bench.train",
    "sync": "pipelines.bench.sync",
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
