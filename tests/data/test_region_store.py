"""The region store contract: round trip, padding, validation, crash-safe resume, workers, merge."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cpfean.data.region_store import (
    NUM_REGIONS,
    SCHEMA_VERSION,
    RegionRecord,
    RegionStore,
    RegionStoreError,
    RegionWriter,
    merge_stores,
)

REPO = Path(__file__).resolve().parents[2]
KILL_SEED = int(os.environ.get("CPFEAN_KILL_SEED", "0"))
D = 16
LABELS = ["person", "dog", "frisbee", "tree"]

# Deterministic record for an index; shared verbatim with the crash-test child process.
RECORD_SRC = """
import numpy as np
from cpfean.data.region_store import RegionRecord

def make_record(seed, n=10, d=16, num_labels=4):
    rng = np.random.default_rng(seed)
    return RegionRecord.from_detections(
        features=(rng.normal(size=(n, d)) * 3).astype(np.float32),
        boxes=rng.uniform(0, 500, size=(n, 4)).astype(np.float32),
        labels=rng.integers(0, num_labels, size=n),
        scores=rng.uniform(0.2, 1.0, size=n).astype(np.float32),
        image_hw=(480 + seed, 640),
    )

def make_meta(d=16):
    return {"feature_dim": d, "label_names": ["person", "dog", "frisbee", "tree"],
            "detector": {"config": "faster_rcnn_R_101_C4", "weights_sha256": "ab" * 32},
            "thresholds": {"score": 0.2, "nms": 0.3}}
