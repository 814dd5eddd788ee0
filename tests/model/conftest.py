"""Shared fixtures for the model tests: a tiny config and random region/caption batches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from cpfean.model import ModelConfig  # noqa: E402

FEATURE_DIM = 16
LABELS = ["dog", "frisbee", "man", "traffic_light", "grass"]
CAPTIONS = [
    "a dog catches a frisbee on the grass",
    "a man throws a frisbee to his dog",
    "a red traffic light over a wet street",
    "cars wait at the traffic light",
    "two cats sleep on a sofa",
    "a cat curled up on the couch",
    "a plate of pasta with tomato sauce",
    "spaghetti and sauce on a white plate",
]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        feature_dim=FEATURE_DIM,
        embed_dim=32,
        text_encoder="tiny-random",
        region_heads=4,
        region_ff_dim=64,
        dropout=0.0,
        max_words=16,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_regions(batch: int, regions: int = 36, n_valid=None, seed: int = 0):
    """features (B, R, D), boxes (B, R, 4), labels (B, R), scores (B, R), mask (B, R)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, regions, FEATURE_DIM, generator=g)
    xy = torch.rand(batch, regions, 2, generator=g) * 0.5
    wh = torch.rand(batch, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.randint(-1, len(LABELS), (batch, regions), generator=g)
    scores = torch.rand(batch, regions, generator=g)
    if n_valid is None:
        n_valid = [regions] * batch
    mask = torch.arange(regions)[None, :] < torch.tensor(n_valid)[:, None]
    return feats, boxes, labels, scores, mask


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: thread sync costs more than it saves (a lot on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch_recurrence_targets(token_ids, mask, image_ids):
    """Recurrence targets with the other captions of the same image in the batch as siblings,
    through the one implementation (``cpfean.recurrence.sibling_targets``)."""
    from cpfean.recurrence import sibling_targets

    C, L = token_ids.shape
    same = [[j for j in range(C) if j != c and image_ids[j] == image_ids[c]] for c in range(C)]
    sib = torch.full((C, max(1, max(map(len, same))), L), -1, dtype=torch.long)
    for c, others in enumerate(same):
        for s, j in enumerate(others):
            sib[c, s] = torch.where(mask[j], token_ids[j], -1)
    return sibling_targets(token_ids, mask, sib, image_ids)
