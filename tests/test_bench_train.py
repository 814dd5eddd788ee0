"""The training benchmark runs the real loop on a store and accounts for a step's time."""

from __future__ import annotations

import json

import pytest

from pipelines.bench import train as bench_train
from tests.test_engine import TINY_MODEL
from tests.tiny_data import make_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_bench"))


def _argv(data, tmp_path, *extra):
    store, captions = data
    return [
        "--shape",
        "demo",
        "--store",
        str(store),
        "--captions",
        str(captions),
        "--split-steps",
        "3",
        "--device",
        "cpu",
        "--json",
        str(tmp_path / "train.json"),
        *extra,
        *TINY_MODEL,
        "model.text_frozen_layers=1",  # the demo's frozen bottom, scaled to the tiny encoder
        "train.batch_size=16",
        "train.eval_batch_size=16",
    ]


def test_demo_shape_times_every_step_of_an_epoch(tmp_path, data, capsys):
    assert bench_train.main(_argv(data, tmp_path)) == 0
    (row,) = json.loads((tmp_path / "train.json").read_text())["rows"]
    # 24 training images x 5 captions at batch 16, the last partial batch dropped: 7 steps
    assert row["steps"] == 7 and row["batch_size"] == 16
    assert row["pairs_per_s"] == pytest.approx(7 * 16 / row["epoch_s"], rel=0.06)
    split = row["split_ms"]
    assert set(split) == {*bench_train.PHASES, "step"}
    assert split["text encoder"] > 0 and split["region encoder"] > 0 and split["optimizer"] > 0
    named = sum(v for k, v in split.items() if k not in ("step", "backward"))
    assert 0 < named < split["step"]  # the backward is what the named phases leave
    assert row["validation_images"] == 8 and row["validation_s"] > 0
    assert "| demo |" in capsys.readouterr().out


def test_missing_demo_store_is_one_error_line(tmp_path, capsys):
    argv = ["--shape", "demo", "--store", str(tmp_path / "nope"), "--device", "cpu"]
    assert bench_train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope not found" in err[0]


@pytest.mark.slow
def test_against_another_checkout_times_both_on_the_same_store(tmp_path, data):
    from pipelines.bench.train import REPO

    assert bench_train.main(_argv(data, tmp_path, "--against", str(REPO))) == 0
    mine, other = json.loads((tmp_path / "train.json").read_text())["against"]
    assert mine["code"] == "this checkout" and other["code"] == str(REPO)
    assert other["speed_vs_against"] in (1.0, None)  # None: the tiny epoch took under 1 s
    assert mine["epoch_s"] >= 0 and other["epoch_s"] >= 0