"""
_ns: dict = {}
exec(RECORD_SRC, _ns)
make_record, make_meta = _ns["make_record"], _ns["make_meta"]


def assert_same(got: RegionRecord, want: RegionRecord) -> None:
    """Exact for float32/int fields; features equal to their float16 rounding (atol ~1e-3)."""
    np.testing.assert_array_equal(got.features, want.features.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got.features, want.features, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.image_hw == want.image_hw and got.num_valid == want.num_valid
    assert got.features.dtype == np.float32 and got.labels.dtype == np.int64


def write_store(path: Path, ids_seeds: dict[str, int], **kw: object) -> dict[str, RegionRecord]:
    records = {i: make_record(s, n=s % (NUM_REGIONS + 1)) for i, s in ids_seeds.items()}
    with RegionWriter(path, make_meta(), **kw) as writer:
        for image_id, rec in records.items():
            writer.put(image_id, rec)
    return records


def test_round_trip(tmp_path: Path) -> None:
    ids = {"val/b.jpg": 3, "train/a.jpg": 0, "train/ü ñ.png": 36, "x/y/z.jpg": 17}
    records = write_store(tmp_path / "s", ids, commit_every=3)
    store = RegionStore(tmp_path / "s")
    assert len(store) == 4 and store.ids() == sorted(ids)
    for image_id, rec in records.items():
        assert image_id in store
        assert_same(store[image_id], rec)
    assert store["train/a.jpg"].num_valid == 0 and store["train/ü ñ.png"].num_valid == 36
    meta = store.meta
    assert meta["schema_version"] == SCHEMA_VERSION and meta["num_regions"] == NUM_REGIONS
    assert meta["feature_dim"] == D and meta["feature_dtype"] == "float16"
    assert meta["label_names"] == LABELS and meta["detector"]["weights_sha256"] == "ab" * 32
    assert meta["thresholds"] == {"score": 0.2, "nms": 0.3} and meta["created"].startswith("20")
    assert "missing.jpg" not in store and "__meta__" not in store
    with pytest.raises(KeyError, match="missing.jpg"):
        store["missing.jpg"]
    with pytest.raises(KeyError, match="__meta__"):
        store["__meta__"]


def test_padding_and_mask() -> None:
    rec = make_record(1, n=3)
    assert rec.features.shape == (NUM_REGIONS, D) and rec.num_valid == 3
    np.testing.assert_array_equal(rec.mask, np.arange(NUM_REGIONS) < 3)
    assert not rec.features[3:].any() and not rec.boxes[3:].any() and not rec.scores[3:].any()
    np.testing.assert_array_equal(rec.labels[3:], -1)
    assert rec.features[:3].all() and (rec.scores[:3] >= 0.2).all()
    # the first rows are the detections themselves, in order, not duplicated into the padding
    want = (np.random.default_rng(1).normal(size=(3, D)) * 3).astype(np.float32)
    np.testing.assert_array_equal(rec.features[:3], want)
    nonzero_pad = rec.features.copy()
    nonzero_pad[5] = 1.0
    with pytest.raises(ValueError, match="padding"):
        RegionRecord(nonzero_pad, rec.boxes, rec.labels, rec.scores, (10, 10), 3)


def test_from_detections_inputs_and_errors() -> None:
    f = torch.ones(4, D)
    rec = RegionRecord.from_detections(
        f, torch.zeros(4, 4), torch.tensor([0, 1, 2, 3]), None, (7, 9)
    )
    assert rec.image_hw == (7, 9) and rec.scores[:4].tolist() == [1.0] * 4
    assert rec.labels[:5].tolist() == [0, 1, 2, 3, -1]
    with pytest.raises(ValueError, match="37 detections"):
        RegionRecord.from_detections(np.ones((37, D)), np.zeros((37, 4)), None, None, (1, 1))
    with pytest.raises(ValueError, match="boxes"):
        RegionRecord.from_detections(np.ones((4, D)), np.zeros((4, 3)), None, None, (1, 1))
    with pytest.raises(ValueError, match="labels"):
        RegionRecord.from_detections(np.ones((4, D)), np.zeros((4, 4)), [1, 2], None, (1, 1))
    with pytest.raises(ValueError, match="scores"):
        RegionRecord.from_detections(np.ones((4, D)), np.zeros((4, 4)), None, np.ones(5), (1, 1))
    with pytest.raises(ValueError, match="features"):
        RegionRecord.from_detections(np.ones(D), np.zeros((1, 4)), None, None, (1, 1))
    with pytest.raises(ValueError, match="image_hw"):
        RegionRecord.from_detections(np.ones((1, D)), np.zeros((1, 4)), None, None, (-1, 1))


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(RegionStoreError, match="feature_dim"):
        RegionWriter(tmp_path / "bad", {"label_names": []})
    with RegionWriter(tmp_path / "s", make_meta()) as writer:
        writer.put("a.jpg", make_record(0))
        with pytest.raises(RegionStoreError, match="already"):
            writer.put("a.jpg", make_record(0))
        for bad_id in ("", "__meta__", "C:\\img.jpg", "/abs.jpg"):
            with pytest.raises(ValueError, match="cannot be stored"):
                writer.put(bad_id, make_record(0))
        with pytest.raises(RegionStoreError, match="does not fit"):
            writer.put("wide.jpg", make_record(0, d=D + 1))
        with pytest.raises(RegionStoreError, match="labels 0..4"):
            writer.put("label.jpg", make_record(0, num_labels=5, n=36))
        assert writer.done_ids() == {"a.jpg"}
    assert RegionStore(tmp_path / "s").ids() == ["a.jpg"]


def test_meta_mismatch_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_store(path, {"a.jpg": 1})
    created = RegionStore(path).meta["created"]
    cases = [
        ({"feature_dim": D * 2}, "'feature_dim'"),
        ({"label_names": ["person", "cat", "frisbee", "tree"]}, r"'label_names\[1\]'"),
        (
            {"detector": {"config": "faster_rcnn_R_101_C4", "weights_sha256": "cd" * 32}},
            "'detector.weights_sha256'",
        ),
        ({"thresholds": {"score": 0.5, "nms": 0.3}}, "'thresholds.score'"),
    ]
    for change, key in cases:
        with pytest.raises(RegionStoreError, match=key):
            RegionWriter(path, {**make_meta(), **change})
    with RegionWriter(path, {**make_meta(), "note": "extra keys may differ"}) as writer:
        assert "a.jpg" in writer and writer.meta["created"] == created
        writer.put("b.jpg", make_record(2))
    assert RegionStore(path).ids() == ["a.jpg", "b.jpg"]


def test_float16_overflow_and_non_finite(tmp_path: Path) -> None:
    big = make_record(0)
    big.features[2, 5] = 1e5
    nan = make_record(1)
    nan.features[0, 0] = np.nan
    with RegionWriter(tmp_path / "s", make_meta()) as writer:
        with pytest.raises(RegionStoreError, match=r"'big\.jpg'.*float16"):
            writer.put("big.jpg", big)
        with pytest.raises(RegionStoreError, match=r"'nan\.jpg'.*NaN"):
            writer.put("nan.jpg", nan)
        edge = make_record(2)
        edge.features[0, 0] = 65504.0  # the largest float16 is still fine
        writer.put("edge.jpg", edge)
    store = RegionStore(tmp_path / "s")
    assert store.ids() == ["edge.jpg"] and store["edge.jpg"].features[0, 0] == 65504.0


def test_corrupt_values_name_the_id(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_store(path, {"ok.jpg": 5, "trunc.jpg": 6, "magic.jpg": 7, "flip.jpg": 8, "ver.jpg": 9})
    env = lmdb.open(str(path), subdir=True)
    with env.begin(write=True) as txn:
        good = txn.get(b"ok.jpg")
        txn.put(b"trunc.jpg", txn.get(b"trunc.jpg")[:-10])
        txn.put(b"magic.jpg", b"XXXX" + txn.get(b"magic.jpg")[4:])
        flipped = bytearray(txn.get(b"flip.jpg"))
        flipped[100] ^= 0xFF
        txn.put(b"flip.jpg", bytes(flipped))
        txn.put(b"ver.jpg", good[:4] + (99).to_bytes(2, "little") + good[6:])
    env.close()
    store = RegionStore(path)
    assert_same(store["ok.jpg"], make_record(5, n=5))
    for image_id, what in [
        ("trunc.jpg", "truncated"),
        ("magic.jpg", "magic"),
        ("flip.jpg", "checksum"),
        ("ver.jpg", "schema version 99"),
    ]:
        with pytest.raises(RegionStoreError, match=rf"'{image_id}'.*{what}"):
            store[image_id]


def test_exception_inside_with_commits_whole_records(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with RegionWriter(tmp_path / "s", make_meta(), commit_every=100) as writer:
            for i in range(3):
                writer.put(f"{i}.jpg", make_record(i))
            raise RuntimeError("boom")
    store = RegionStore(tmp_path / "s")
    assert store.ids() == ["0.jpg", "1.jpg", "2.jpg"]
    assert_same(store["2.jpg"], make_record(2))


def test_map_grows_when_full(tmp_path: Path) -> None:
    meta = {**make_meta(256)}
    with RegionWriter(tmp_path / "s", meta, commit_every=16, map_size=1 << 16) as writer:
        for i in range(64):  # ~19 KB each, 1.2 MB in all, far past the initial 64 KB map
            writer.put(f"{i:03d}.jpg", make_record(i, d=256))
    store = RegionStore(tmp_path / "s")
    assert len(store) == 64
    assert_same(store["063.jpg"], make_record(63, d=256))


CHILD_SRC = (
    RECORD_SRC
    + """
