"""The device paths that ``make gpu-check`` proves: on CUDA when the machine has it, else the
same code on the CPU (so a CPU-only CI still runs every line but the CUDA-only ones).

Tolerances: CUDA and the CPU sum in different orders, so float32 scores agree to 1e-4, and a
recall may move by one query (a near-tie ranked the other way) but no more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpfean.config import load_config
from cpfean.data.captions import load_captions
from cpfean.data.dataset import CaptionPairDataset, PairCollator
from cpfean.data.region_store import RegionStore
from cpfean.engine import load_run_data, setup_run, train_one_epoch
from cpfean.evaluation import evaluate_split
from cpfean.model import build_model
from cpfean.precision import training_precision
from tests.test_engine import TINY_MODEL, _rows
from tests.tiny_data import make_tiny_dataset

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_gpu"))


def _cfg(tmp_path, data, *extra):
    store, captions = data
    return load_config(
        None,
        [
            *TINY_MODEL,
            f"data.regions={store}",
            f"data.captions={captions}",
            f"run_dir={tmp_path / 'run'}",
            f"train.device={DEVICE.type}",
            "train.batch_size=16",
            "train.lr=2e-3",
            "train.log_every=1",
            "train.eval_batch_size=16",
            *extra,
        ],
    )


def test_device_scores_embeddings_and_metrics_match_the_cpu(data):
    store_path, captions = data
    store = RegionStore(store_path)
    caps = load_captions(captions, split="test")
    torch.manual_seed(0)
    model = build_model(_cfg(Path("."), data).model, label_names=store.meta["label_names"])
    model.eval()
    on_cpu, cpu_sims = evaluate_split(model, store, caps, batch_size=4, device="cpu")
    on_dev, dev_sims = evaluate_split(model.to(DEVICE), store, caps, batch_size=4, device=DEVICE)
    torch.testing.assert_close(
        torch.as_tensor(dev_sims), torch.as_tensor(cpu_sims), atol=1e-4, rtol=0
    )
    n_queries = {"i2t": len(caps), "t2i": caps.num_captions}
    for key, value in on_cpu.items():
        if key in ("i2t", "t2i"):
            for k, r in value.items():
                assert abs(on_dev[key][k] - r) <= 100 / n_queries[key] + 1e-6, (key, k)
    # one image's region embeddings, as the index stores them
    img = model.encode_images(_first_batch(store, caps, model).to(DEVICE))
    ref = model.to("cpu").encode_images(_first_batch(store, caps, model))
    torch.testing.assert_close(img.regions.cpu(), ref.regions, atol=1e-4, rtol=0)


def _first_batch(store, caps, model):
    pairs = CaptionPairDataset(store, caps.image_ids[:4], caps.captions[:4])
    return PairCollator(model.tokenize)([pairs[i] for i in range(4)])["regions"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_steps_are_finite_and_lower_the_loss(tmp_path, data, dtype, monkeypatch):
    if dtype == "float16":
        if DEVICE.type != "cuda":
            pytest.skip("float16 training is the CUDA path for cards without bfloat16")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    # two loader workers: they must never touch CUDA (a forked CUDA context fails)
    cfg = _cfg(tmp_path, data, "train.amp=true", "data.num_workers=2", "train.grad_clip=2")
    cfg, store, train_caps, val_caps = load_run_data(cfg)
    run = setup_run(cfg, store, train_caps, val_caps, device=DEVICE, resume=False)
    expected = training_precision(True, DEVICE)
    assert run.amp_dtype == expected
    if expected is not None:
        assert str(run.amp_dtype) == f"torch.{dtype}"
    assert run.scaler.is_enabled() == (expected == torch.float16)
    batch = next(iter(run.loader))
    run.loader = [batch] * 12  # the same batch: its loss must fall
    train_one_epoch(run, 0, progress=False)
    losses = [float(r["loss"]) for r in _rows(Path(cfg.run_dir) / "metrics.csv")]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@needs_cuda
def test_pinned_memory_batches_reach_the_device_unchanged(data):
    store = RegionStore(data[0])
    caps = load_captions(data[1], split="train")
    model = build_model(_cfg(Path("."), data).model, label_names=store.meta["label_names"])
    loader = torch.utils.data.DataLoader(
        CaptionPairDataset(store, caps.image_ids, caps.captions),
        batch_size=8,
        collate_fn=PairCollator(model.tokenize),
        pin_memory=True,
        num_workers=2,
    )
    batch = next(iter(loader))
    assert batch["regions"].features.is_pinned() and batch["input_ids"].is_pinned()
    moved = batch["regions"].to(DEVICE, non_blocking=True)
    for a, b in zip(moved.as_tuple(), batch["regions"].as_tuple(), strict=True):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b)


@pytest.mark.slow
def test_ddp_one_process_joins_a_real_process_group(tmp_path, data):
    """torchrun with one process: NCCL on a GPU (gloo on the CPU) through the DDP code path."""
    store, captions = data
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "pipelines.train",
        "--quiet",
        *TINY_MODEL,
        f"data.regions={store}",
        f"data.captions={captions}",
        f"run_dir={tmp_path / 'ddp'}",
        "train.epochs=1",
        "train.batch_size=8",
        f"train.device={DEVICE.type}",
        "train.ddp_timeout_minutes=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    assert f"distributed training: 1 process(es), backend {backend}" in proc.stderr
    assert (tmp_path / "ddp" / "best.pt").is_file()
