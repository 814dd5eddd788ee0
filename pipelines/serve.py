"""Serve an index over HTTP: the model stays loaded, a page shows why each result ranked.

    python -m pipelines.serve [--index DIR] [--host 127.0.0.1] [--port 8000]

Endpoints (JSON errors are ``{"error": "..."}`` with a 4xx status, never a traceback):

- ``GET /api/search?q=TEXT&k=N``: ranked gallery images, each with its prominent words and
  the boxes of its most prominent regions with their labels;
- ``POST /api/search`` (multipart ``image``): ranked captions for an uploaded image, which goes
  through the detector that made the index's regions (loaded on first use);
- ``GET /api/similar/{id}``: gallery images like a gallery image ("more like this");
- ``GET /api/image/{id}``: a gallery image's size and indexed captions;
- ``GET /images/{id}``, ``GET /thumbs/{id}``: the image (or a thumbnail) of a gallery id, looked
  up in the index, never a path taken from the request;
- ``GET /healthz``; ``GET /metrics`` (Prometheus: requests by endpoint and status, latency);
- ``GET /``: the page (plain HTML, CSS and JavaScript shipped in ``pipelines/web``).

With ``--engine qdrant --url URL``, text queries take their candidates from the Qdrant
collection that ``pipelines.index --engine qdrant`` wrote (``docs/scale.md``).

A rebuilt or updated index (``pipelines.index`` re-run on the same ``--out``) is picked up
without a restart: requests go on to the old index until the new one is loaded.

Every request is bounded: query length, k, upload bytes and pixels, and concurrent work (one
model call at a time per ``--workers``, at most ``--queue`` waiting; beyond that 429).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pipelines import cli
from pipelines.web.app import Limits, open_server


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.serve", __doc__)
    parser.add_argument("--index", help="index directory (default: the newest demo index)")
    parser.add_argument("--checkpoint", help="checkpoint (default: the index's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=Limits.workers, help="model calls at once")
    parser.add_argument(
        "--queue", type=int, default=Limits.queue, help="requests waiting before 429"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = library default)"
    )
    parser.add_argument(
        "--no-image-queries", action="store_true", help="refuse uploads (no detector is loaded)"
    )
    cli.add_engine_args(parser)
    parser.add_argument("--detector-config", help="detector config for uploads")
    parser.add_argument("--detector-weights", help="detector weights for uploads")
    parser.add_argument(
        "--reload-every",
        type=float,
        default=1.0,
        help="seconds between looks for a rebuilt or updated index (0: never reload)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.workers < 1 or args.queue < 0 or args.threads < 0 or args.reload_every < 0:
        parser.error("--workers must be >= 1, --queue, --threads and --reload-every >= 0")
    import uvicorn

    def detector(searcher: Any) -> Any:
        return cli.image_detector(
            searcher.index, args.detector_config, args.detector_weights, args.device
        )

    index_dir = args.index or cli.default_index()
    try:
        app, searcher = open_server(
            lambda: cli.open_searcher(
                args.index, args.checkpoint, args.device, cli.engine_of(args, index_dir)
            ),
            limits=Limits(workers=args.workers, queue=args.queue),
            threads=args.threads,
            detector_factory=None if args.no_image_queries else detector,
            reload_every=args.reload_every,
        )
    except (OSError, ValueError) as e:
        return cli.fail(e)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(
        f"serving {searcher.index.path} ({searcher.index.count} images) on "
        f"http://{args.host}:{args.port}/",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
