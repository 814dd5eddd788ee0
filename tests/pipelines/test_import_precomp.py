"""`python -m pipelines.import_precomp` on tiny files in the exact published layouts."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest

from cpfean.data.captions import check_ids, load_captions
from cpfean.data.region_store import NUM_REGIONS, RegionStore
from pipelines.import_precomp import main
from tests import published


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv] + ["--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_f30k_imports_every_split_with_karpathy_ids(tmp_path: Path, capsys) -> None:
    splits = published.flickr30k(tmp_path)
    src = tmp_path / "f30k_precomp"
    code, out, err = _run(capsys, src, "--karpathy", tmp_path / "dataset_flickr30k.json")
    assert code == 0, err
    assert "train: 24 images, 120 captions" in out and "dev: 8 images" in out
    store = RegionStore(src / "regions.lmdb")
    names = [published.f30k_name(s) for part in splits.values() for s in part]
    assert store.ids() == sorted(names)
    ims = np.load(src / "dev_ims.npy")
    rec = store[published.f30k_name(splits["dev"][3])]
    np.testing.assert_array_equal(rec.features, ims[3].astype(np.float16).astype(np.float32))
    assert rec.num_valid == NUM_REGIONS and not rec.boxes.any() and (rec.labels == -1).all()
    meta = store.meta
    assert meta["has_boxes"] is False and meta["has_labels"] is False
    assert meta["feature_dim"] == 16 and meta["source"] == str(src.resolve())

    caps = load_captions(src / "captions.jsonl")
    assert sorted({s for s in caps.splits}) == ["dev", "test", "train"]  # published names
    test = load_captions(src / "captions.jsonl", split="test")
    assert test.image_ids == [published.f30k_name(s) for s in splits["test"]]
    assert test.captions[0] == splits["test"][0].captions()
    # the store joins the Karpathy captions of the same images
    karpathy = load_captions(tmp_path / "dataset_flickr30k.json", split="test")
    check_ids(karpathy, store.ids())
    assert karpathy.captions == test.captions


def test_coco_rows_per_caption_testall_and_joins(tmp_path: Path, capsys) -> None:
    splits = published.coco(tmp_path, rows_per_caption=True)
    src = tmp_path / "coco_precomp"
    code, out, err = _run(capsys, src, "--karpathy", tmp_path / "dataset_coco.json")
    assert code == 0, err
    store = RegionStore(src / "regions.lmdb")
    assert len(store) == 20 + 10 + 10  # test is part of testall: stored once
    first = splits["testall"][0]
    key = "/".join(published.coco_path(first, "val2014"))
    ims = np.load(src / "testall_ims.npy")
    assert ims.shape[0] == 50  # five rows per image
    np.testing.assert_array_equal(store[key].features, ims[0].astype(np.float16).astype(np.float32))
    test = load_captions(src / "captions.jsonl", split="test")
    testall = load_captions(src / "captions.jsonl", split="testall")
    assert test.image_ids == testall.image_ids[:5] and len(testall) == 10
    # Karpathy (restval folded into train) and COCO's own annotations name the same images
    k_train = load_captions(tmp_path / "dataset_coco.json", split="train")
    check_ids(k_train, store.ids())
    assert len(k_train) == 20
    coco_val = load_captions(tmp_path / "captions_val2014.json", image_prefix="val2014")
    check_ids(coco_val, store.ids())


def test_resume_and_refuse_another_source(tmp_path: Path, capsys) -> None:
    published.flickr30k(tmp_path)
    src = tmp_path / "f30k_precomp"
    assert _run(capsys, src)[0] == 0
    store_path = src / "regions.lmdb"
    reader = RegionStore(store_path)
    ids = reader.ids()
    reader.close()
    env = lmdb.open(str(store_path), subdir=True)  # as if the first run died before this one
    with env.begin(write=True) as txn:
        txn.delete(ids[5].encode())
    env.close()
    code, out, _ = _run(capsys, src)
    assert code == 0 and "1 written now" in out
    assert RegionStore(store_path).ids() == ids
    other = tmp_path / "other"
    published.write_precomp(other, {"test": published.make_scenes(3, 9, 5)})
    code, _, err = _run(capsys, other, "--out", store_path)
    assert code == 2 and err.startswith("error: ") and "imported from" in err


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_inconsistent_counts_are_one_line_naming_file_and_counts(tmp_path: Path, capsys):
    published.write_precomp(tmp_path / "p", {"test": published.make_scenes(3, 0, 1)})
    src = tmp_path / "p"
    with open(src / "test_caps.txt", "a", encoding="utf-8") as f:
        f.write("one caption too many\n")
    code, _, err = _run(capsys, src)
    _one_line(code, err, "test_caps.txt", "16 captions for 3 feature rows")
    assert not (src / "regions.lmdb").exists()
    published.write_precomp(src, {"test": published.make_scenes(3, 0, 1)})
    (src / "test_ids.txt").write_text("1\n2\n")
    code, _, err = _run(capsys, src)
    _one_line(code, err, "test_ids.txt", "2 ids for 3 images")
    code, _, err = _run(capsys, src, "--splits", "dev")
    _one_line(code, err, "dev_ims.npy not found")
    code, _, err = _run(capsys, tmp_path / "nowhere")
    _one_line(code, err, "nowhere")
    published.write_precomp(src, {"test": published.make_scenes(3, 0, 1)})
    code, _, err = _run(capsys, src, "--karpathy", tmp_path / "nope.json")
    _one_line(code, err, "nope.json")


def test_rows_per_caption_must_repeat_one_id(tmp_path: Path, capsys) -> None:
    scenes = published.make_scenes(2, 0, 1)
    published.write_precomp(tmp_path, {"dev": scenes}, rows_per_caption=True)
    ids = [str(s.raw_id) for s in scenes for _ in range(5)]
    (tmp_path / "dev_ids.txt").write_text("\n".join(ids) + "\n")  # an id per row is fine
    assert _run(capsys, tmp_path)[0] == 0
    assert RegionStore(tmp_path / "regions.lmdb").ids() == sorted(str(s.raw_id) for s in scenes)
    ids[3] = "999"
    (tmp_path / "dev_ids.txt").write_text("\n".join(ids) + "\n")
    code, _, err = _run(capsys, tmp_path, "--out", tmp_path / "again.lmdb")
    _one_line(code, err, "dev_ids.txt", "line 4")


def test_values_beyond_float16_name_the_image(tmp_path: Path, capsys) -> None:
    scenes = published.make_scenes(3, 0, 1)
    published.write_precomp(tmp_path, {"test": scenes})
    ims = np.load(tmp_path / "test_ims.npy")
    ims[1, 0, 0] = 1e6
    np.save(tmp_path / "test_ims.npy", ims)
    code, _, err = _run(capsys, tmp_path)
    _one_line(code, err, repr(str(scenes[1].raw_id)), "float16")


@pytest.mark.parametrize("rows", ["image", "caption"])
def test_captions_file_reads_back_in_order(tmp_path: Path, capsys, rows) -> None:
    scenes = published.make_scenes(4, 0, 1)
    published.write_precomp(tmp_path, {"train": scenes}, rows_per_caption=rows == "caption")
    assert _run(capsys, tmp_path)[0] == 0
    lines = [json.loads(x) for x in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in lines] == [str(s.raw_id) for s in scenes for _ in range(5)]
    assert [r["caption"] for r in lines] == [c for s in scenes for c in s.captions()]
