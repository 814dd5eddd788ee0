"""The table and plot of a study over one variable, from the rows its script trained: the
data-scaling study (`scripts/scaling_study.sh`, ``--by scenes``) or regions per image
(`scripts/regions_study.sh`, ``--by regions``).

    python -m pipelines.scaling_report [--study runs/scaling] [--by scenes|regions]
                                       [--record DIR [--detector DIGEST]]
                                       [--png docs/images/scaling.png] [--json F]

Reads ``STUDY/n{N}/s{SEED}/{row}/heldout_metrics.json`` and ``heldout_sims.npy`` (written by
``pipelines.ablate --heldout-...``; the folder is ``r{N}`` by regions): N training scenes (or
regions), one matcher seed, one row each. Prints a markdown table of held-out rSum by N, each
row's mean over its seeds and its difference to the SCAN-style baseline of the same seed with
a 95% paired-bootstrap interval (the images resampled, `cpfean.metrics.paired_bootstrap`), and
draws held-out rSum against N, one line per row (mean over seeds, each seed a dot). Where the
run left them, the cost columns: training seconds per epoch (the median over the epochs in
the row's ``timing.json``) and the peak memory of its process (``{row}.time.json`` beside it,
from /usr/bin/time). Rows not trained yet are left out; the study resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from cpfean import studies
from cpfean.fileio import atomic_path, atomic_write_json
from cpfean.metrics import paired_bootstrap_ranks, query_ranks
from pipelines import cli

LINES = {  # the study's rows at every size: ablate row -> the name in the table and plot
    "full": "CPFEAN (demo recipe)",
    "transformer": "CPFEAN + region Transformer",
    "prominence_loss": "CPFEAN + recurrence supervision",
    "scan": "SCAN-style baseline",
}
# any other row of pipelines.ablate (one component off, a variant of the region Transformer),
# trained at some size only: in the table, against CPFEAN too, not drawn
ROWS = {**LINES, **{row: name for row, (name, _) in studies.ROWS.items() if row not in LINES}}
BASELINE, FULL = "scan", "full"
# --by: (folder prefix, the table's column, the plot's axis)
VARIABLES = {
    "scenes": ("n", "training scenes", "training scenes"),
    "regions": ("r", "regions", "regions per image (R)"),
}
SEED = re.compile(r"^s(\d+)$")


def collect(
    study: Path, by: str = "scenes", record: Path | None = None
) -> dict[tuple[int, str], dict[int, Path]]:
    """{(N, row): {seed: run folder, or the row's record in ``record`` where the study has no
    run folder with held-out scores for it}}."""
    prefix = VARIABLES[by][0]
    run = re.compile(rf"^{prefix}(\d+)$")
    found: dict[tuple[int, str], dict[int, Path]] = defaultdict(dict)
    for size_dir in sorted(study.glob(f"{prefix}*")):
        size = run.match(size_dir.name)
        for seed_dir in sorted(size_dir.glob("s*")) if size else []:
            seed = SEED.match(seed_dir.name)
            for row in ROWS if seed else []:
                folder = seed_dir / row
                if (folder / "heldout_metrics.json").is_file() and (
                    folder / "heldout_sims.npy"
                ).is_file():
                    found[(int(size.group(1)), row)][int(seed.group(1))] = folder
    named = re.compile(rf"^{prefix}(\d+)_s(\d+)_(\w+)\.json$")
    for path in sorted(record.glob("*.json")) if record is not None else []:
        match = named.match(path.name)
        if match and match.group(3) in ROWS:
            found[(int(match.group(1)), match.group(3))].setdefault(int(match.group(2)), path)
    return dict(found)


def _is_record(source: Path) -> bool:
    return source.suffix == ".json"


def _cost(folder: Path) -> dict[str, float]:
    """Training seconds per epoch and peak memory of a row, where its run recorded them."""
    if _is_record(folder):
        return studies.read_record(folder)["cost"]
    out: dict[str, float] = {}
    timing, process = folder / "timing.json", folder.with_name(f"{folder.name}.time.json")
    if timing.is_file():
        seconds = list(json.loads(timing.read_text())["epoch_seconds"].values())
        if seconds:
            out["epoch_s"] = float(np.median(seconds))  # robust to one epoch paused
    if process.is_file():
        out["peak_rss_gb"] = json.loads(process.read_text())["peak_rss_kb"] / 2**20
    return out


def _heldout(source: Path) -> dict:
    if _is_record(source):
        return studies.read_record(source)["heldout"]
    return json.loads((source / "heldout_metrics.json").read_text())


def _ranks(source: Path) -> tuple[np.ndarray, np.ndarray]:
    if _is_record(source):
        return studies.record_ranks(studies.read_record(source))
    return query_ranks(np.load(source / "heldout_sims.npy"))


def keep_records(
    found: dict[tuple[int, str], dict[int, Path]], record: Path, by: str, detector: str | None
) -> int:
    """Write the record of every row read from a run folder (the folder's scores may be newer
    than the record); returns how many."""
    written = 0
    for (size, row), seeds in found.items():
        for seed, source in seeds.items():
            if _is_record(source):
                continue
            sims = np.load(source / "heldout_sims.npy")
            entry = studies.make_record(
                by, size, seed, row, _heldout(source), sims, _cost(source), detector
            )
            path = record / studies.record_name(VARIABLES[by][0], size, seed, row)
            studies.write_record(path, entry)
            written += 1
    return written


def check_detector(record: Path, detector: str) -> None:
    """ValueError when a record in ``record`` was extracted with another detector."""
    for path in sorted(record.glob("*.json")):
        theirs = studies.read_record(path)["detector"]
        if theirs is not None and theirs != detector:
            raise ValueError(
                f"{path} holds a row of sets extracted with detector {theirs}, not {detector}: "
                "rows over two detectors are not one study (another --record starts another)"
            )


def summarise(
    found: dict[tuple[int, str], dict[int, Path]], resamples: int, by: str = "scenes"
) -> list[dict]:
    """One entry per (N, row): rSum per seed, their mean, the difference to the baseline of
    each seed trained for both, with its bootstrap interval (and to CPFEAN for a row that
    is neither), and the cost of seed 0's run."""
    out = []
    order = list(ROWS)
    for (size, row), seeds in sorted(
        found.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))
    ):
        rsums = {s: _heldout(f)["rsum"] for s, f in seeds.items()}
        entry = {
            by: size,
            "row": row,
            "name": ROWS[row],
            "rsum": rsums,
            "mean": float(np.mean(list(rsums.values()))),
            "cost": _cost(seeds[min(seeds)]),
        }
        for key, other in (("vs_baseline", BASELINE), ("vs_full", FULL)):
            if row in (BASELINE, other):
                continue
            against = found.get((size, other), {})
            entry[key] = {
                s: paired_bootstrap_ranks(
                    _ranks(f), _ranks(against[s]), resamples=resamples, seed=s
                )
                for s, f in seeds.items()
                if s in against
            }
        out.append(entry)
    return out


