"""kill -9 in the middle of extract, index and train on the quick demo's output, then a re-run
that finishes the job. The kill point comes from ``CPFEAN_KILL_SEED`` (default 0), printed in
every failure, so a failure can be replayed."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cpfean.data.region_store import RegionStore, RegionStoreError
from cpfean.index import RetrievalIndex
from tests.hostile.helpers import (
    KILL_SEED,
    REPO,
    env,
    extract_args,
    run,
    train_argv,
)

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.slow, pytest.mark.detector]


# ------------------------------------------------------------------- kill -9, then a re-run
def _kill_when(proc: subprocess.Popen, ready, delay: float, budget: float = 240) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()`` first holds; False if it ended first."""
    deadline = time.time() + budget
    while proc.poll() is None and not ready():
        assert time.time() < deadline, "the run never reached the kill window"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _spawn(module: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"pipelines.{module}", *map(str, argv)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _count(store: Path) -> int:
    try:
        return len(RegionStore(store))
    except (FileNotFoundError, RegionStoreError):
        return 0


def test_kill_9_extract_then_rerun(demo, capsys):
    rng = np.random.default_rng(KILL_SEED)
    store = demo["tmp"] / "killed"
    argv = extract_args(demo, store, "--batch-size", "1", "--commit-every", "1")
    n = len(RegionStore(demo["regions"]))
    at, delay = int(rng.integers(1, n // 2)), float(rng.uniform(0, 0.3))
    assert _kill_when(_spawn("extract", *argv), lambda: _count(store) >= at, delay), KILL_SEED
    partial = RegionStore(store).ids()
    code, out, err = run(capsys, "extract", *argv)
    assert code == 0, (KILL_SEED, err)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["already_present"] == len(partial), KILL_SEED
    assert summary["written"] == n - len(partial), KILL_SEED
    assert RegionStore(store).ids() == RegionStore(demo["regions"]).ids(), KILL_SEED


def test_kill_9_index_then_rerun(demo, capsys):
    rng = np.random.default_rng(KILL_SEED + 1)
    out = demo["tmp"] / "killed_index"
    argv = [
        "--checkpoint",
        demo["ckpt"],
        "--regions",
        demo["regions"],
        "--captions",
        demo["captions"],
        "--split",
        "test",
        "--out",
        out,
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--quiet",
    ]
    shards = Path(str(out) + ".building") / "shards"
    at, delay = int(rng.integers(1, 8)), float(rng.uniform(0, 0.2))
    assert _kill_when(
        _spawn("index", *argv), lambda: shards.is_dir() and len(list(shards.iterdir())) >= at, delay
    )
    code, _, err = run(capsys, "index", *argv)
    assert code == 0, (KILL_SEED, err)
    clean = json.loads((demo["index"] / "index.json").read_text())
    got = json.loads((out / "index.json").read_text())
    assert got["count"] == clean["count"] and got["ids_sha256"] == clean["ids_sha256"]
    for name in ["pooled", *(f"emb.{f}" for f in clean["image_embeddings"]["fields"])]:
        a = np.load(RetrievalIndex(out).data / "images" / f"{name}.npy")
        b = np.load(RetrievalIndex(demo["index"]).data / "images" / f"{name}.npy")
        np.testing.assert_allclose(
            a.astype(np.float32),
            b.astype(np.float32),
            atol=2e-3,
            err_msg=f"{name} (seed {KILL_SEED})",
        )
    leftovers = [
        p.name
        for p in out.parent.iterdir()
        if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock")
    ]
    assert leftovers == [] and not shards.exists(), KILL_SEED


def test_kill_9_train_then_resume(demo, capsys):
    rng = np.random.default_rng(KILL_SEED + 2)
    run_dir = demo["tmp"] / "run"
    argv = train_argv(
        demo,
        run_dir,
        "train.epochs=3",
        "train.batch_size=8",
        "train.log_every=1",
        "train.lr_decay_epochs=[]",
    )
    metrics = run_dir / "metrics.csv"
    rows = int(rng.integers(2, 12))

    def logged() -> bool:
        try:
            return len(metrics.read_text().splitlines()) > rows
        except OSError:
            return False

    assert _kill_when(_spawn("train", *argv), logged, float(rng.uniform(0, 0.5))), KILL_SEED
    resume = ["--resume"] if (run_dir / "last.pt").exists() else []
    code, _, err = run(capsys, "train", *resume, *argv)
    assert code == 0, (KILL_SEED, err)
    import csv

    with open(metrics, newline="") as f:
        table = list(csv.DictReader(f))
    keys = [(r["epoch"], r["step"], r["rsum"] != "") for r in table]
    assert len(keys) == len(set(keys)), f"duplicated rows (seed {KILL_SEED})"
    steps = [int(r["step"]) for r in table if r["rsum"] == ""]
    assert steps == sorted(steps), KILL_SEED
    best = json.loads((run_dir / "best.json").read_text())
    assert best["epoch"] in (1, 2, 3), KILL_SEED
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")], KILL_SEED
