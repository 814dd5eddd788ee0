"""Compressed region embeddings: what each codec costs in retrieval quality and saves on disk.

    python -m pipelines.benchmark codec [--checkpoint runs/demo/cpfean/best.pt]
        [--regions runs/scaling/heldout/regions]
        [--captions runs/scaling/heldout/data/captions.json]
        [--codec none --codec SQ8 --codec SQ4 ...] [--json F]

For each codec, the gallery is indexed through ``cpfean.index.build_index`` (captions of the
whole caption file), every image is scored against every caption from the index as the
re-rank reads it (decoded regions, Gram matrices derived from them), and the recalls come from
``cpfean.metrics.recall_metrics``. The default gallery is the scaling study's 1,000 held-out
scenes (``scripts/scaling_study.sh`` writes them with the demo's detector), which the demo's
matcher never saw.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cpfean.fileio import atomic_write_json
from pipelines import cli


def _region_bytes(index_dir: Path) -> int:
    """Bytes of what keeps the regions: codes, per-region fields, mask (or every emb. field)."""
    from cpfean.index import RetrievalIndex

    images = RetrievalIndex(index_dir).data / "images"
    names = ["codes.npy", "offsets.npy", "codec.npy", *[p.name for p in images.glob("ragged.*")]]
    names += [p.name for p in images.glob("emb.*.npy")]
    return sum((images / n).stat().st_size for n in names if (images / n).is_file())


@torch.no_grad()
def measure(model, store, captions, owners, codec: str, work: Path, args) -> dict:
    from cpfean.index import RetrievalIndex, build_index
    from cpfean.metrics import recall_metrics

    slug = re.sub(r"[^A-Za-z0-9]+", "_", codec)
    t = time.perf_counter()
    built = build_index(
        model,
        store,
        work / slug,
        checkpoint={"path": args.checkpoint, "sha256": args.sha256},
        config={},
        image_ids=owners[::5],
        captions=captions,
        caption_image_ids=owners,
        codec=None if codec == "none" else codec,
        force=True,
    )
    build_s = time.perf_counter() - t
    index = RetrievalIndex(built.path)
    texts = index.caption_embeddings(slice(None))
    sims = []
    for start in range(0, index.count, 100):
        rows = np.arange(start, min(start + 100, index.count))
        sims.append(model.score(index.images(rows), texts, image_chunk=100).float().numpy())
    metrics = recall_metrics(np.concatenate(sims))
    row = {
        "codec": codec,
        "images": index.count,
        "regions_per_image": float(np.asarray(index.images(slice(None)).mask).sum() / index.count),
        "region_bytes_per_image": _region_bytes(built.path) / index.count,
        "index_bytes_per_image": sum(f.stat().st_size for f in built.path.rglob("*") if f.is_file())
        / index.count,
        "build_s": round(build_s, 1),
        "rsum": round(metrics["rsum"], 1),
        "i2t_r1": round(metrics["i2t"]["r1"], 1),
        "t2i_r1": round(metrics["t2i"]["r1"], 1),
    }
    print(f"[codec] {row}", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.benchmark codec", __doc__)
    p.add_argument("--checkpoint", default="runs/demo/cpfean/best.pt")
    p.add_argument("--regions", default="runs/scaling/heldout/regions")
    p.add_argument("--captions", default="runs/scaling/heldout/data/captions.json")
    p.add_argument("--codec", action="append", help="a faiss codec, or none (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the indexes go (a temporary folder)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    codecs = args.codec or ["none", "SQ8", "SQ4", "PCAR256,SQ4", "PQ64"]
    torch.set_num_threads(args.threads)
    try:
        from cpfean.checkpoint import checkpoint_fingerprint, load_model
        from cpfean.data.captions import check_ids, load_captions
        from cpfean.data.region_store import RegionStore

        for path in (args.checkpoint, args.captions):
            if not Path(path).is_file():
                raise FileNotFoundError(f"not found: {path}")
        model, _, _ = load_model(args.checkpoint, "cpu")
        args.sha256 = checkpoint_fingerprint(args.checkpoint)
        store = RegionStore(args.regions)
        caps = load_captions(args.captions)
        check_ids(caps, store.ids())
    except (OSError, ValueError, KeyError) as exc:
        return cli.fail(exc)
    captions, owners = [], []
    for image_id, group in zip(caps.image_ids, caps.captions, strict=True):
        if image_id in store and len(group) == 5:
            captions += group
            owners += [image_id] * 5
    work = Path(tempfile.mkdtemp(prefix="bench_codec_", dir=args.workdir))
    try:
        rows = [measure(model, store, captions, owners, c, work, args) for c in codecs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((r["rsum"] for r in rows if r["codec"] == "none"), None)
    print(f"\ncodecs on {rows[0]['images']} images ({args.regions}), {args.threads} threads\n")
    print("| codec | region bytes / image | index bytes / image | rSum | vs none | t2i R@1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        diff = f"{r['rsum'] - base:+.1f}" if base is not None else "-"
        print(
            f"| {r['codec']} | {r['region_bytes_per_image']:,.0f} | "
            f"{r['index_bytes_per_image']:,.0f} | {r['rsum']:.1f} | {diff} | {r['t2i_r1']:.1f} |"
        )
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
