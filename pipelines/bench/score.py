"""Scoring benchmark: the full image x caption similarity matrix from cached embeddings.

``python -m pipelines.benchmark score [--images 1000 --captions 5000 --threads 2 --dim 1024]``

Random unit-norm encoded embeddings (the encoders are skipped): ``--images`` x 36 regions and
``--captions`` of 8-20 words. Rows of the printed markdown table:

- CPFEAN ``score`` (fusion gates, top-k alignment, prominence pooling);
- the SCAN-style baseline ``score`` (t-i AVG cross attention, algebraic);
- the floor: the region-word similarity GEMM and a max/mean reduction, nothing else;
- the naive SCAN evaluation loop (one caption at a time against all images, explicit
  (images, L, d) context tensors), timed on ``--naive-captions`` captions and extrapolated.

Peak memory is the rise of the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs before each row) over the resident size before the row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cpfean.checkpoint import resolve_device
from cpfean.fileio import atomic_write_json
from cpfean.model import CPFEAN, ImageEmbeddings, ModelConfig, TextEmbeddings, build_model
from cpfean.model.reference import scan_t2i_naive
from pipelines import cli

REGIONS = 36


def random_embeddings(
    *, images: int, captions: int, dim: int, topk: int, seed: int
) -> tuple[CPFEAN, CPFEAN, ImageEmbeddings, TextEmbeddings]:
    """The CPFEAN and SCAN-style models (randomly initialised) and encoded-looking inputs:
    unit-norm regions (images, 36, d), words (captions, 8-20, d), embedded by the CPFEAN model
    (Gram matrices, gate terms, prominence)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tiny = dict(text_encoder="tiny-random", feature_dim=16, embed_dim=dim, region_heads=1)
    cpfean = build_model(ModelConfig(**tiny, topk=topk), label_names=[]).eval()
    baseline = build_model(ModelConfig.scan_baseline(**tiny), label_names=[]).eval()
    V = F.normalize(torch.randn(images, REGIONS, dim, generator=g), dim=-1)
    lengths = torch.randint(8, 21, (captions,), generator=g)
    L = int(lengths.max())
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (C, L)
    W = torch.where(
        mask[..., None], F.normalize(torch.randn(captions, L, dim, generator=g), dim=-1), 0
    )
    with torch.no_grad():
        img = cpfean.image_embeddings(V, torch.ones(images, REGIONS, dtype=torch.bool))
        txt = cpfean.text_embeddings(W, mask, torch.zeros(captions, L, dtype=torch.long))
    return cpfean, baseline, img, txt


def floor_scores(
    img: ImageEmbeddings, txt: TextEmbeddings, *, image_chunk: int, text_chunk: int
) -> torch.Tensor:
    """S = W V^T per block (one GEMM, captions cut to their chunk's length as in ``score``),
    max over regions, mean over valid words: (B, C)."""
    span = txt.word_span()
    order = torch.argsort(span, descending=True, stable=True)
    spans = span[order].tolist()
    R, d = img.regions.shape[1:]
    cols = []
    for j in range(0, len(txt), text_chunk):
        L, idx = spans[j], order[j : j + text_chunk]
        W, m = txt.words[idx, :L], txt.mask[idx, :L]  # (bc, L, d), (bc, L)
        rows = []
        for i in range(0, len(img), image_chunk):
            V = img.regions[i : i + image_chunk]
            S = (W.reshape(-1, d) @ V.reshape(-1, d).T).view(len(W), L, len(V), R)
            best = S.amax(-1)  # (bc, L, bi)
            rows.append(((best * m[..., None]).sum(1) / m.sum(1, keepdim=True)).T)
        cols.append(torch.cat(rows, dim=0))
    return torch.cat(cols, dim=1)[:, torch.argsort(order)]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def measure(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """Runs fn once under no_grad: (seconds, peak memory rise in MB, result). On CUDA the
    peak is the device's allocated high-water mark, and the time waits for the device."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return seconds, max(torch.cuda.max_memory_allocated() - before, 0) / 2**20, out
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    seconds = time.perf_counter() - start
    return seconds, max(_status_kb("VmHWM") - before, 0) / 1024, out


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m pipelines.benchmark score", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-chunk", type=int, default=32)
    parser.add_argument("--text-chunk", type=int, default=128)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument(
        "--naive-captions",
        type=int,
        default=100,
        help="captions the naive loop is timed on (then extrapolated)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.captions, args.dim, args.naive_captions = 40, 100, 64, 10
    torch.set_num_threads(args.threads)
    cpfean_model, baseline, img, txt = random_embeddings(
        images=args.images, captions=args.captions, dim=args.dim, topk=args.topk, seed=args.seed
    )
    device = resolve_device(args.device)
    cpfean_model, baseline = cpfean_model.to(device), baseline.to(device)
    img, txt = img.to(device), txt.to(device)
    pairs = args.images * args.captions
    chunks = dict(image_chunk=args.image_chunk, text_chunk=args.text_chunk)
    rows = []

    def add(name: str, n_pairs: int, seconds: float, peak: float, note: str = "") -> None:
        rows.append((name, n_pairs, seconds, n_pairs / seconds, peak, note))

    sec, peak, cpfean = measure(lambda: cpfean_model.score(img, txt, **chunks))
    add(f"CPFEAN score (fusion, top-{args.topk}, prominence)", pairs, sec, peak)
    sec, peak, scan = measure(lambda: baseline.score(img, txt, **chunks))
    add("SCAN-style baseline score (t-i AVG)", pairs, sec, peak)
    sec, peak, _ = measure(lambda: floor_scores(img, txt, **chunks))
    add("floor: S = W V^T + max/mean", pairs, sec, peak)
    n = min(args.naive_captions, args.captions)
    words = [txt.words[c][txt.mask[c]] for c in range(n)]  # on the device, as the loop runs
    sec, peak, naive = measure(
        lambda: scan_t2i_naive(img.regions, words, lambda_softmax=baseline.lambda_softmax)
    )
    add(
        "naive SCAN loop (explicit d-dim contexts)",
        args.images * n,
        sec,
        peak,
        f"extrapolated: {pairs * sec / (args.images * n):.1f} s for all pairs",
    )
    agree = (naive.float() - scan[:, :n]).abs().max().item()
    assert torch.isfinite(cpfean).all()

    print(
        f"images={args.images} x {REGIONS} regions, captions={args.captions} (8-20 words), "
        f"d={args.dim}, threads={args.threads}, chunks={args.image_chunk}x{args.text_chunk}, "
        f"device={device}, torch {torch.__version__}"
    )
    print()
    print("| method | pairs timed | seconds | pairs/s | peak MB | note |")
    print("|---|---:|---:|---:|---:|---|")
    for name, n_pairs, seconds, rate, peak, note in rows:
        print(f"| {name} | {n_pairs:,} | {seconds:.2f} | {rate:,.0f} | {peak:.0f} | {note} |")
    print()
    print(f"SCAN-style baseline vs naive loop, max |difference| = {agree:.2e}")
    if args.json:
        keys = ("method", "pairs", "seconds", "pairs_per_s", "peak_mb", "note")
        atomic_write_json(
            args.json,
            {
                "benchmark": "score",
                "device": str(device),
                "rows": [dict(zip(keys, r, strict=True)) for r in rows],
                "baseline_vs_naive_max_diff": agree,
            },
            indent=2,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
