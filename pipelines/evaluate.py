"""Evaluate checkpoints with the field's protocols.

    python -m pipelines.evaluate --checkpoint RUN/best.pt [--protocol f30k|coco-5k|...]
                                 [--split test|all] [--images N] [--regions STORE]
                                 [--captions FILE] [--json OUT]

Several ``--checkpoint`` values form an ensemble: their similarity matrices are averaged.
The region store and caption source default to the ones the (first) checkpoint trained on.

``--against B.pt`` (repeatable, an ensemble too) also scores a second model on the same images
and captions and prints the rSum difference with a 95% interval from a paired bootstrap over
the images (``--resamples``, default 1000): on a 100-image test split a few rSum points are
often inside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpfean.checkpoint import load_model, resolve_device
from cpfean.data.captions import MissingImagesError, check_ids, load_captions
from cpfean.data.region_store import RegionStore
from cpfean.eccv import eccv_ids, eccv_metrics, format_eccv
from cpfean.evaluation import similarity_blocks, similarity_matrix
from cpfean.fileio import atomic_write_json
from cpfean.metrics import (
    check_protocol_size,
    ensemble,
    evaluate_fold_blocks,
    evaluate_protocol,
    format_table,
    paired_bootstrap,
)
from pipelines import cli


def _protocols(protocol: str, n_images: int, fold_size: int) -> list[str]:
    """What to report: a named protocol, or for "all" on a COCO-sized test set (five folds)
    both of COCO's tables, else the whole matrix."""
    if protocol == "eccv":  # the usual COCO 5K keys, the ECCV and CxC ones beside them
        return ["coco-5k"]
    if protocol != "all":
        return [protocol]
    return ["coco-5fold-1k", "coco-5k"] if n_images == 5 * fold_size else ["all"]


def _parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.evaluate", __doc__)
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="checkpoint file; repeat for an ensemble",
    )
    parser.add_argument(
        "--protocol",
        default="all",
        choices=["all", "f30k", "coco-5fold-1k", "coco-5k", "eccv"],
        help="'all' on 5 folds of images (COCO 5K) prints both COCO tables; 'eccv': COCO 5K "
        "with ECCV Caption mAP@R, R-Precision, R@1 and CxC R@K (needs --coco-captions)",
    )
    parser.add_argument(
        "--coco-captions",
        help="with --protocol eccv: COCO's captions_val2014.json, for each caption's COCO id",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="caption split (default: config's test); 'all' = every image of the "
        "caption file, e.g. a separately generated held-out set",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="score only the first N images of the split (0 = all), e.g. to compare how "
        "well a model fits its training images with how it does on new ones",
    )
    parser.add_argument("--regions", help="region store (default: the checkpoint's)")
    parser.add_argument("--captions", help="caption source (default: the checkpoint's)")
    parser.add_argument(
        "--fold-size", type=int, default=1000, help="images per COCO fold (1000 as published)"
    )
    parser.add_argument(
        "--any-size",
        action="store_true",
        help="run a protocol on a test set of another size (small fixtures)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--name", default=None, help="row name in the printed table")
    parser.add_argument("--json", help="write the metrics here as JSON")
    parser.add_argument(
        "--against", action="append", help="a second model (repeat for an ensemble) to compare with"
    )
    parser.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples for --against"
    )
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse out-of-range and conflicting options before anything loads."""
    for name in ("resamples", "batch_size", "fold_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.images < 0:
        parser.error(f"--images must be >= 0 (0 = all), got {args.images}")
    if args.json and Path(args.json).is_dir():
        parser.error(f"--json {args.json} is a folder; give a file name")
    if args.against and args.protocol == "coco-5fold-1k":
        parser.error("--against compares whole matrices; use --protocol coco-5k or all")
    if (args.protocol == "eccv") != bool(args.coco_captions):
        parser.error("--protocol eccv and --coco-captions go together")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        device = resolve_device(args.device)
        sims, caps = _similarities(args.checkpoint, args, device)
        other = _similarities(args.against, args, device) if args.against else None
    except (OSError, ValueError, MissingImagesError) as exc:
        return cli.fail(exc)
    if other is not None and (
        other[1].image_ids != caps.image_ids or other[1].flatten(5)[0] != caps.flatten(5)[0]
    ):
        return cli.fail(
            "--against scored other images or captions than --checkpoint; "
            "give --regions and --captions"
        )
    protocols = _protocols(args.protocol, len(caps.image_ids), args.fold_size)
    names = {"model": args.name or _name(args.checkpoint)}
    if other is not None:
        other_name = _name(args.against)
        if other_name == names["model"]:  # e.g. two runs' best.pt, each in a folder "full"
            other_name = f"{other_name} (--against)"
        names["against"] = other_name
    matrices = {"model": sims, "against": other[0] if other is not None else None}
    results: dict = {key: {} for key in names}
    table: dict = {}
    for protocol in protocols:
        suffix = f" ({protocol})" if len(protocols) > 1 else ""
        for key, name in names.items():
            results[key][protocol] = _evaluate(matrices[key], protocol, args)
            table[name + suffix] = results[key][protocol]
    print(format_table(table))
    if args.protocol == "eccv":
        try:
            rows = {n: eccv_metrics(matrices[k], *args.eccv_ids) for k, n in names.items()}
        except ValueError as exc:
            return cli.fail(exc)
        for key, name in names.items():
            results[key]["coco-5k"]["eccv"] = rows[name]
        print("\n" + format_eccv(rows))
    one = len(protocols) == 1
    payload: dict = {k: (r[protocols[0]] if one else r) for k, r in results.items()}
    if other is not None:
        payload["comparison"] = _compare(sims, other[0], len(caps.image_ids), args.resamples)
    if args.json:
        atomic_write_json(args.json, payload if other is not None else payload["model"], indent=2)
    return 0


def _compare(sims, other, n_images: int, resamples: int) -> dict:
    """The paired bootstrap of the two models' rSum over the images, printed."""
    comparison = paired_bootstrap(sims, other, resamples=resamples)
    print(
        f"rSum difference on all {n_images} images: {comparison['diff']:+.1f} "
        f"(95% interval {comparison['ci_low']:+.1f} .. {comparison['ci_high']:+.1f}; "
        f"ahead in {100 * comparison['a_ahead']:.1f}% of {comparison['resamples']} "
        "resamples of the images)"
    )
    return comparison


