"""Retrieval benchmark: a real index of N synthetic images, searched as ``serve`` searches it.

    python -m pipelines.benchmark retrieve [--sizes 5000,100000,1000000] [--codec auto]
                                           [--workdir DIR --keep] [--json F] [--quick]

Galleries are synthetic *encoded* images (no detector): 1000 concept vectors in d dimensions
and scene templates of 3 concepts, ~50 images per template. An image keeps each of its
template's concepts with p = 0.85, may add an extra object, and has 1-3 clutter concepts; each
of its 10-36 valid regions is one of them plus Gaussian noise (bigger objects get more
regions). A query names 2-3 concepts of a template: two noisy words per concept plus two
unrelated "function" words. The re-ranker is the real ``CPFEAN.score`` (fusion gates,
prominence, top-k alignment) with randomly initialised gate/prominence weights.

For each size:

1. the gallery is written by ``cpfean.index.build_index`` as a real index under ``--workdir``
   (with ``--codec``; auto = SQ8 above 20,000 images, as ``pipelines.index``), kept with
   ``--keep`` and then reused by a later run (its build key);
2. the ground truth is the exhaustive top-10 of every query over the gallery's *exact* values
   (regions regenerated in float32 from their ids, scored by the same model), computed once
   and kept beside the index;
3. a fresh process (so its resident memory is the searcher's alone) opens the index as
   ``serve`` does, then per query encodes one real text with the offline MiniLM encoder (so
   the latency includes query encoding) and runs ``cpfean.index.search_index`` with the
   query's synthetic word vectors, for each ``--candidates`` size of the first stage.

Reported per size and candidate count: images, index_bytes, resident_mb (peak RSS of the
searching process), p50_ms / p95_ms (encoding + search), recall_at_10 (of the exhaustive exact
top-10), candidates.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cpfean import first_stage
from cpfean.fileio import atomic_write_json
from pipelines import cli
from pipelines.bench.gallery import (
    QUERIES,
    GivenRegions,
    SyntheticGallery,
    exact_top_k,
    text_embeddings,
    write_index,
)


def _model(dim: int, seed: int, text_encoder: str = "tiny-random"):
    """The benchmark's matcher: CPFEAN's scoring at ``dim`` over already-encoded regions."""
    from cpfean.model import ModelConfig, build_model

    torch.manual_seed(seed)  # the same weights in the parent and the searching process
    model = build_model(
        ModelConfig(text_encoder=text_encoder, feature_dim=16, embed_dim=dim, region_heads=1),
        label_names=[],
    ).eval()
    model.region_encoder = GivenRegions()
    return model


def _peak_mb() -> float:
    """Peak resident memory of this process's own address space (VmHWM). Not ru_maxrss: Linux
    carries that over from the parent through fork and exec, so a spawned child would report
    the builder's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def search_process(spec: dict) -> dict:
    """Run in a fresh process: open the index as serve does and time every query."""
    import faiss

    from cpfean.index import RetrievalIndex, search_index

    torch.set_num_threads(spec["threads"])
    faiss.omp_set_num_threads(spec["threads"])
    model = _model(spec["dim"], spec["seed"])
    encoder = _model(spec["dim"], spec["seed"], text_encoder="minilm") if spec["encode"] else None
    with np.load(spec["queries"]) as saved:
        words = [saved[f"arr_{q}"] for q in range(len(saved.files))]
    truth = np.load(spec["truth"])
    t = time.perf_counter()
    index = RetrievalIndex(spec["index"])
    index.preload()
    index.first_stage("images")
    open_s = time.perf_counter() - t
    txt = text_embeddings(model, words)
    runs = []
    for k in spec["candidates"]:
        times, recalls, encode = [], [], []
        for q in range(len(words)):
            t = time.perf_counter()
            if encoder is not None:
                enc = encoder.tokenize([QUERIES[q % len(QUERIES)]])
                encoder.encode_texts(enc["input_ids"], enc["attention_mask"])
            encode.append(time.perf_counter() - t)
            rows, _, info = search_index(
                model, index, txt[q], top_k=spec["top_k"], rerank=k or None, exhaustive=k == 0
            )
            times.append(time.perf_counter() - t)
            recalls.append(first_stage.recall_at(truth[q], rows))
        runs.append(
            {
                "candidates": info["candidates"],
                "path": info["path"],
                "p50_ms": round(1e3 * float(np.percentile(times, 50)), 1),
                "p95_ms": round(1e3 * float(np.percentile(times, 95)), 1),
                "encode_p50_ms": round(1e3 * float(np.percentile(encode, 50)), 1),
                "recall_at_10": float(np.mean(recalls)),
                "queries": len(words),
            }
        )
    return {"runs": runs, "resident_mb": round(_peak_mb()), "open_s": round(open_s, 1)}


