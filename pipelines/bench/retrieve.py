"""Retrieval benchmark: two-stage (faiss first stage + CPFEAN re-rank) vs exhaustive CPFEAN.

    python -m pipelines.benchmark retrieve [--sizes 5000,100000,1000000] [--quick]

Galleries are synthetic *encoded* images (no detector, no encoder): 1000 concept vectors in d
dimensions and scene templates of 3 concepts, ~50 images per template. An image keeps each of
its template's concepts with p = 0.85, may add an extra object, and has 1-3 clutter concepts;
each of its 10-36 valid regions is one of them plus Gaussian noise (bigger objects get more
regions). A query names 2-3 concepts of a template: two noisy words per concept plus two
unrelated "function" words. The re-ranker is the real ``CPFEAN.score`` (fusion gates,
prominence, top-k alignment) with randomly initialised gate/prominence weights, so latency is
the real scoring cost; "exhaustive" is that same score over every image.

- 5K and 100K: the gallery is written by ``cpfean.index.build_index`` as a real index
  directory (float16 memory maps: regions, Gram matrices, gate terms, pooled vectors) in
  ``--workdir`` and queried through ``cpfean.index.search_index``, the code path of
  ``pipelines.retrieve`` (encoding the query text is not included). The exhaustive top-10 of
  every query is computed over the index's stored values, block by block.
- 1M: 1M x 36 x 1024 float16 region embeddings (73 GB) do not fit, so only the pooled vectors
  are materialised (IVF first stage) and the candidates' region embeddings are regenerated
  deterministically from their ids at query time (timed separately, as "gather"; a real index
  reads them from a memory map). Exhaustive CPFEAN over 1M is not computed (~10x the 100K
  cost per query); recall there is reported against the same re-ranking with an *exact*
  (flat) first stage, i.e. what the IVF approximation loses.
"""

from __future__ import annotations

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
    GivenRegions,
    SyntheticGallery,
    exhaustive_top_k,
    text_embeddings,
    write_index,
)


def _ms(xs: list[float]) -> str:
    return f"{np.percentile(xs, 50) * 1e3:.0f} / {np.percentile(xs, 95) * 1e3:.0f}"


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def bench_indexed(model, n: int, args, rows_out: list[dict]) -> None:
    """5K / 100K: a real index on disk, cpfean.index.search_index, exhaustive ground truth."""
    from cpfean.index import RetrievalIndex, search_index

    t0 = time.perf_counter()
    gal = SyntheticGallery(n, args.dim, seed=args.seed)
    words = gal.queries(args.queries)
    txt = text_embeddings(model, words)
    work = Path(tempfile.mkdtemp(prefix=f"bench_{n}_", dir=args.workdir))
    try:
        write_index(model, gal, work / "index")
        build_s = time.perf_counter() - t0
        index = RetrievalIndex(work / "index")
        t = time.perf_counter()
        truth = exhaustive_top_k(model, index, txt, args.top_k)
        score_s = time.perf_counter() - t
        t = time.perf_counter()
        index.first_stage("images")
        fs_build = time.perf_counter() - t
        size_gb = sum(f.stat().st_size for f in (work / "index").rglob("*")) / 2**30
        print(
            f"[{n}] index written in {build_s:.0f} s ({size_gb:.2f} GB on disk); exhaustive "
            f"scoring of {len(words)} queries took {score_s:.0f} s; flat first stage built in "
            f"{fs_build:.1f} s",
            file=sys.stderr,
        )
        ex_times = []
        for q in range(min(args.exhaustive_queries, len(words)) if n <= 20000 else 1):
            t = time.perf_counter()
            rows, _, _ = search_index(model, index, txt[q], top_k=args.top_k, exhaustive=True)
            ex_times.append(time.perf_counter() - t)
            if first_stage.recall_at(truth[q], rows) < 1.0:  # only float summation order differs
                print(
                    f"[{n}] note: query {q}: exhaustive search differs from the ground "
                    "truth pass (near-tie)",
                    file=sys.stderr,
                )
        rows_out.append(
            {
                "gallery": n,
                "path": "exhaustive",
                "first_stage": "-",
                "candidates": n,
                "p50_p95_ms": _ms(ex_times),
                "recall@10": 1.0,
                "queries": len(ex_times),
            }
        )
        for k in args.candidates:
            times, recalls = [], []
            for q in range(len(words)):
                t = time.perf_counter()
                rows, _, _ = search_index(model, index, txt[q], top_k=args.top_k, first_stage=k)
                times.append(time.perf_counter() - t)
                recalls.append(first_stage.recall_at(truth[q], rows))
            rows_out.append(
                {
                    "gallery": n,
                    "path": "two-stage",
                    "first_stage": "flat",
                    "candidates": k,
                    "p50_p95_ms": _ms(times),
                    "recall@10": float(np.mean(recalls)),
                    "queries": len(words),
                }
            )
            print(f"[{n}] {rows_out[-1]}", file=sys.stderr)
        rows_out[-1]["rss_gb"] = round(_rss_gb(), 2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


class _LazyPooled:
    """[N, d] normalised pooled vectors of a gallery, computed on indexing (for faiss)."""

    def __init__(self, gal: SyntheticGallery):
        self.gal, self.shape = gal, (gal.n, gal.d)

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.gal.n))
        return first_stage.normalise(self.gal.pooled_raw(np.asarray(rows)))