def _evaluate(sims, protocol: str, args: argparse.Namespace):
    if isinstance(sims, list):  # the five diagonal blocks only
        return evaluate_fold_blocks(sims)
    return evaluate_protocol(sims, protocol, fold_size=args.fold_size, strict=not args.any_size)


def _name(paths: list[str]) -> str:
    return Path(paths[0]).parent.name if len(paths) == 1 else f"ensemble of {len(paths)}"


def _similarities(paths: list[str], args: argparse.Namespace, device):
    """The (ensembled) similarity matrix of ``paths`` and the caption set it scores; for
    ``--protocol coco-5fold-1k`` only its five diagonal blocks (a list)."""
    sims_list = []
    caps = None
    for path in paths:
        model, ckpt_cfg, _ = load_model(path, device)
        store = RegionStore(args.regions or ckpt_cfg.data.regions)
        caps = load_captions(
            args.captions or ckpt_cfg.data.captions,
            split=None if args.split == "all" else args.split or ckpt_cfg.data.test_split,
        )
        check_ids(caps, store.ids())
        caps = caps.head(args.images)
        n = len(caps.image_ids)
        if args.protocol == "eccv" and not hasattr(args, "eccv_ids"):  # before any scoring
            args.eccv_ids = eccv_ids(caps, args.coco_captions)
        for protocol in _protocols(args.protocol, n, args.fold_size):  # before any scoring
            check_protocol_size(protocol, n, fold_size=args.fold_size, strict=not args.any_size)
        kwargs = dict(batch_size=args.batch_size, device=device, progress=True)
        if args.protocol == "coco-5fold-1k":
            sims_list.append(
                similarity_blocks(
                    model,
                    store,
                    caps.image_ids,
                    caps.flatten(5)[0],
                    fold_size=args.fold_size,
                    **kwargs,
                )
            )
        else:
            sims_list.append(
                similarity_matrix(model, store, caps.image_ids, caps.flatten(5)[0], **kwargs)
            )
    if len(sims_list) == 1:
        return sims_list[0], caps
    if isinstance(sims_list[0], list):
        return [ensemble([s[k] for s in sims_list]) for k in range(len(sims_list[0]))], caps
    return ensemble(sims_list), caps


if __name__ == "__main__":
    sys.exit(main())
