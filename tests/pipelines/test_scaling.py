"""The data-scaling study: its report (table, bootstrap against the baseline, plot) and the
script's route end to end on a few scenes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpfean.metrics import evaluate_protocol, paired_bootstrap
from pipelines import scaling_report

REPO = Path(__file__).resolve().parents[2]


def _sims(n: int, noise: float, seed: int) -> np.ndarray:
    """[n, 5n] scores where caption 5i..5i+4 belong to image i, blurred by ``noise``."""
    rng = np.random.default_rng(seed)
    truth = np.kron(np.eye(n), np.ones((1, 5)))
    return (truth + noise * rng.normal(size=truth.shape)).astype(np.float32)


def _row(folder: Path, sims: np.ndarray) -> float:
    folder.mkdir(parents=True)
    np.save(folder / "heldout_sims.npy", sims)
    rsum = evaluate_protocol(sims, "all")["rsum"]
    (folder / "heldout_metrics.json").write_text(json.dumps({"rsum": rsum}))
    return rsum


def test_report_tables_each_row_against_the_baseline_of_its_seed(tmp_path, capsys):
    study = tmp_path / "study"
    made = {}
    for size, seeds in ((800, [0]), (3200, [0, 1])):
        for s in seeds:
            for row, noise in (("full", 0.6), ("scan", 0.9)):
                sims = _sims(40, noise, seed=size + 10 * s + (row == "scan"))
                made[(size, row, s)] = (_row(study / f"n{size}" / f"s{s}" / row, sims), sims)
    (study / "n800" / "s0" / "transformer").mkdir()  # a row still training: no scores yet
    png, out = tmp_path / "scaling.png", tmp_path / "scaling.json"
    argv = ["--study", str(study), "--png", str(png), "--json", str(out), "--resamples", "200"]
    assert scaling_report.main(argv) == 0
    entries = {(e["scenes"], e["row"]): e for e in json.loads(out.read_text())}
    assert set(entries) == {(800, "full"), (800, "scan"), (3200, "full"), (3200, "scan")}
    big = entries[(3200, "full")]
    assert big["mean"] == pytest.approx(
        (made[(3200, "full", 0)][0] + made[(3200, "full", 1)][0]) / 2
    )
    for s in (0, 1):
        expected = paired_bootstrap(
            made[(3200, "full", s)][1], made[(3200, "scan", s)][1], resamples=200, seed=s
        )
        assert big["vs_baseline"][str(s)]["diff"] == pytest.approx(expected["diff"])
        assert big["vs_baseline"][str(s)]["ci_low"] == pytest.approx(expected["ci_low"])
    assert "vs_baseline" not in entries[(800, "scan")]
    text = capsys.readouterr().out
    assert "| 3,200 | CPFEAN (demo recipe) | " in text and f"{big['mean']:.1f}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_row_trained_at_one_size_is_tabled_against_cpfean_too(tmp_path, capsys):
    """A one-component-off row or a Transformer variant (at the largest size only) gets its
    difference to CPFEAN of the same seed beside the one to the baseline."""
    study = tmp_path / "study"
    made = {}
    for row, noise in (("full", 0.6), ("scan", 0.9), ("no_fusion", 0.75)):
        for s in (0, 1):
            sims = _sims(40, noise, seed=10 * s + len(row))
            made[row, s] = sims
            _row(study / "n6400" / f"s{s}" / row, sims)
    _row(study / "n800" / "s0" / "full", _sims(40, 0.7, seed=3))
    out = tmp_path / "entries.json"
    argv = ["--study", str(study), "--json", str(out), "--resamples", "100"]
    assert scaling_report.main([*argv, "--png", str(tmp_path / "p.png")]) == 0
    entries = {(e["scenes"], e["row"]): e for e in json.loads(out.read_text())}
    off = entries[(6400, "no_fusion")]
    assert off["name"] == "w/o cross-modal fusion"
    for s in (0, 1):
        want = paired_bootstrap(made["no_fusion", s], made["full", s], resamples=100, seed=s)
        assert off["vs_full"][str(s)] == pytest.approx(want)
        assert off["vs_baseline"][str(s)]["diff"] == pytest.approx(
            paired_bootstrap(made["no_fusion", s], made["scan", s], resamples=100, seed=s)["diff"]
        )
    assert "vs_full" not in entries[(6400, "full")] and "vs_full" not in entries[(6400, "scan")]
    assert entries[(800, "full")]["vs_baseline"] == {}  # no baseline trained at 800
    text = capsys.readouterr().out
    assert "vs CPFEAN (95% interval)" in text.splitlines()[0]
    line = next(x for x in text.splitlines() if "w/o cross-modal fusion" in x)
    assert f"{off['vs_full']['0']['diff']:+.1f}" in line


def test_records_keep_the_figures_when_the_run_folders_are_gone(tmp_path, capsys):
    study, record = tmp_path / "study", tmp_path / "record"
    for row, noise in (("full", 0.6), ("scan", 0.9), ("transformer", 0.8)):
        for s in (0, 1):
            _row(study / "n3200" / f"s{s}" / row, _sims(60, noise, seed=10 * s + len(row)))
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    argv = ["--record", str(record), "--detector", "abc123", "--resamples", "300"]
    assert scaling_report.main(["--study", str(study), *argv, "--json", str(first)]) == 0
    assert "records: 6 kept" in capsys.readouterr().out
    one = json.loads((record / "n3200_s1_transformer.json").read_text())
    assert one["detector"] == "abc123" and one["size"] == 3200 and one["seed"] == 1
    assert max(one["ranks"]["i2t"] + one["ranks"]["t2i"]) == 11  # clipped past R@10
    assert len(one["ranks"]["t2i"]) == 5 * len(one["ranks"]["i2t"]) == 300
    shutil.rmtree(study)
    assert scaling_report.main(["--study", str(study), *argv, "--json", str(second)]) == 0
    assert json.loads(second.read_text()) == json.loads(first.read_text())
    # a record of sets another detector extracted is not this study's
    assert scaling_report.main(["--study", str(study), *argv[:2], "--detector", "fff"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "detector abc123, not fff" in err[0]
    (record / "n3200_s0_scan.json").write_text('{"size": 3200}')
    assert scaling_report.main(["--study", str(study), "--record", str(record)]) == 2
    assert "n3200_s0_scan.json: not a study record" in capsys.readouterr().err


def test_report_names_a_missing_or_empty_study(tmp_path, capsys):
    assert scaling_report.main(["--study", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert scaling_report.main(["--study", str(tmp_path)]) == 2
    assert "holds no row with held-out scores" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.detector
def test_study_script_trains_each_row_once_and_reports(quick_demo, tmp_path):
    out, _ = quick_demo
    env = {
        **os.environ,
        "PY": sys.executable,
        "STUDY": str(tmp_path / "study"),
        "RECORD": str(tmp_path / "record"),
        "DET": str(out / "detector"),
        "SIZES": "8",
        "ROWS": "full,scan",
        "OFF_ROWS": "no_gcn",  # the largest size's one-component-off stage
        "HELDOUT": "10",
        "EXTRA": "train.epochs=1 train.batch_size=16",
        "PYTHONPATH": str(REPO),
    }
    script = [str(REPO / "scripts" / "scaling_study.sh")]
    first = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("[ablate] training") == 3
    assert "| 8 | CPFEAN (demo recipe) |" in first.stdout
    assert "| 8 | SCAN-style baseline |" in first.stdout
    assert "| 8 | w/o word GCN |" in first.stdout
    assert "its variants are not run" in first.stdout  # no Transformer row trained
    again = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "[ablate] training" not in again.stdout
    recorded = sorted(p.name for p in (tmp_path / "record").iterdir())
    assert recorded == ["n8_s0_full.json", "n8_s0_no_gcn.json", "n8_s0_scan.json"]
    unnamed = subprocess.run(
        ["bash", *script],
        env={k: v for k, v in env.items() if k != "RECORD"},
        capture_output=True,
        text=True,
    )
    assert unnamed.returncode == 2 and "name a RECORD folder" in unnamed.stderr
    missing = subprocess.run(
        ["bash", *script],
        env={**env, "DET": str(tmp_path / "no-detector")},
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: no trained detector")

    # on the same scenes and models: regions as a variable, then the photo set both ways
    regions = {
        **env,
        "STUDY": str(tmp_path / "regions"),
        "SCALING": env["STUDY"],
        "TRAINSET": "n8",
        "COUNTS": "4 12",
        "ROWS": "full",
    }
    script = [str(REPO / "scripts" / "regions_study.sh")]
    run = subprocess.run(
        ["bash", *script], env=regions, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| 4 | CPFEAN (demo recipe) |" in run.stdout and "| 12 | CPFEAN" in run.stdout
    assert "train s/epoch | peak memory GB |" in run.stdout
    from cpfean.data.region_store import RegionStore

    for r in (4, 12):
        for part in ("regions", "heldout"):
            store = RegionStore(tmp_path / "regions" / f"r{r}" / part)
            assert store.meta["num_regions"] == r
            assert all(store[i].num_valid == r for i in store.ids()[:3])
    photos = {**env, "OUT": str(tmp_path / "photos"), "SCALING": env["STUDY"], "TRAINSET": "n8"}
    photos |= {"TRAIN": "10", "TEST": "5"}
    script = [str(REPO / "scripts" / "transfer_study.sh")]
    run = subprocess.run(["bash", *script], env=photos, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for row in ("full", "scan"):
        scored = json.loads((tmp_path / "photos" / f"scenes_to_photos_{row}.json").read_text())
        assert scored["n_images"] == 5
        held = json.loads((tmp_path / "photos" / "s0" / row / "heldout_metrics.json").read_text())
        assert held["n_images"] == 10  # the photo-trained rows scored on the held-out scenes

    # last, the run folders gone (a new checkout): the records alone say the rows are done
    shutil.rmtree(tmp_path / "study" / "n8")
    script = [str(REPO / "scripts" / "scaling_study.sh")]
    again = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[ablate] training" not in again.stdout and "| 8 | w/o word GCN |" in again.stdout
    assert not (tmp_path / "study" / "n8").exists()  # nor are its scenes made again


def test_report_names_a_broken_row_file(tmp_path, capsys):
    study = tmp_path / "study"
    _row(study / "n800" / "s0" / "scan", _sims(10, 0.5, seed=0))
    _row(study / "n800" / "s0" / "full", _sims(10, 0.5, seed=1))
    (study / "n800" / "s0" / "full" / "heldout_sims.npy").write_bytes(b"not an array")
    assert scaling_report.main(["--study", str(study), "--resamples", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    (study / "n800" / "s0" / "full" / "heldout_metrics.json").write_text("{}")
    assert scaling_report.main(["--study", str(study), "--resamples", "10"]) == 2
    assert "lacks 'rsum'" in capsys.readouterr().err


def test_report_by_regions_with_the_cost_of_each_row(tmp_path, capsys):
    study = tmp_path / "regions"
    for r, noise in ((10, 0.8), (100, 0.5)):
        for row in ("full", "scan"):
            folder = study / f"r{r}" / "s0" / row
            _row(folder, _sims(30, noise + 0.2 * (row == "scan"), seed=r))
            # one epoch paused (e.g. by SIGSTOP) must not move the figure: the median is read
            seconds = {"1": r / 10, "2": r / 10 + 1, "3": 999.0}
            timing = {"train_pairs": 150, "epoch_seconds": seconds}
            (folder / "timing.json").write_text(json.dumps(timing))
            rss = {"wall_s": 12.0, "peak_rss_kb": 2**20 * (1 + r / 100)}
            folder.with_name(f"{row}.time.json").write_text(json.dumps(rss))
    out = tmp_path / "r.json"
    argv = ["--study", str(study), "--by", "regions", "--json", str(out), "--resamples", "50"]
    assert scaling_report.main(argv) == 0
    entries = {(e["regions"], e["row"]): e for e in json.loads(out.read_text())}
    assert entries[(100, "full")]["cost"] == {"epoch_s": 11.0, "peak_rss_gb": 2.0}
    assert entries[(10, "scan")]["cost"] == {"epoch_s": 2.0, "peak_rss_gb": 1.1}
    text = capsys.readouterr().out
    assert text.startswith("| regions | row |") and "| 100 | CPFEAN (demo recipe) |" in text
    assert "| 11.0 | 2.00 |" in text
    # a scenes study in the same folder finds nothing: the variable picks the folders
    assert scaling_report.main(["--study", str(study)]) == 2
