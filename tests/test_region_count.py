"""Any number of regions per image: the model masks padding whatever the slot count, and an
index and its search take a store of any R."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpfean.data.region_store import RegionRecord, RegionStore, RegionStoreError, RegionWriter
from cpfean.encode import encode_records
from cpfean.index import RetrievalIndex, build_index, search_index
from tests.test_index import CKPT, query
from tests.tiny_data import CATEGORIES, tiny_model


def _model():
    # the region Transformer is the one layer that mixes regions: padding must not leak
    return tiny_model(use_region_transformer=True)[0]


def _detections(n_images: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        n = int(rng.integers(3, 9))
        xy = rng.uniform(0, 100, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 60, size=(n, 2))], 1)
        out.append((rng.normal(size=(n, 32)), boxes, rng.integers(0, 6, n), np.full(n, 0.9)))
    return out


def _store(path, detections, slots: int) -> RegionStore:
    meta = {"feature_dim": 32, "label_names": CATEGORIES, "num_regions": slots}
    with RegionWriter(path, meta) as writer:
        for i, d in enumerate(detections):
            writer.put(f"{i:03d}.png", RegionRecord.from_detections(*d, (160, 200), slots))
    return RegionStore(path)


@torch.no_grad()
def test_the_same_regions_in_10_or_100_slots_score_the_same(tmp_path):
    model, dets = _model(), _detections(12)
    text = query(model, "a red ball near a box")
    scores = {}
    for slots in (10, 100):
        store = _store(tmp_path / f"r{slots}", dets, slots)
        assert store.meta["num_regions"] == slots and store[store.ids()[0]].num_regions == slots
        records = [store[i] for i in store.ids()]
        scores[slots] = model.score(encode_records(model, records), text)[:, 0]
    torch.testing.assert_close(scores[10], scores[100], rtol=1e-5, atol=1e-5)
    # the check has teeth: a padding slot that is not masked changes the score
    store = RegionStore(tmp_path / "r100")
    rec = store[store.ids()[0]]
    leaked = RegionRecord(
        rec.features, rec.boxes, rec.labels, rec.scores, rec.image_hw, rec.num_valid + 1
    )
    moved = model.score(encode_records(model, [leaked]), text)[0, 0]
    assert abs(float(moved) - float(scores[100][0])) > 1e-4


@torch.no_grad()
def test_an_index_of_a_100_region_store_answers_as_live_scoring(tmp_path):
    model, dets = _model(), _detections(20, seed=1)
    store = _store(tmp_path / "regions", dets, 100)
    out = build_index(
        model, store, tmp_path / "index", checkpoint=CKPT, config={}, shard_size=6, dtype="float32"
    )
    index = RetrievalIndex(out.path)
    assert index.boxes.shape == (20, 100, 4) and index.labels.shape == (20, 100)
    text = query(model, "a green tree")
    rows, scores, _ = search_index(model, index, text, top_k=20)
    live = model.score(encode_records(model, [store[i] for i in store.ids()]), text)[:, 0]
    np.testing.assert_allclose(scores, live.numpy()[rows], rtol=1e-5, atol=1e-5)


def test_a_store_refuses_records_of_another_region_count(tmp_path):
    store = _store(tmp_path / "r20", _detections(2), 20)
    wrong = RegionRecord.from_detections(*_detections(1)[0], (160, 200), 36)
    with RegionWriter(tmp_path / "r20", store.meta) as writer:
        with pytest.raises(RegionStoreError, match=r"\[regions, dim\] \[36, 32\] vs \[20, 32\]"):
            writer.put("other.png", wrong)
    with pytest.raises(RegionStoreError, match="num_regions"):
        RegionWriter(tmp_path / "r20", {**store.meta, "num_regions": 36})
    with pytest.raises(RegionStoreError, match="'num_regions' must be an int in 1..1000"):
        RegionWriter(tmp_path / "new", {"feature_dim": 32, "label_names": [], "num_regions": 0})
