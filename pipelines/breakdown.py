"""``python -m pipelines.breakdown --captions CAPTIONS --sims NAME=SIMS.npy [--sims ...]``

Held-out retrieval by kind of scene: rSum and text -> image R@1 of each model for images whose
captions mention 1, 2, 3 or 4+ objects, and for scenes with objects no caption mentions
(``cpfean.breakdown``). ``SIMS.npy`` is an [images, 5 x images] score matrix in the caption
file's image order, as ``pipelines.ablate --heldout-regions`` writes (``heldout_sims.npy``).
Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cpfean.breakdown import metrics_by_group, scene_groups
from cpfean.data.captions import load_captions
from cpfean.fileio import atomic_write_json
from pipelines import cli


def _table(title: str, rows: dict[str, dict[str, dict]]) -> str:
    """One line per group: its images, then rSum and t2i R@1 of each model."""
    models = list(rows)
    groups = list(next(iter(rows.values())))
    head = f"| {title} | images | " + " | ".join(f"{m} rSum | {m} t2i R@1" for m in models) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(models)]
    for g in groups:
        cells = " | ".join(
            f"{rows[m][g]['rsum']:.1f} | {rows[m][g]['t2i']['r1']:.1f}" for m in models
        )
        lines.append(f"| {g} | {rows[models[0]][g]['images']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.breakdown", __doc__)
    p.add_argument("--captions", required=True, help="the held-out scenes' captions.json")
    p.add_argument("--sims", action="append", required=True, help="NAME=PATH (repeatable)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    try:
        models = dict(item.split("=", 1) for item in args.sims)
    except ValueError:
        return cli.fail(f"--sims takes NAME=PATH, got {args.sims}")
    try:
        caps = load_captions(args.captions)
        groups = scene_groups(args.captions, caps.image_ids)
        sims = {}
        for name, path in models.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"--sims {name}: no file {path}")
            sims[name] = np.load(path, allow_pickle=False)
            want = (len(caps.image_ids), 5 * len(caps.image_ids))
            if sims[name].shape != want:
                raise ValueError(
                    f"--sims {name}: shape {sims[name].shape}, the captions make {want}"
                )
    except (OSError, ValueError) as exc:
        return cli.fail(exc)
    out = {
        kind: {name: metrics_by_group(s, labels) for name, s in sims.items()}
        for kind, labels in groups.items()
    }
    print(_table("objects the captions mention", out["mentioned"]))
    print()
    print(_table("scene", out["clutter"]))
    if args.json:
        atomic_write_json(args.json, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
