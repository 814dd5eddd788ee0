"""Train CPFEAN, the SCAN-style baseline and one-component-off ablations with one budget.

    python -m pipelines.ablate [--config configs/demo.yaml] [--rows full,scan,no_fusion,...]
                               [--out runs/demo/ablations] [--heldout-regions STORE
                               --heldout-captions FILE] [key.sub=value ...]

Every row starts from the same config (same data, epochs, batch size, seed) and changes only
the switches named below; each is evaluated on the test split and the table is printed and
written to OUT/results.md and OUT/results.json. Rows already trained are not trained again;
a row folder trained with a different config (other overrides into the same OUT) is an error.
A row whose switches leave the config unchanged (``no_transformer`` when the config already
turns the region Transformer off, ``transformer`` when it is on; ``no_prominence_loss`` /
``prominence_loss`` likewise for the recurrence supervision) is the full model again and is
skipped.

``--heldout-regions`` / ``--heldout-captions`` also score every row on every image of a second
caption file (e.g. scenes generated with another seed, extracted with the same detector) and
write that table to OUT/results_heldout.md and .json: 100 test images are a noisy measure.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from cpfean.checkpoint import load_model, resolve_device
from cpfean.config import ConfigError, load_config, to_dict
from cpfean.data.captions import check_ids, load_captions
from cpfean.data.region_store import RegionStore
from cpfean.engine import train
from cpfean.evaluation import evaluate_split
from cpfean.fileio import atomic_path, atomic_write, atomic_write_json
from cpfean.metrics import format_table
from cpfean.studies import DEFAULT_ROWS, ROWS
from pipelines import cli


def _changed_keys(saved: Path, cfg) -> list[str]:
    """Keys (dotted, at most 5 listed) where the row already in ``saved`` differs from ``cfg``;
    the run folder itself does not count. Empty when nothing was trained there yet."""
    if not saved.is_file():
        return []
    old = _flatten(to_dict(replace(load_config(saved), run_dir=cfg.run_dir)))
    new = _flatten(to_dict(cfg))
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return keys[:5] + (["..."] if len(keys) > 5 else [])


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.ablate", __doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"from {', '.join(ROWS)}")
    parser.add_argument("--out", default="runs/demo/ablations")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--heldout-regions", help="region store of a held-out set")
    parser.add_argument("--heldout-captions", help="its caption file (all images are scored)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value applied to every row")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        return cli.fail(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    out = Path(args.out)
    try:  # everything checked before anything trains
        heldout = _heldout(args)
        planned = _plan(rows, args, out)
    except ValueError as exc:
        return cli.fail(exc)
    results: dict[str, dict] = {}
    held: dict[str, dict] = {}
    for row, name, cfg in planned:
        results[name], held_metrics = _run_row(out / row, name, cfg, heldout, args.quiet)
        print(format_table({name: results[name]}), flush=True)
        if held_metrics is not None:
            held[name] = held_metrics
    _write_table(out / "results", results)
    if heldout is not None:
        print(f"held-out set: {len(heldout[1].image_ids)} images of {args.heldout_captions}")
        _write_table(out / "results_heldout", held)
    return 0


def _heldout(args) -> tuple | None:
    """(store, captions, source) of the held-out set, or None; ValueError naming the fault."""
    if bool(args.heldout_regions) != bool(args.heldout_captions):
        raise ValueError("--heldout-regions and --heldout-captions go together")
    if not args.heldout_regions:
        return None
    try:
        store, captions = RegionStore(args.heldout_regions), load_captions(args.heldout_captions)
        check_ids(captions, store.ids())
        captions.flatten(5)  # the protocol's 5 captions per image
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ValueError(
            f"held-out set: {exc.args[0] if isinstance(exc, KeyError) else exc}"
        ) from None
    source = {
        "regions": str(Path(args.heldout_regions).resolve()),
        "captions": str(Path(args.heldout_captions).resolve()),
    }
    return store, captions, source


def _plan(rows: list[str], args, out: Path) -> list[tuple]:
    """(row, name, config) of each row to run: one that is the same model as 'full' is
    skipped; a folder trained with another config is an error (ValueError)."""
    try:
        full_cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    planned = []
    for row in rows:
        name, switches = ROWS[row]
        try:
            cfg = load_config(args.config, [*args.overrides, *switches, f"run_dir={out / row}"])
            if row != "full" and replace(cfg, run_dir=full_cfg.run_dir) == full_cfg:
                print(
                    f"[ablate] skipping {row}: the same model as 'full' under this config",
                    flush=True,
                )
                continue
            stale = _changed_keys(out / row / "config.yaml", cfg)
        except ConfigError as exc:
            raise ValueError(f"{out / row}: {exc}") from None
        if stale:
            raise ValueError(
                f"{out / row} was trained with a different config ({', '.join(stale)}); "
                "use another --out or remove that folder"
            )
        planned.append((row, name, cfg))
    return planned


def _run_row(folder: Path, name: str, cfg, heldout: tuple | None, quiet: bool):
    """Train the row (unless done) and score it on the test split and the held-out set
    (unless scored); returns its test metrics and held-out metrics (None without a set)."""
    metrics_path, held_path = folder / "test_metrics.json", folder / "heldout_metrics.json"
    need_held = heldout is not None and (
        not held_path.is_file() or json.loads(held_path.read_text()).get("source") != heldout[2]
    )
    if not metrics_path.is_file() or need_held:
        if not (folder / "best.json").is_file():
            print(f"[ablate] training {folder.name}: {name}", flush=True)
            train(cfg, resume=(folder / "last.pt").is_file(), progress=not quiet)
        device = resolve_device(cfg.train.device)
        model, _, _ = load_model(folder / "best.pt", device)
    if not metrics_path.is_file():
        test = load_captions(cfg.data.captions, split=cfg.data.test_split)
        metrics, _ = evaluate_split(
            model,
            RegionStore(cfg.data.regions),
            test,
            batch_size=cfg.train.eval_batch_size,
            device=device,
        )
        atomic_write_json(metrics_path, metrics, indent=2)
    if need_held:
        assert heldout is not None
        metrics, sims = evaluate_split(
            model, *heldout[:2], batch_size=cfg.train.eval_batch_size, device=device
        )
        # the scores themselves, for paired bootstraps between rows (pipelines.scaling_report)
        with atomic_path(folder / "heldout_sims.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, sims.astype(np.float32))  # a file object: np.save renames no path
        atomic_write_json(held_path, {**metrics, "source": heldout[2]}, indent=2)
    held = None
    if heldout is not None:
        held = json.loads(held_path.read_text())
        del held["source"]
    return json.loads(metrics_path.read_text()), held


def _write_table(stem: Path, results: dict[str, dict]) -> None:
    table = format_table(results)
    print(table)
    atomic_write(stem.with_suffix(".md"), "```\n" + table + "\n```\n")
    atomic_write_json(stem.with_suffix(".json"), results, indent=2)


if __name__ == "__main__":
    sys.exit(main())
