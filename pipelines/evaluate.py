"""Evaluate checkpoints with the field's protocols.

    python -m pipelines.evaluate --checkpoint RUN/best.pt [--protocol f30k|coco-5k|...]
                                 [--split test|all] [--regions STORE] [--captions FILE] [--json OUT]

Several ``--checkpoint`` values form an ensemble: their similarity matrices are averaged.
The region store and caption source default to the ones the (first) checkpoint trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpfean.checkpoint import load_model, resolve_device
from cpfean.data.captions import check_ids, load_captions
from cpfean.data.region_store import RegionStore
from cpfean.evaluation import similarity_matrix
from cpfean.metrics import ensemble, evaluate_protocol, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="checkpoint file; repeat for an ensemble")
    parser.add_argument("--protocol", default="all",
                        choices=["all", "f30k", "coco-5fold-1k", "coco-5k"])
    parser.add_argument("--split", default=None,
                        help="caption split (default: config's test); 'all' = every image of the "
                             "caption file, e.g. a separately generated held-out set")
    parser.add_argument("--regions", help="region store (default: the checkpoint's)")
    parser.add_argument("--captions", help="caption source (default: the checkpoint's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--name", default=None, help="row name in the printed table")
    parser.add_argument("--json", help="write the metrics here as JSON")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    sims_list, cfg = [], None
    for path in args.checkpoint:
        try:
            model, ckpt_cfg, _ = load_model(path, device)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        cfg = cfg or ckpt_cfg
        store = RegionStore(args.regions or ckpt_cfg.data.regions)
        caps = load_captions(args.captions or ckpt_cfg.data.captions,
                             split=None if args.split == "all"
                             else args.split or ckpt_cfg.data.test_split)
        check_ids(caps, store.ids())
        sims_list.append(similarity_matrix(
            model, store, caps.image_ids, caps.flatten(5)[0],
            batch_size=args.batch_size, device=device,
            progress=True,
        ))
    sims = sims_list[0] if len(sims_list) == 1 else ensemble(sims_list)
    results = evaluate_protocol(sims, args.protocol)
    name = args.name or (Path(args.checkpoint[0]).parent.name if len(args.checkpoint) == 1
                         else f"ensemble of {len(args.checkpoint)}")
    print(format_table({name: results}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