import sys, time
from cpfean.data.region_store import RegionWriter
path, n = sys.argv[1], int(sys.argv[2])
with RegionWriter(path, make_meta(64), commit_every=7) as writer:
    for i in range(n):
        writer.put(f"img/{i:05d}.jpg", make_record(i, d=64))
        if i == 20:
            print("started", flush=True)
        time.sleep(0.001)
"""
)


def test_resume_after_kill9(tmp_path: Path) -> None:
    path, n = tmp_path / "s", 1500
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SRC, str(path), str(n)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "started"
    # the kill point replays from CPFEAN_KILL_SEED (default 0), as tests/hostile/ does
    time.sleep(np.random.default_rng(KILL_SEED).uniform(0.05, 0.3))
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    store = RegionStore(path)
    stored = store.ids()
    # whole batches only: the 21 records printed before "started" and nothing half-written
    assert 21 <= len(stored) < n and len(stored) % 7 == 0
    assert stored == [f"img/{i:05d}.jpg" for i in range(len(stored))]
    for i, image_id in enumerate(stored):
        assert_same(store[image_id], make_record(i, d=64))
    store.close()
    written = 0
    with RegionWriter(path, make_meta(64), commit_every=7) as writer:
        assert writer.done_ids() == set(stored)
        for i in range(n):
            if f"img/{i:05d}.jpg" not in writer:
                writer.put(f"img/{i:05d}.jpg", make_record(i, d=64))
                written += 1
    assert written == n - len(stored)
    store = RegionStore(path)
    assert len(store) == n and store.ids() == [f"img/{i:05d}.jpg" for i in range(n)]
    for i in (0, len(stored) - 1, len(stored), n - 1):
        assert_same(store[f"img/{i:05d}.jpg"], make_record(i, d=64))


class _StoreDataset(Dataset):
    def __init__(self, store: RegionStore, ids: list[str]):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        r = self.store[self.ids[i]]
        return {
            "features": r.features,
            "boxes": r.boxes,
            "labels": r.labels,
            "scores": r.scores,
            "mask": r.mask,
            "hw": np.array(r.image_hw),
        }


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_match_single_process(tmp_path: Path, context: str) -> None:
    write_store(tmp_path / "s", {f"{i:02d}.jpg": i for i in range(24)})
    store = RegionStore(tmp_path / "s")
    ids = store.ids()
    single = [store[i] for i in ids]  # the parent's env is open before the workers start
    loader = DataLoader(
        _StoreDataset(store, ids), batch_size=5, num_workers=2, multiprocessing_context=context
    )
    batches = list(loader)
    for key in ("features", "boxes", "labels", "scores", "mask"):
        got = torch.cat([b[key] for b in batches]).numpy()
        np.testing.assert_array_equal(got, np.stack([getattr(r, key) for r in single]))
    assert torch.cat([b["hw"] for b in batches]).tolist() == [list(r.image_hw) for r in single]


def test_store_pickles_without_env(tmp_path: Path) -> None:
    records = write_store(tmp_path / "s", {"a.jpg": 4})
    store = RegionStore(tmp_path / "s")
    store["a.jpg"]
    clone = pickle.loads(pickle.dumps(store))
    assert set(vars(clone)) == {"path", "_meta"}  # no env travels to a worker
    assert_same(clone["a.jpg"], records["a.jpg"])


def test_readers_and_writer_share_one_env_per_process(tmp_path: Path) -> None:
    path = tmp_path / "s"
    records = write_store(path, {"a.jpg": 1})
    first, second = RegionStore(path), RegionStore(path)  # LMDB forbids two envs per process
    assert_same(first["a.jpg"], records["a.jpg"])
    assert_same(second["a.jpg"], records["a.jpg"])
    with RegionWriter(path, make_meta(), commit_every=1) as writer:  # appends while readers live
        writer.put("b.jpg", make_record(2))
        assert_same(first["b.jpg"], make_record(2))  # read through the writer's env
        with pytest.raises(RegionStoreError, match="already open"):
            RegionWriter(path, make_meta())
        first.close()  # leaves the writer's env alone
        writer.put("c.jpg", make_record(3))
    assert second.ids() == ["a.jpg", "b.jpg", "c.jpg"] and len(first) == 3


def test_merge_stores(tmp_path: Path) -> None:
    r0 = write_store(tmp_path / "r0", {"a.jpg": 1, "b.jpg": 2, "shared.jpg": 9})
    r1 = write_store(tmp_path / "r1", {"c.jpg": 3, "shared.jpg": 9})
    assert merge_stores([tmp_path / "r0", tmp_path / "r1"], tmp_path / "all") == 4
    merged = RegionStore(tmp_path / "all")
    assert merged.ids() == ["a.jpg", "b.jpg", "c.jpg", "shared.jpg"]
    for image_id, rec in {**r0, **r1}.items():
        assert_same(merged[image_id], rec)
    assert merged.meta["merged_from"] == [str(tmp_path / "r0"), str(tmp_path / "r1")]
    assert not (tmp_path / "all.partial").exists()
    write_store(tmp_path / "again.partial", {"stale.jpg": 5})  # left by an interrupted merge
    assert merge_stores([tmp_path / "r1"], tmp_path / "again") == 2
    assert RegionStore(tmp_path / "again").ids() == ["c.jpg", "shared.jpg"]
    with pytest.raises(FileExistsError):
        merge_stores([tmp_path / "r0"], tmp_path / "all")
    write_store(tmp_path / "r2", {"shared.jpg": 10})
    with pytest.raises(RegionStoreError, match="'shared.jpg'.*different"):
        merge_stores([tmp_path / "r0", tmp_path / "r2"], tmp_path / "bad")
    with RegionWriter(tmp_path / "other", {**make_meta(), "feature_dim": 8}):
        pass
    with pytest.raises(RegionStoreError, match="'feature_dim'"):
        merge_stores([tmp_path / "r0", tmp_path / "other"], tmp_path / "bad2")


def test_sources_deletes_and_stores_without_sources(tmp_path: Path) -> None:
    path = tmp_path / "s"
    records = {i: make_record(s) for i, s in {"a.jpg": 1, "b.jpg": 2, "c.jpg": 3}.items()}
    with RegionWriter(path, make_meta()) as writer:
        for k, (image_id, rec) in enumerate(records.items()):
            writer.put(image_id, rec, {"size": 100 + k, "mtime_ns": 7 * k})
    store = RegionStore(path)
    sources = store.sources()
    assert len(store) == 3 and store.ids() == ["a.jpg", "b.jpg", "c.jpg"]
    assert [sources[i]["size"] for i in store.ids()] == [100, 101, 102]
    assert sources["c.jpg"]["mtime_ns"] == 14
    digests = store.digests(["a.jpg", "c.jpg"])
    assert digests == [sources["a.jpg"]["digest"], sources["c.jpg"]["digest"]]
    assert len(set(store.digests(store.ids()))) == 3
    # a store written before sources were kept: its digests come from the bytes
    store.close()
    env = lmdb.open(str(path), subdir=True, max_dbs=0)
    with env.begin(write=True) as txn:
        txn.delete(b"\x00b.jpg")
    env.close()
    assert "b.jpg" not in RegionStore(path).sources() and len(RegionStore(path)) == 3
    assert RegionStore(path).digests(["b.jpg"]) == [sources["b.jpg"]["digest"]]
    with RegionWriter(path, make_meta()) as writer:
        assert writer.done_ids() == {"a.jpg", "b.jpg", "c.jpg"}
        writer.adopt_sources({"b.jpg": {"size": 5, "mtime_ns": 6}})
        assert writer.delete(["a.jpg", "nope.jpg"]) == 1
        writer.put("a.jpg", make_record(9))  # a deleted id can be written again
    store = RegionStore(path)
    assert store.ids() == ["a.jpg", "b.jpg", "c.jpg"]
    assert store.sources()["b.jpg"] == {
        "digest": sources["b.jpg"]["digest"],
        "size": 5,
        "mtime_ns": 6,
    }
    assert_same(store["a.jpg"], make_record(9))
    assert store.digests(["a.jpg"]) != [sources["a.jpg"]["digest"]]
    # a merge keeps each record's source
    assert merge_stores([path], tmp_path / "merged") == 3
    assert RegionStore(tmp_path / "merged").sources() == store.sources()
