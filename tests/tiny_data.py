"""A tiny learnable region store + Karpathy caption file for training and pipeline tests.

Each image holds 2-4 objects (category x colour); a region's feature is a fixed random
code of its category plus one of its colour plus noise, so a model can learn to match
"a red ball" to the right image within a few dozen steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cpfean.data.region_store import RegionRecord, RegionWriter

CATEGORIES = ["ball", "box", "tree", "car", "cup", "star"]
COLOURS = ["red", "blue", "green", "yellow"]
TEMPLATES = [
    "a {c0} {o0} and a {c1} {o1}",
    "there is a {c0} {o0} near a {c1} {o1}",
    "a {c1} {o1} beside a {c0} {o0}",
    "the picture shows a {c0} {o0}",
    "a {c0} {o0} with a {c1} {o1} in the scene",
]


def make_tiny_dataset(
    root: Path,
    *,
    n_images: int = 40,
    feature_dim: int = 32,
    seed: int = 0,
    splits: tuple[int, int, int] = (24, 8, 8),
) -> tuple[Path, Path]:
    """Write ``root/regions`` and ``root/captions.json``; returns both paths."""
    assert sum(splits) == n_images
    rng = np.random.default_rng(seed)
    cat_codes = rng.normal(size=(len(CATEGORIES), feature_dim)).astype(np.float32)
    col_codes = rng.normal(size=(len(COLOURS), feature_dim)).astype(np.float32)
    store_path, captions_path = root / "regions", root / "captions.json"
    entries = []
    meta = {
        "feature_dim": feature_dim,
        "label_names": CATEGORIES,
        "detector": {"config": "tiny-synthetic", "weights_sha256": "none"},
    }
    with RegionWriter(store_path, meta) as writer:
        for i in range(n_images):
            n = int(rng.integers(2, 5))
            cats = rng.choice(len(CATEGORIES), size=n, replace=False)
            cols = rng.integers(0, len(COLOURS), size=n)
            feats = cat_codes[cats] + col_codes[cols] + 0.3 * rng.normal(size=(n, feature_dim))
            xy = rng.uniform(0, 200, size=(n, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(20, 100, size=(n, 2))], axis=1)
            record = RegionRecord.from_detections(
                feats.astype(np.float32),
                boxes.astype(np.float32),
                cats,
                np.full(n, 0.9),
                image_hw=(320, 320),
            )
            image_id = f"img{i:03d}.png"
            writer.put(image_id, record)
            words = {
                "o0": CATEGORIES[cats[0]],
                "c0": COLOURS[cols[0]],
                "o1": CATEGORIES[cats[1]],
                "c1": COLOURS[cols[1]],
            }
            split = "train" if i < splits[0] else "val" if i < splits[0] + splits[1] else "test"
            sentences = [
                {"raw": t.format(**words), "tokens": t.format(**words).split()} for t in TEMPLATES
            ]
            entries.append(
                {
                    "filename": image_id,
                    "filepath": "",
                    "split": split,
                    "imgid": i,
                    "sentences": sentences,
                }
            )
    captions_path.write_text(json.dumps({"images": entries, "dataset": "tiny"}))
    return store_path, captions_path


def tiny_model(**overrides):
    """A seeded CPFEAN model sized for ``make_tiny_dataset`` (d = 32, a random tiny text
    encoder, no dropout), eval mode; returns the model and its config."""
    import torch

    from cpfean.model import ModelConfig, build_model

    torch.manual_seed(0)
    fields = dict(
        feature_dim=32,
        embed_dim=32,
        text_encoder="tiny-random",
        region_heads=4,
        region_ff_dim=64,
        dropout=0.0,
    )
    cfg = ModelConfig(**(fields | overrides))
    return build_model(cfg, CATEGORIES).eval(), cfg