def table(entries: list[dict], by: str = "scenes") -> str:
    costs = any(e["cost"] for e in entries)
    others = any(e.get("vs_full") for e in entries)
    lines = [
        f"| {VARIABLES[by][1]} | row | held-out rSum (per seed) | mean "
        "| vs baseline (95% interval) |"
        + (" vs CPFEAN (95% interval) |" if others else "")
        + (" train s/epoch | peak memory GB |" if costs else ""),
        "|---:|---|---|---:|---|" + ("---|" if others else "") + ("---:|---:|" if costs else ""),
    ]

    def versus(e: dict, key: str) -> str:
        return (
            "; ".join(
                f"{c['diff']:+.1f} ({c['ci_low']:+.1f} .. {c['ci_high']:+.1f})"
                for _, c in sorted(e.get(key, {}).items())
            )
            or "-"
        )

    for e in entries:
        per_seed = ", ".join(f"{v:.1f} (seed {s})" for s, v in sorted(e["rsum"].items()))
        cells = [f"{e[by]:,}", e["name"], per_seed, f"{e['mean']:.1f}", versus(e, "vs_baseline")]
        if others:
            cells.append(versus(e, "vs_full"))
        if costs:
            cells += [f"{e['cost'][k]:.1f}" if k in e["cost"] else "-" for k in ("epoch_s",)]
            cells += [f"{e['cost'][k]:.2f}" if k in e["cost"] else "-" for k in ("peak_rss_gb",)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(entries: list[dict], path: Path, by: str = "scenes") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for row, name in LINES.items():
        mine = sorted((e for e in entries if e["row"] == row), key=lambda e: e[by])
        if not mine:
            continue
        (line,) = ax.plot([e[by] for e in mine], [e["mean"] for e in mine], "-o", label=name)
        for e in mine:
            ax.scatter(
                [e[by]] * len(e["rsum"]),
                list(e["rsum"].values()),
                s=10,
                color=line.get_color(),
                alpha=0.5,
            )
    ax.set_xscale("log", base=2)
    sizes = sorted({e[by] for e in entries})
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel(VARIABLES[by][2])
    ax.set_ylabel("held-out rSum (1,000 new scenes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.scaling_report", __doc__)
    p.add_argument("--study", type=Path, default=Path("runs/scaling"))
    p.add_argument("--by", choices=sorted(VARIABLES), default="scenes", help="the variable")
    p.add_argument("--record", type=Path, help="keep and read the rows' records here")
    p.add_argument("--detector", help="the study's detector (a digest), checked and recorded")
    p.add_argument("--png", type=Path, help="draw the plot here")
    p.add_argument("--json", type=Path, help="also write the entries here")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap draws")
    args = p.parse_args(argv)
    if not args.study.is_dir() and args.record is None:
        return cli.fail(f"--study {args.study}: no such folder (scripts/scaling_study.sh makes it)")
    if args.record is not None and args.record.exists() and not args.record.is_dir():
        return cli.fail(f"--record {args.record} is a file, not a folder")
    if args.detector is not None and args.record is None:
        return cli.fail("--detector goes with --record (it is checked against the records)")
    if args.resamples < 1:
        return cli.fail(f"--resamples must be >= 1, got {args.resamples}")
    try:
        if args.record is not None:
            args.record.mkdir(parents=True, exist_ok=True)
            if args.detector is not None:
                check_detector(args.record, args.detector)
        found = collect(args.study, args.by, args.record)
        if args.record is not None:
            kept = keep_records(found, args.record, args.by, args.detector)
            print(f"records: {kept} kept in {args.record}")
            if not found:
                return 0  # a study that has trained nothing yet: its records are checked
        if not found:
            return cli.fail(f"{args.study} holds no row with held-out scores yet")
        entries = summarise(found, args.resamples, args.by)
    except KeyError as exc:  # a metrics file without its rSum (or a timing file its figures)
        return cli.fail(f"{args.study}: a heldout_metrics.json or timing file lacks {exc}")
    except (OSError, ValueError) as exc:  # unreadable JSON, .npy or record, or two shapes
        return cli.fail(exc)
    print(table(entries, args.by))
    if args.png:
        plot(entries, args.png, args.by)
        print(f"plot: {args.png}")
    if args.json:
        atomic_write_json(args.json, entries, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
