"""Training loop: learns, checkpoints atomically, resumes exactly, stops on a non-finite loss."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpfean.checkpoint import load_checkpoint, load_model, save_checkpoint
from cpfean.config import load_config
from cpfean.data.captions import CaptionSet, load_captions
from cpfean.data.region_store import RegionStore
from cpfean.engine import MetricsLog, build_optimizer, train
from cpfean.evaluation import evaluate_split
from cpfean.model import build_model
from tests.tiny_data import make_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "model.text_encoder=tiny-random",
    "model.feature_dim=32",
    "model.embed_dim=32",
    "model.region_ff_dim=64",
    "model.region_heads=4",
    "model.max_words=16",
]


def tiny_cfg(tmp_path, data, run="run", *extra):
    store, captions = data
    return load_config(
        None,
        [
            *TINY_MODEL,
            f"data.regions={store}",
            f"data.captions={captions}",
            f"run_dir={tmp_path / run}",
            "train.batch_size=16",
            "train.lr=2e-3",
            "train.warmup_epochs=1",
            "train.log_every=1",
            "train.lr_decay_epochs=[3]",
            "train.eval_batch_size=16",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_learns_and_writes_run_folder(tmp_path, data):
    # function words skipped, so that path of the recurrence targets trains too
    cfg = tiny_cfg(
        tmp_path, data, "run", "train.epochs=4", "train.recurrence_skip_function_words=true"
    )
    store = RegionStore(cfg.data.regions)
    test = load_captions(cfg.data.captions, split="test")
    best = train(cfg, progress=False)
    run = Path(cfg.run_dir)
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "best.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp*")), "temporary checkpoint files left behind"
    timing = json.loads((run / "timing.json").read_text())
    train_caps = load_captions(cfg.data.captions, split="train")
    assert timing["train_pairs"] == sum(len(c) for c in train_caps.captions)  # 5 per image
    assert list(timing["epoch_seconds"]) == ["1", "2", "3", "4"]
    assert all(v > 0 for v in timing["epoch_seconds"].values())
    rows = _rows(run / "metrics.csv")
    steps = [r for r in rows if r["rsum"] == ""]
    losses = [float(r["loss"]) for r in steps]
    assert losses[-1] < losses[0]
    # each step row splits the loss into its two terms; validation rows carry neither
    for r in steps:
        assert float(r["prominence"]) > 0
        assert float(r["loss"]) == pytest.approx(
            float(r["triplet"]) + float(r["prominence"]), abs=2e-5
        )
    assert all(r["triplet"] == r["prominence"] == "" for r in rows if r["rsum"])
    model, loaded_cfg, ckpt = load_model(run / "best.pt")
    assert loaded_cfg == cfg and ckpt["best"]["rsum"] == best["rsum"]
    _, sims = evaluate_split(model, store, test)
    assert sims.shape == (8, 40)
    # the model fits its 24 training images: chance rSum there is about 125 (R@1/5/10 of
    # 4/21/42 text -> image, 4/20/35 image -> text); 4 tiny epochs reach 280-350
    fit, _ = evaluate_split(model, store, load_captions(cfg.data.captions, split="train"))
    assert fit["rsum"] > 250, fit


def test_text_backbone_gets_its_own_learning_rate(tmp_path, data):
    cfg = tiny_cfg(tmp_path, data, "run", "train.lr=1e-3", "train.text_lr=1e-5")
    model = build_model(cfg.model, label_names=["ball"])
    groups = build_optimizer(model, cfg).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    backbone = {id(p) for p in model.word_encoder.backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} == backbone
    assert not backbone & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("warmup", [0, 10])  # 10 steps: the warm-up spans the resume point
def test_resume_reproduces_uninterrupted_run(tmp_path, data, warmup):
    ramp = f"train.lr_warmup_steps={warmup}"
    straight = tiny_cfg(tmp_path, data, "straight", "train.epochs=2", ramp)
    train(straight, progress=False)
    first = tiny_cfg(tmp_path, data, "resumed", "train.epochs=1", ramp)
    train(first, progress=False)
    second = tiny_cfg(tmp_path, data, "resumed", "train.epochs=2", ramp)
    train(second, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    assert _rows(tmp_path / "straight" / "metrics.csv") == _rows(
        tmp_path / "resumed" / "metrics.csv"
    )


def test_lr_warmup_ramps_linearly_then_follows_the_epoch_decay(tmp_path, data):
    # 24 training images x 5 captions at batch 16: 7 steps per epoch; decay after epoch 3
    cfg = tiny_cfg(tmp_path, data, "warm", "train.epochs=4", "train.lr_warmup_steps=10")
    train(cfg, progress=False)
    rows = [r for r in _rows(tmp_path / "warm" / "metrics.csv") if not r["rsum"]]
    lr = {int(r["step"]): float(r["lr"]) for r in rows}  # the rate that step took
    for k in range(1, 12):  # step k runs with k - 1 steps done
        assert lr[k] == pytest.approx(2e-3 * (0.01 + 0.99 * min(k - 1, 10) / 10), rel=1e-6), k
    assert lr[15] == pytest.approx(2e-3) and lr[21] == pytest.approx(2e-3)
    assert lr[22] == pytest.approx(2e-4) and lr[28] == pytest.approx(2e-4)


def test_resume_with_a_warmup_the_run_never_had_is_named(tmp_path, data):
    train(tiny_cfg(tmp_path, data, "plain", "train.epochs=1"), progress=False)
    changed = tiny_cfg(tmp_path, data, "plain", "train.epochs=2", "train.lr_warmup_steps=5")
    with pytest.raises(ValueError, match=r"last\.pt was trained without train\.lr_warmup_steps"):
        train(changed, resume=True, progress=False)


def test_non_finite_loss_stops_naming_the_step(tmp_path, data):
    cfg = tiny_cfg(tmp_path, data, "nan", "train.epochs=1", "train.lr=1e30", "train.grad_clip=0")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at epoch 1, step \d+"):
        train(cfg, progress=False)


def test_checkpoint_write_is_atomic_and_bad_files_are_named(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, model={"w": torch.ones(2)}, config={})
    assert load_checkpoint(path)["model"]["w"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="c.pt is not a readable cpfean checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_from_before_region_alignment_scores_as_it_was_trained(tmp_path, data):
    """Checkpoints saved before ``model.use_region_alignment`` existed scored words only."""
    from cpfean.checkpoint import model_payload

    cfg = tiny_cfg(tmp_path, data, "old", "model.use_region_alignment=false")
    torch.manual_seed(0)
    model = build_model(cfg.model, ["ball", "box"]).eval()
    payload = model_payload(model, cfg, ["ball", "box"])
    del payload["config"]["model"]["use_region_alignment"]
    save_checkpoint(tmp_path / "old.pt", **payload)
    loaded, loaded_cfg, _ = load_model(tmp_path / "old.pt")
    assert loaded_cfg.model.use_region_alignment is False and not loaded.region_alignment
    store = RegionStore(cfg.data.regions)
    test = load_captions(cfg.data.captions, split="test")
    _, before = evaluate_split(model, store, test)
    _, after = evaluate_split(loaded, store, test)
    assert (after == before).all()


def test_cli_train_then_evaluate(tmp_path, data, capsys):
    from pipelines import evaluate
    from pipelines import train as train_cli

    store, captions = data
    args = [
        *TINY_MODEL,
        f"data.regions={store}",
        f"data.captions={captions}",
        f"run_dir={tmp_path / 'cli'}",
        "train.epochs=1",
        "train.batch_size=16",
    ]
    assert train_cli.main(["--quiet", *args]) == 0
    assert train_cli.main(["--quiet", "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    out = tmp_path / "m.json"
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(tmp_path / "cli" / "best.pt"),
                "--json",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    import json

    metrics = json.loads(out.read_text())
    assert set(metrics) >= {"i2t", "t2i", "rsum"}
    assert f"{metrics['rsum']:.1f}" in capsys.readouterr().out
    # --split all: every image of the caption file (train + val + test of the tiny set)
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(tmp_path / "cli" / "best.pt"),
                "--json",
                str(out),
                "--device",
                "cpu",
                "--split",
                "all",
            ]
        )
        == 0
    )
    every = json.loads(out.read_text())
    assert every["n_images"] == len(load_captions(captions).image_ids) > metrics["n_images"]
    # --images: the first N images of the split, scored as a split of their own
    ckpt_path = str(tmp_path / "cli" / "best.pt")
    first = ["--checkpoint", ckpt_path, "--json", str(out)]
    assert evaluate.main([*first, "--split", "train", "--images", "5", "--device", "cpu"]) == 0
    five = json.loads(out.read_text())
    model, _, _ = load_model(ckpt_path)
    train_caps = load_captions(captions, split="train")
    head = CaptionSet(train_caps.image_ids[:5], train_caps.captions[:5], train_caps.splits[:5])
    expected, _ = evaluate_split(model, RegionStore(store), head)
    assert five["n_images"] == 5 and five["rsum"] == pytest.approx(expected["rsum"], abs=1e-6)
    with pytest.raises(SystemExit):
        evaluate.main([*first, "--images", "-1"])
    assert "--images must be >= 0" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    # --against: the same table for a second model plus the paired rSum difference
    ckpt = str(tmp_path / "cli" / "best.pt")
    assert (
        evaluate.main(
            [
                "--checkpoint",
                ckpt,
                "--against",
                ckpt,
                "--json",
                str(out),
                "--device",
                "cpu",
                "--resamples",
                "50",
                "--name",
                "A",
            ]
        )
        == 0
    )
    both = json.loads(out.read_text())
    assert both["model"] == both["against"] == metrics
    assert both["comparison"]["diff"] == 0 and both["comparison"]["resamples"] == 50
    printed = capsys.readouterr().out
    assert "rSum difference on all 8 images: +0.0" in printed
    assert "A " in printed and "cli (--against)" not in printed
    # without --name both rows would be called "cli": the second is marked, not dropped
    assert (
        evaluate.main(
            ["--checkpoint", ckpt, "--against", ckpt, "--device", "cpu", "--resamples", "20"]
        )
        == 0
    )
    assert "cli (--against)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", ckpt, "--against", ckpt, "--resamples", "0"])
    assert "--resamples must be >= 1" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", ckpt, "--against", str(tmp_path / "nope.pt")]) == 2


def test_cli_bad_inputs_give_one_line_errors(tmp_path, data, capsys):
    from pipelines import train as train_cli

    store, captions = data
    base = [*TINY_MODEL, f"data.captions={captions}", f"run_dir={tmp_path / 'r'}"]
    assert train_cli.main(["--quiet", *base, f"data.regions={tmp_path / 'missing'}"]) == 2
    assert "no region store at" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text('{"image": "not-there.png", "caption": "a red ball", "split": "train"}\n')
    assert (
        train_cli.main(["--quiet", *base, f"data.regions={store}", f"data.captions={other}"]) == 2
    )
    assert "'not-there.png'" in capsys.readouterr().err
    assert train_cli.main(["--quiet", "--resume", *base, f"data.regions={store}"]) == 2
    assert f"--resume: no {tmp_path / 'r' / 'last.pt'} to continue" in capsys.readouterr().err


def test_resume_drops_metrics_rows_of_the_unfinished_epoch(tmp_path, data):
    cfg = tiny_cfg(tmp_path, data, "crash", "train.epochs=1")
    train(cfg, progress=False)
    log = tmp_path / "crash" / "metrics.csv"
    steps_done = [r["step"] for r in _rows(log)]
    # what a crash half-way through epoch 2 leaves behind
    with open(log, "a") as f:
        f.write("2,8,1.0,0.002,\n2,9,1.0,0.002,\n")
    train(tiny_cfg(tmp_path, data, "crash", "train.epochs=2"), resume=True, progress=False)
    rows = _rows(log)
    assert [r["step"] for r in rows[: len(steps_done)]] == steps_done
    assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)
    assert sum(r["loss"] == "1.0" for r in rows) == 0


def test_metrics_log_widens_an_older_header_without_shifting_columns(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,loss,lr,rsum\n1,1,3.0,0.1,\n1,2,2.5,0.1,410.0\n")
    metrics = MetricsLog(log)
    metrics.truncate_after(1)
    metrics.write(epoch=2, step=3, loss=2.0, lr=0.1, rsum="", triplet=1.5, prominence=0.5)
    metrics.write(epoch=2, step=4, loss=1.8, lr=0.1, rsum="", triplet=1.4, prominence=0.4)
    assert log.read_text().splitlines() == [
        "epoch,step,loss,lr,rsum,triplet,prominence",
        "1,1,3.0,0.1,,,",
        "2,3,2.0,0.1,,1.5,0.5",
        "2,4,1.8,0.1,,1.4,0.4",
    ]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path, data):
    store, captions = data
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",  # a free port of its own: two test runs never collide
        "--nproc_per_node",
        "2",
        "-m",
        "pipelines.train",
        "--quiet",
        *TINY_MODEL,
        f"data.regions={store}",
        f"data.captions={captions}",
        f"run_dir={tmp_path / 'ddp'}",
        "train.epochs=1",
        "train.batch_size=8",
        "train.device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    # 24 train images x 5 captions over 2 ranks of batch 8: 120 / 16 = 7 full steps
    assert ckpt["step"] == 7
    model, _, _ = load_model(tmp_path / "ddp" / "best.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
