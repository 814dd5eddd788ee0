"""Paper-scale figures: the COCO 5K evaluation, and whether the data path keeps a GPU fed.

``python -m pipelines.benchmark eval [--images 5000] [--threads 2]``
    Encodes ``--images`` BUTD-shaped images (36 x 2048 features, boxes, labels) and five
    captions each with the default CPFEAN at d = 1024, then scores the five diagonal 1K blocks
    (COCO 5-fold 1K) and the whole matrix (COCO 5K), timing each stage and counting the
    floating-point operations of the scoring with ``torch.utils.flop_counter``.

``python -m pipelines.benchmark data --workdir DIR [--images 20000] [--workers 4]``
    Builds (once) a region store of ``--images`` x 36 x 2048 random features in DIR, then times
    the training data path (store -> DataLoader workers -> collated, tokenised batches of 128)
    and one training step of the BUTD-shaped model at batch 128 on this machine, with its FLOPs.

The text encoder is the offline MiniLM (the paper's BERT-base cannot be loaded here); the
printed FLOP counts let one scale to BERT-base and to a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cpfean.data.region_store import NUM_REGIONS, RegionRecord, RegionStore, RegionWriter
from cpfean.model import ModelConfig, build_model
from pipelines import cli

WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "riding",
    "red",
    "bike",
    "on",
    "the",
    "street",
    "with",
    "two",
    "people",
    "sitting",
    "table",
    "near",
    "window",
    "green",
    "grass",
    "field",
]


def _captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(8, 16)))) for _ in range(n)]


def _record(rng: np.random.Generator, dim: int, labels: int) -> RegionRecord:
    xy = rng.uniform(0, 400, size=(NUM_REGIONS, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 200, size=(NUM_REGIONS, 2))], 1)
    feats = np.maximum(rng.normal(size=(NUM_REGIONS, dim)), 0).astype(np.float32)
    return RegionRecord(
        feats,
        boxes.astype(np.float32),
        rng.integers(0, labels, NUM_REGIONS),
        rng.uniform(0.2, 1, NUM_REGIONS),
        (480, 640),
        NUM_REGIONS,
    )


def _butd_model(labels: int) -> torch.nn.Module:
    cfg = ModelConfig(feature_dim=2048, embed_dim=1024)
    return build_model(cfg, label_names=[f"object{i}" for i in range(labels)])


def _flops(fn) -> tuple[float, int]:
    """(seconds, floating-point operations) of one call of fn."""
    counter = FlopCounterMode(display=False)
    start = time.perf_counter()
    with counter:
        fn()
    return time.perf_counter() - start, counter.get_total_flops()


@torch.no_grad()
def bench_eval(args: argparse.Namespace) -> None:
    from cpfean.encode import encode_captions, encode_records

    rng = np.random.default_rng(args.seed)
    model = _butd_model(args.labels).eval()
    records = [_record(rng, 2048, args.labels) for _ in range(min(args.images, 256))]

    start = time.perf_counter()
    # the first records' features reused for the rest
    img = encode_records(model, [records[j % len(records)] for j in range(args.images)])
    t_img = time.perf_counter() - start
    caps = _captions(5 * args.images, args.seed)
    start = time.perf_counter()
    txt = encode_captions(model, caps, batch_size=256)
    t_txt = time.perf_counter() - start
    fold = args.images // 5
    t_blocks, f_blocks = _flops(
        lambda: [
            model.score(img[k * fold : (k + 1) * fold], txt[5 * k * fold : 5 * (k + 1) * fold])
            for k in range(5)
        ]
    )
    rows = [
        ("encode images (36 x 2048 -> 1024, region Transformer)", args.images, t_img, None),
        ("encode captions (MiniLM, 8-15 words)", len(caps), t_txt, None),
        ("score 5 diagonal blocks (COCO 5-fold 1K)", 5 * fold * 5 * fold, t_blocks, f_blocks),
    ]
    if not args.blocks_only:
        t_full, f_full = _flops(lambda: model.score(img, txt))
        rows.append(("score the whole matrix (COCO 5K)", args.images * len(caps), t_full, f_full))
    print(
        f"images={args.images}, captions={len(caps)}, d=1024, threads={args.threads}, "
        f"torch {torch.__version__}\n"
    )
    print("| stage | items or pairs | seconds | per second | GFLOP | GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, sec, flops in rows:
        g = f"{flops / 1e9:,.0f} | {flops / 1e9 / sec:,.1f}" if flops else "- | -"
        print(f"| {name} | {n:,} | {sec:,.1f} | {n / sec:,.0f} | {g} |")


def _build_store(path: Path, images: int, seed: int, labels: int) -> RegionStore:
    if (path / "data.mdb").exists() and len(RegionStore(path)) >= images:
        return RegionStore(path)
    rng = np.random.default_rng(seed)
    meta = {"feature_dim": 2048, "label_names": [f"object{i}" for i in range(labels)]}
    with RegionWriter(path, meta, commit_every=256) as writer:
        for i in range(images):
            image_id = f"{i:07d}.jpg"
            if image_id not in writer:
                writer.put(image_id, _record(rng, 2048, labels))
    return RegionStore(path)


def bench_data(args: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader, RandomSampler

    from cpfean.data.dataset import CaptionPairDataset, PairCollator

    start = time.perf_counter()
    store = _build_store(
        Path(args.workdir) / f"butd_{args.images}.lmdb", args.images, args.seed, args.labels
    )
    t_build = time.perf_counter() - start
    ids = store.ids()[: args.images]
    caps = _captions(5 * len(ids), args.seed)
    model = _butd_model(args.labels)
    dataset = CaptionPairDataset(store, ids, [caps[5 * i : 5 * i + 5] for i in range(len(ids))])
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        num_workers=args.workers,
        collate_fn=PairCollator(model.tokenize),
        drop_last=True,
        persistent_workers=False,
    )
    it = iter(loader)
    next(it)  # workers started, first batch out
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    t_load = time.perf_counter() - start
    del it
    loaded = args.batches * args.batch_size

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    from cpfean.model import ContrastiveLoss

    loss_fn = ContrastiveLoss(margin=0.2, max_violation=True)

    def step() -> None:
        sims = model(batch["regions"], batch["input_ids"], batch["attention_mask"])
        loss = loss_fn(sims, image_ids=batch["image_index"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t_step, flops = _flops(step)
    print(
        f"store: {len(ids):,} images x 36 x 2048 float16 ({t_build:.0f} s to build or "
        f"open), batch {args.batch_size}, workers {args.workers}, threads {args.threads}\n"
    )
    print("| what | images/s | seconds | GFLOP per step |")
    print("|---|---:|---:|---:|")
    print(
        f"| data path: store -> {args.workers} workers -> tokenised batches | "
        f"{loaded / t_load:,.0f} | {t_load:.1f} for {loaded:,} | - |"
    )
    print(
        f"| one training step, BUTD shapes, MiniLM, this CPU | {args.batch_size / t_step:,.1f} "
        f"| {t_step:.2f} | {flops / 1e9:,.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m pipelines.benchmark {eval,data}", description=__doc__.split("\n")[0]
    )
    p.add_argument("what", choices=["eval", "data"])
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="eval: test images (5000); data: store size (20000)",
    )
    p.add_argument("--workdir", help="data: where the benchmark store goes (an existing folder)")
    p.add_argument("--workers", type=int, default=4, help="data: DataLoader workers")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=30, help="data: batches timed")
    p.add_argument("--labels", type=int, default=1600, help="detector vocabulary size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks-only", action="store_true", help="eval: skip the 5K matrix")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.images = args.images or (5000 if args.what == "eval" else 20000)
    if args.images < 5 or args.images % 5:
        p.error(f"--images must be a positive multiple of 5, got {args.images}")
    for name in ("workers", "batch_size", "batches", "labels", "threads"):
        if getattr(args, name) < (0 if name == "workers" else 1):
            p.error(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")
    if args.what == "data" and (not args.workdir or not Path(args.workdir).is_dir()):
        p.error("data needs --workdir, an existing folder (the store takes ~150 KB an image)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (bench_eval if args.what == "eval" else bench_data)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
