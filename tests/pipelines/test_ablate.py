"""pipelines.ablate: one budget for all rows, rows equal to the full model skipped, no re-runs."""

import json
import shutil

import numpy as np
import pytest
import yaml

from cpfean.data.captions import load_captions
from cpfean.metrics import evaluate_protocol
from pipelines import ablate
from tests.test_engine import TINY_MODEL
from tests.tiny_data import make_tiny_dataset


def _tiny_config(tmp_path):
    """A one-epoch config on a tiny generated store: (store, captions, config path)."""
    store, captions = make_tiny_dataset(tmp_path / "data")
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"use_region_transformer": False},
                "data": {"regions": str(store), "captions": str(captions)},
                "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 16},
            }
        )
    )
    return store, captions, config


def test_ablate_trains_rows_once_and_skips_rows_equal_to_full(tmp_path, capsys):
    store, _, config = _tiny_config(tmp_path)
    out = tmp_path / "abl"
    argv = [
        "--config",
        str(config),
        "--out",
        str(out),
        "--quiet",
        "--rows",
        "full,no_transformer,transformer,prominence_loss,scan",
        *TINY_MODEL,
    ]
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipping no_transformer" in printed and "skipping prominence_loss" in printed
    assert not (out / "no_transformer").exists() and not (out / "prominence_loss").exists()

    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["CPFEAN", "with region Transformer", "SCAN-style baseline"]
    row_cfg = {
        row: yaml.safe_load((out / row / "config.yaml").read_text())
        for row in ("full", "transformer", "scan")
    }
    assert row_cfg["full"]["model"]["use_region_transformer"] is False
    assert row_cfg["transformer"]["model"]["use_region_transformer"] is True
    assert row_cfg["scan"]["model"]["topk"] == 0 and not row_cfg["scan"]["model"]["use_fusion"]
    # every row used the same budget and data
    for cfg in row_cfg.values():
        assert cfg["train"]["epochs"] == 1 and cfg["data"]["regions"] == str(store)
    for row, name in (("full", "CPFEAN"), ("scan", "SCAN-style baseline")):
        saved = json.loads((out / row / "test_metrics.json").read_text())
        assert saved == results[name]

    # a second run reuses the trained rows: checkpoints untouched, same table
    stamps = {row: (out / row / "best.pt").stat().st_mtime_ns for row in row_cfg}
    assert ablate.main(argv) == 0
    assert {row: (out / row / "best.pt").stat().st_mtime_ns for row in row_cfg} == stamps
    assert json.loads((out / "results.json").read_text()) == results

    # other overrides into the same folder would mix budgets: refused, naming the key
    assert ablate.main([*argv, "train.seed=1"]) == 2
    assert "was trained with a different config (train.seed)" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == results

    # ... and checked before any row trains: 'full' (listed first) is not trained here
    other = tmp_path / "abl2"
    (other / "scan").mkdir(parents=True)
    shutil.copy(out / "scan" / "config.yaml", other / "scan" / "config.yaml")
    assert (
        ablate.main(
            [
                "--config",
                str(config),
                "--out",
                str(other),
                "--quiet",
                "--rows",
                "full,scan",
                *TINY_MODEL,
                "train.seed=1",
            ]
        )
        == 2
    )
    assert "abl2/scan was trained with a different config (train.seed)" in capsys.readouterr().err
    assert not (other / "full").exists()

    assert ablate.main(["--config", str(config), "--rows", "full,nope"]) == 2
    assert "unknown rows ['nope']" in capsys.readouterr().err


def test_ablate_scores_every_row_on_a_heldout_set_too(tmp_path, capsys):
    _, _, config = _tiny_config(tmp_path)
    held_store, held_captions = make_tiny_dataset(tmp_path / "held", seed=7)
    out = tmp_path / "abl"
    base = [
        "--config",
        str(config),
        "--out",
        str(out),
        "--quiet",
        "--rows",
        "full,scan",
        *TINY_MODEL,
    ]
    # a bad held-out set is named before anything trains
    assert ablate.main([*base, "--heldout-regions", str(held_store)]) == 2
    assert "go together" in capsys.readouterr().err
    missing = tmp_path / "held" / "nope.json"
    assert (
        ablate.main(
            [*base, "--heldout-regions", str(held_store), "--heldout-captions", str(missing)]
        )
        == 2
    )
    assert str(missing) in capsys.readouterr().err and not out.exists()

    held = ["--heldout-regions", str(held_store), "--heldout-captions", str(held_captions)]
    assert ablate.main([*base, *held]) == 0
    table = json.loads((out / "results_heldout.json").read_text())
    n_all = len(load_captions(held_captions).image_ids)  # every image, all splits
    assert list(table) == ["CPFEAN", "SCAN-style baseline"]
    assert all(m["n_images"] == n_all for m in table.values())
    test = json.loads((out / "results.json").read_text())
    assert all(m["n_images"] < n_all for m in test.values())
    # the same checkpoint scores the held-out set the same way evaluate --split all does
    from pipelines import evaluate

    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(out / "full" / "best.pt"),
                "--regions",
                str(held_store),
                "--captions",
                str(held_captions),
                "--split",
                "all",
                "--json",
                str(tmp_path / "e.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["rsum"] == table["CPFEAN"]["rsum"]
    # the saved scores are the held-out matrix itself: the protocol on them gives the table
    sims = np.load(out / "full" / "heldout_sims.npy")
    assert sims.shape == (n_all, 5 * n_all) and sims.dtype == np.float32
    assert evaluate_protocol(sims, "all")["rsum"] == pytest.approx(table["CPFEAN"]["rsum"])
