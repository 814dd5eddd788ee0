"""`python -m pipelines.import_precomp` on tiny made-up SCAN precomp files."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest

from cpfean.data.captions import load_captions
from cpfean.data.region_store import NUM_REGIONS, RegionStore
from pipelines.import_precomp import main

D = 8


def make_precomp(folder: Path, n: int = 3, per_image: int = 5, split: str = "test",
                 seed: int = 0) -> tuple[np.ndarray, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    ims = np.random.default_rng(seed).normal(size=(n, NUM_REGIONS, D)).astype(np.float32)
    np.save(folder / f"{split}_ims.npy", ims)
    caps = [f"image {j // per_image} caption {j % per_image} — naïve" for j in range(n * per_image)]
    (folder / f"{split}_caps.txt").write_text("".join(c + "\n" for c in caps), encoding="utf-8")
    return ims, caps


def test_import_writes_store_and_captions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ims, caps = make_precomp(tmp_path / "f30k")
    out = tmp_path / "regions.lmdb"
    assert main([str(tmp_path / "f30k"), "--split", "test", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    captions_path = tmp_path / "regions.lmdb.captions.jsonl"
    assert str(out) in printed and str(captions_path) in printed

    store = RegionStore(out)
    ids = ["test/000000", "test/000001", "test/000002"]
    assert store.ids() == ids
    for i, image_id in enumerate(ids):
        rec = store[image_id]
        np.testing.assert_array_equal(rec.features, ims[i].astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(rec.features, ims[i], rtol=1e-3, atol=1e-3)
        assert rec.num_valid == NUM_REGIONS and rec.mask.all() and rec.image_hw == (0, 0)
        assert not rec.boxes.any() and (rec.labels == -1).all() and (rec.scores == 1.0).all()
    meta = store.meta
    assert meta["label_names"] == [] and meta["feature_dim"] == D
    assert meta["has_boxes"] is False and meta["has_labels"] is False and meta["im_div"] == 5
    assert meta["source"] == str((tmp_path / "f30k" / "test_ims.npy").resolve())

    rows = [json.loads(line) for line in captions_path.read_text(encoding="utf-8").splitlines()]
    assert [r["caption"] for r in rows] == caps
    assert [r["image"] for r in rows] == [ids[j // 5] for j in range(15)]
    loaded = load_captions(captions_path)  # the caption readers take the file as is
    assert loaded.image_ids == ids and loaded.captions[1] == caps[5:10]


def test_import_resumes_and_refuses_other_source(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    ims, _ = make_precomp(tmp_path / "a")
    out = tmp_path / "a" / "test_regions.lmdb"  # the default --out
    assert main([str(tmp_path / "a"), "--split", "test", "--no-progress"]) == 0
    env = lmdb.open(str(out), subdir=True)  # as if the first run died before this record
    with env.begin(write=True) as txn:
        txn.delete(b"test/000001")
    env.close()
    capsys.readouterr()
    assert main([str(tmp_path / "a"), "--split", "test", "--no-progress"]) == 0
    assert "1 written now, 2 already there" in capsys.readouterr().out
    store = RegionStore(out)
    assert len(store) == 3
    np.testing.assert_allclose(store["test/000001"].features, ims[1], rtol=1e-3, atol=1e-3)
    store.close()
    make_precomp(tmp_path / "b", seed=1)
    assert main([str(tmp_path / "b"), "--split", "test", "--out", str(out),
                 "--no-progress"]) == 2
    assert "imported from" in capsys.readouterr().err


def test_one_caption_per_row(tmp_path: Path) -> None:
    make_precomp(tmp_path, n=4, per_image=1, split="train")
    assert main([str(tmp_path), "--split", "train", "--no-progress"]) == 0
    rows = (tmp_path / "train_regions.lmdb.captions.jsonl").read_text(encoding="utf-8")
    assert [json.loads(r)["image"] for r in rows.splitlines()] == [
        f"train/{i:06d}" for i in range(4)]
    assert RegionStore(tmp_path / "train_regions.lmdb").meta["im_div"] == 1


def test_bad_inputs_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_precomp(tmp_path, n=3, per_image=5)
    with open(tmp_path / "test_caps.txt", "a", encoding="utf-8") as f:
        f.write("one caption too many\n")
    assert main([str(tmp_path), "--split", "test", "--no-progress"]) == 2
    assert "16 caption lines for 3 image rows" in capsys.readouterr().err
    assert main([str(tmp_path), "--split", "dev", "--no-progress"]) == 2
    assert "dev_ims.npy not found" in capsys.readouterr().err
    ims, _ = make_precomp(tmp_path / "big")
    ims[1, 0, 0] = 1e6
    np.save(tmp_path / "big" / "test_ims.npy", ims)
    assert main([str(tmp_path / "big"), "--split", "test", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'test/000001'" in err and "float16" in err
