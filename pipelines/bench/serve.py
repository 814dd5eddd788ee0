"""Search latency through HTTP on loopback, with the model warm (``pipelines.serve``).

``python -m pipelines.benchmark serve [--index runs/demo/index] [--synthetic 100000]``

Starts the server's app on 127.0.0.1 in this process (uvicorn, one worker, as
``pipelines.serve`` runs it), then sends text queries over HTTP: ``--requests`` one after the
other (p50 and p99 latency, query encoding and explanation included), and ``--clients``
concurrent clients of ``--per-client`` requests each (throughput, p50 and p99). Rows:

- the demo index (``--index``), searched as the server searches it (exhaustive below 20K);
- with ``--synthetic N``, a synthetic index of N images (the retrieval benchmark's gallery,
  d = 1024, written under ``--workdir``) searched in two stages, with the offline MiniLM
  text encoder, so query encoding costs what it costs for real.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipelines import cli
from pipelines.bench.gallery import QUERIES


def _serve(app) -> tuple[object, threading.Thread, str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def measure(open_searcher, name: str, args: argparse.Namespace, uploads: int = 0) -> dict:
    """Serve the searcher ``open_searcher()`` loads, as pipelines.serve does, and time it
    (``uploads`` image queries too, through the detector that made the index's regions)."""
    import httpx

    from pipelines.web.app import Limits, open_server

    files = (getattr(args, "detector_config", None), getattr(args, "detector_weights", None))

    def detector(searcher):
        return cli.image_detector(searcher.index, *files, "cpu")

    app, searcher = open_server(
        open_searcher,
        limits=Limits(workers=1, queue=4 * args.clients),
        threads=args.threads,
        detector_factory=detector if uploads else None,
    )
    server, thread, base = _serve(app)
    try:
        with httpx.Client(base_url=base, timeout=60) as c:

            def get(i: int) -> float:
                start = time.perf_counter()
                r = c.get("/api/search", params={"q": QUERIES[i % len(QUERIES)], "k": 10})
                r.raise_for_status()
                return time.perf_counter() - start

            for i in range(5):
                get(i)
            sequential = [get(i) for i in range(args.requests)]
            path = c.get("/api/search", params={"q": QUERIES[0]}).json()["search"]["path"]
            images = _gallery_files(searcher, uploads + 2)

            def post(i: int) -> float:
                data = images[i % len(images)].read_bytes()
                start = time.perf_counter()
                r = c.post("/api/search", files={"image": ("q.jpg", data)}, params={"k": 10})
                r.raise_for_status()
                return time.perf_counter() - start

            uploaded = [post(i) for i in range(-2, uploads)][2:] if uploads else []  # 2 warm

        def client(n: int) -> list[float]:
            with httpx.Client(base_url=base, timeout=120) as c:
                out = []
                for i in range(args.per_client):
                    start = time.perf_counter()
                    r = c.get("/api/search", params={"q": QUERIES[(n + i) % len(QUERIES)]})
                    r.raise_for_status()
                    out.append(time.perf_counter() - start)
                return out

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            concurrent = [x for part in pool.map(client, range(args.clients)) for x in part]
        wall = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    pct = lambda xs, p: 1e3 * float(np.percentile(xs, p))
    return {
        "index": name,
        "device": str(searcher.device),
        "images": searcher.index.count,
        "path": path,
        "seq": f"{pct(sequential, 50):.0f} / {pct(sequential, 99):.0f}",
        "rps": len(concurrent) / wall,
        "conc": f"{pct(concurrent, 50):.0f} / {pct(concurrent, 99):.0f}",
        "image": f"{pct(uploaded, 50):.0f} / {pct(uploaded, 99):.0f}" if uploaded else "-",
    }


def _gallery_files(searcher, n: int) -> list[Path]:
    """Up to ``n`` of the gallery's image files (the uploads of the image-query timing)."""
    paths = []
    for row in range(min(searcher.index.count, 10 * n)):
        path = Path(searcher.index.image_path(row))
        if path.is_file():
            paths.append(path)
        if len(paths) == n:
            break
    return paths


def synthetic_searcher(n: int, workdir: Path, seed: int, codec: str | None = None):
    from cpfean.index import RetrievalIndex
    from cpfean.model import ModelConfig, build_model
    from cpfean.search import Searcher
    from pipelines.bench.gallery import GivenRegions, SyntheticGallery, write_index

    torch.manual_seed(seed)
    model = build_model(ModelConfig(feature_dim=16, embed_dim=1024), label_names=[]).eval()
    model.region_encoder = GivenRegions()  # the synthetic gallery is already encoded
    out = workdir / f"synthetic_{n}_{(codec or 'exact').replace(',', '_')}"
    if not (out / "index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        write_index(model, SyntheticGallery(n, 1024, seed=seed), out, codec=codec)
    return Searcher(model, RetrievalIndex(out), torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m pipelines.benchmark serve", description=__doc__.split("\n")[0]
    )
    p.add_argument("--index", default="runs/demo/index", help="the demo index")
    p.add_argument("--synthetic", type=int, default=0, help="also a synthetic index of N images")
    p.add_argument("--workdir", help="where the synthetic index goes (an existing folder)")
    p.add_argument(
        "--codec", default="auto", help="the synthetic index's codec (as pipelines.index)"
    )
    p.add_argument("--requests", type=int, default=200, help="sequential requests timed")
    p.add_argument(
        "--image-requests",
        type=int,
        default=0,
        help="also time this many image uploads (ranked captions) on --index",
    )
    p.add_argument("--detector-config", help="for --image-requests: the store's detector config")
    p.add_argument("--detector-weights", help="for --image-requests: its weights")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the demo index is searched")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if min(args.requests, args.clients, args.per_client, args.threads) < 1:
        p.error("--requests, --clients, --per-client and --threads must be >= 1")
    if args.workdir is not None and not Path(args.workdir).is_dir():
        p.error(f"--workdir {args.workdir} is not an existing folder")
    rows = []
    try:
        rows.append(
            measure(
                lambda: cli.open_searcher(args.index, None, args.device),
                args.index,
                args,
                uploads=args.image_requests,
            )
        )
    except (OSError, ValueError) as e:
        return cli.fail(e)
    if args.synthetic:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_serve_"))
        rows.append(
            measure(
                lambda: synthetic_searcher(
                    args.synthetic, work, args.seed, cli.index_codec(args.codec, args.synthetic)
                ),
                f"synthetic {args.synthetic:,}",
                args,
            )
        )
    print(
        f"text queries through HTTP on 127.0.0.1, k = 10, {args.threads} torch threads, "
        f"one model worker; {args.requests} sequential requests, then {args.clients} clients "
        f"x {args.per_client}\n"
    )
    print(
        "| index | images | search | sequential p50 / p99 ms | "
        f"{args.clients} clients: requests/s | p50 / p99 ms | image query p50 / p99 ms |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['index']} | {r['images']:,} | {r['path']} | {r['seq']} | {r['rps']:.1f} "
            f"| {r['conc']} | {r['image']} |"
        )
    if args.json:
        from cpfean.fileio import atomic_write_json

        atomic_write_json(args.json, {"benchmark": "serve", "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