@torch.no_grad()
def bench_size(model, n: int, args, work: Path) -> list[dict]:
    """Build (or reuse) the index of ``n`` images, its ground truth, then search it."""
    codec = cli.index_codec(args.codec, n)
    folder = work / f"retrieve_{n}_d{args.dim}_s{args.seed}_{(codec or 'exact').replace(',', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    gal = SyntheticGallery(n, args.dim, seed=args.seed)
    words = gal.queries(args.queries)
    t = time.perf_counter()
    built = write_index(model, gal, folder / "index", codec=codec)
    build_s = time.perf_counter() - t
    truth_path = folder / f"truth_q{args.queries}_k{args.top_k}.npy"
    t = time.perf_counter()
    if not truth_path.is_file():
        truth = exact_top_k(model, gal, text_embeddings(model, words), args.top_k)
        np.save(truth_path, truth)
    truth_s = time.perf_counter() - t
    np.savez(folder / "queries.npz", *words)  # arr_0, arr_1, ...: one [L, d] per query
    del gal
    index_bytes = sum(f.stat().st_size for f in built.path.rglob("*") if f.is_file())
    print(
        f"[{n}] index {'kept' if built.up_to_date else f'built in {build_s:.0f} s'} "
        f"({index_bytes / 2**30:.2f} GB, codec {codec}); exact ground truth "
        f"{'kept' if truth_s < 1 else f'in {truth_s:.0f} s'}",
        file=sys.stderr,
    )
    candidates = list(args.candidates) + ([0] if n <= args.exhaustive_max else [])
    spec = {
        "index": str(built.path),
        "queries": str(folder / "queries.npz"),
        "truth": str(truth_path),
        "dim": args.dim,
        "seed": args.seed,
        "threads": args.threads,
        "top_k": args.top_k,
        "candidates": candidates,
        "encode": not args.no_encode,
    }
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        found = pool.apply(search_process, (spec,))
    rows = [
        {
            "images": n,
            "codec": codec or "none",
            "index_bytes": index_bytes,
            "resident_mb": found["resident_mb"],
            "open_s": found["open_s"],
            "build_s": None if built.up_to_date else round(build_s),
            **run,
        }
        for run in found["runs"]
    ]
    for r in rows:
        print(f"[{n}] {r}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.benchmark retrieve", __doc__)
    p.add_argument("--sizes", default="5000,100000,1000000", help="gallery sizes")
    p.add_argument("--dim", type=int, default=512, help="embedding size d (the demo's)")
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--candidates", default="200,500,1000", help="first-stage sizes")
    p.add_argument("--exhaustive-max", type=int, default=20_000, help="also time exhaustive")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--codec", default="auto", help="as pipelines.index --codec")
    p.add_argument("--no-encode", action="store_true", help="leave query encoding out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the indexes go (a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the indexes (a re-run reuses them)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    args = p.parse_args(argv)
    if args.workdir is not None and not Path(args.workdir).is_dir():
        p.error(f"--workdir {args.workdir} is not an existing folder")
    if args.quick:
        args.sizes, args.dim, args.queries, args.candidates = "2000,30000", 64, 8, "100,300"
    sizes = [int(s) for s in args.sizes.split(",")]
    args.candidates = [int(c) for c in args.candidates.split(",")]
    if min(sizes) < 1 or min(args.candidates) < 1:
        p.error("--sizes and --candidates must be >= 1")
    torch.set_num_threads(args.threads)
    model = _model(args.dim, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench_retrieve_", dir=args.workdir))
    if args.keep and args.workdir:
        shutil.rmtree(work)
        work = Path(args.workdir)  # a kept index is found again by the next run
    rows: list[dict] = []
    try:
        for n in sizes:
            rows += bench_size(model, n, args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nretrieval, d={args.dim}, top-{args.top_k}, {args.threads} threads, {args.queries} "
        "queries; latency per query includes "
        + ("query encoding (MiniLM)" if not args.no_encode else "no query encoding")
        + "\n"
    )
    print(
        "| images | codec | index GB | search | candidates | p50 / p95 ms | recall@10 | "
        "resident MB |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['images']:,} | {r['codec']} | {r['index_bytes'] / 2**30:.2f} | {r['path']} | "
            f"{r['candidates']:,} | {r['p50_ms']:.0f} / {r['p95_ms']:.0f} | "
            f"{r['recall_at_10']:.3f} | {r['resident_mb']:,} |"
        )
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