@torch.no_grad()
def bench_generated(model, n: int, args, rows_out: list[dict]) -> None:
    """1M: pooled vectors only, IVF first stage, candidates regenerated from their ids."""
    t0 = time.perf_counter()
    gal = SyntheticGallery(n, args.dim, seed=args.seed)
    words = gal.queries(args.queries)
    txt = text_embeddings(model, words)
    pooled = _LazyPooled(gal)
    qpool = np.stack(_pooled_queries(txt))
    kmax = max(args.candidates_1m)
    flat = first_stage.FirstStage(pooled, kind="flat")  # exact: the reference first stage
    print(
        f"[{n}] gallery + flat first stage built in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    exact, flat_ms = [], []
    for q in range(len(words)):
        t = time.perf_counter()
        exact.append(flat.search(qpool[q], kmax)[1][0])
        flat_ms.append(time.perf_counter() - t)
    del flat
    t = time.perf_counter()
    ivf = first_stage.FirstStage(pooled, kind="ivf")
    print(
        f"[{n}] IVF (nlist {ivf.index.nlist}) built in {time.perf_counter() - t:.0f} s",
        file=sys.stderr,
    )

    def rerank(q: int, cand: np.ndarray, timing: dict) -> np.ndarray:
        t = time.perf_counter()
        regions, mask = gal.regions(cand)
        emb = model.image_embeddings(torch.from_numpy(regions), torch.from_numpy(mask))
        timing["gather"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = model.score(emb, txt[q], image_chunk=1024, text_chunk=1)[:, 0].numpy()
        timing["score"] = time.perf_counter() - t
        return scores

    for k in args.candidates_1m:
        refs, score_ms = [], []  # the same re-ranking of the exact first stage's candidates
        for q in range(len(words)):
            ref_cand = np.sort(exact[q][:k])
            timing: dict = {}
            refs.append(
                (ref_cand, first_stage.top_k(rerank(q, ref_cand, timing), ref_cand, args.top_k)[0])
            )
            score_ms.append(timing["score"])
        rows_out.append(
            {
                "gallery": n,
                "path": "two-stage",
                "first_stage": "flat",
                "candidates": k,
                "queries": len(words),
                "recall@10": 1.0,
                "p50_p95_ms": _ms([a + b for a, b in zip(flat_ms, score_ms, strict=True)]),
                "first_stage_ms": _ms(flat_ms),
                "score_ms": _ms(score_ms),
                "recall_vs": "itself (the reference)",
            }
        )
        print(f"[{n}] {rows_out[-1]}", file=sys.stderr)
        for nprobe in args.nprobe:
            ivf.index.nprobe = nprobe
            fs, sc, ga, recalls, fs_recall = [], [], [], [], []
            for q in range(len(words)):
                timing: dict = {}
                t = time.perf_counter()
                _, cand = ivf.search(qpool[q], k)
                fs.append(time.perf_counter() - t)
                cand = np.sort(cand[0][cand[0] >= 0])
                rows, _ = first_stage.top_k(rerank(q, cand, timing), cand, args.top_k)
                sc.append(timing["score"])
                ga.append(timing["gather"])
                recalls.append(first_stage.recall_at(refs[q][1], rows))
                fs_recall.append(first_stage.recall_at(refs[q][0], cand))
            total = [a + b for a, b in zip(fs, sc, strict=True)]
            rows_out.append(
                {
                    "gallery": n,
                    "path": "two-stage",
                    "first_stage": f"ivf{ivf.index.nlist}/{nprobe}",
                    "candidates": k,
                    "p50_p95_ms": _ms(total),
                    "recall@10": float(np.mean(recalls)),
                    "queries": len(words),
                    "first_stage_ms": _ms(fs),
                    "score_ms": _ms(sc),
                    "gather_ms(generated)": _ms(ga),
                    "ivf_candidate_recall": float(np.mean(fs_recall)),
                    "recall_vs": "two-stage with an exact first stage",
                }
            )
            print(f"[{n}] {rows_out[-1]}", file=sys.stderr)
    rows_out[-1]["rss_gb"] = round(_rss_gb(), 2)


def _pooled_queries(txt) -> list[np.ndarray]:
    from cpfean.index import pooled_texts

    return list(pooled_texts(txt))


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.benchmark retrieve", __doc__)
    p.add_argument("--sizes", default="5000,100000,1000000", help="gallery sizes")
    p.add_argument("--dim", type=int, default=1024, help="embedding size d")
    p.add_argument("--queries", type=int, default=40)
    p.add_argument(
        "--exhaustive-queries",
        type=int,
        default=10,
        help="queries timed on the exhaustive path (1 above 20K images)",
    )
    p.add_argument("--candidates", default="100,200,500,1000", help="first-stage sizes")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--candidates-1m", default="200,500", help="first-stage sizes above 200K")
    p.add_argument("--nprobe", default="32,128", help="IVF lists scanned above 200K")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the index files go (temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the written indexes")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    args = p.parse_args(argv)
    if args.workdir is not None and not Path(args.workdir).is_dir():
        p.error(f"--workdir {args.workdir} is not an existing folder")
    if args.quick:
        args.sizes, args.dim, args.queries, args.candidates = "2000,250000", 256, 8, "100,300"
        args.candidates_1m, args.nprobe = "100", "16,64"
        args.exhaustive_queries = 3
    sizes = [int(s) for s in args.sizes.split(",")]
    args.candidates = [int(c) for c in args.candidates.split(",")]
    args.candidates_1m = [int(c) for c in args.candidates_1m.split(",")]
    args.nprobe = [int(c) for c in args.nprobe.split(",")]
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from cpfean.model import ModelConfig, build_model

    torch.manual_seed(args.seed)
    model = build_model(
        ModelConfig(text_encoder="tiny-random", feature_dim=16, embed_dim=args.dim, region_heads=1),
        label_names=[],
    ).eval()
    model.region_encoder = GivenRegions()  # the synthetic galleries are already encoded
    rows: list[dict] = []
    for n in sizes:
        (bench_indexed if n <= 200_000 else bench_generated)(model, n, args, rows)
    print(
        f"\nretrieval, d={args.dim}, top-{args.top_k}, {args.threads} threads, "
        f"{args.queries} queries (p50 / p95 per query, query text encoding excluded)\n"
    )
    print(
        "| gallery | path | first stage | candidates | latency p50 / p95 ms | "
        "recall@10 | recall of |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['gallery']:,} | {r['path']} | {r['first_stage']} | {r['candidates']:,} | "
            f"{r['p50_p95_ms']} | {r['recall@10']:.3f} | "
            f"{r.get('recall_vs', 'exhaustive top-10')} |"
        )
    print(
        "\nlatency = first stage + CPFEAN re-rank (+ reading candidates from the index's "
        "memory maps up to 200K; above, candidates are generated, see gather_ms in --json); "
        f"peak RSS {_rss_gb():.1f} GB"
    )
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
