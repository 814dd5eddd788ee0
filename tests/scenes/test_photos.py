"""The photo detection set: Debian's drawings on Debian's photographs, with held-out drawings
for val, reproducible from a seed, and its sources recorded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cpfean.scenes import photos
from cpfean.scenes.templates import overlap
from pipelines import make_photo_set

pytestmark = pytest.mark.skipif(
    not photos.CLIPART_ROOT.is_dir() or not Path(photos.PHOTOGRAPHS[0][0]).is_file(),
    reason="needs Debian's openclipart-png, mate-backgrounds, plasma-workspace-wallpapers "
    "(make install installs them)",
)


def test_val_drawings_are_held_out_and_every_category_has_both():
    cat = photos.catalogue()
    assert set(cat["train"]) == set(cat["val"]) == set(photos.CATEGORIES)
    for name in photos.CATEGORIES:
        train, val = set(cat["train"][name]), set(cat["val"][name])
        assert train and val and not train & val, name
    assert all(Path(p).is_file() for p in photos.PHOTOGRAPHS for p in [p[0]])


def test_a_scene_is_reproducible_and_its_boxes_hold_the_drawings():
    a, objs = photos.make_photo_scene(3, "val", 7)
    b, again = photos.make_photo_scene(3, "val", 7)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and objs == again
    other, _ = photos.make_photo_scene(3, "val", 8)
    assert not np.array_equal(np.asarray(a), np.asarray(other))
    assert 1 <= len(objs) <= 5
    val_files = {str(p) for files in photos.catalogue()["val"].values() for p in files}
    for k, o in enumerate(objs):
        x, y, w, h = o.bbox
        assert 0 <= x and 0 <= y and x + w <= a.width and y + h <= a.height and w * h > 0
        assert o.drawing in val_files  # val scenes use only held-out drawings
        for later in objs[k + 1 :]:
            assert overlap(o.bbox, later.bbox) <= photos._MAX_OVERLAP


def test_command_writes_coco_and_sources(tmp_path, capsys):
    out = tmp_path / "set"
    assert make_photo_set.main([str(out), "--train", "4", "--val", "2", "--size", "160x120"]) == 0
    train = json.loads((out / "instances_train.json").read_text())
    val = json.loads((out / "instances_val.json").read_text())
    assert [c["name"] for c in train["categories"]] == list(photos.CATEGORIES)
    assert len(train["images"]) == 4 and len(val["images"]) == 2
    for split in (train, val):
        ids = {im["id"] for im in split["images"]}
        assert all(a["image_id"] in ids for a in split["annotations"])
        for im in split["images"]:
            assert (out / "images" / im["file_name"]).is_file()
            assert (im["width"], im["height"]) == (160, 120)
    sources = json.loads((out / "SOURCES.json").read_text())
    assert {p["licence"] for p in sources["photographs"]} <= {"GPL-2+", "LGPL-3", "CC-BY-SA-4.0"}
    assert sources["drawings"]["package"] == "openclipart-png" and sources["drawings"]["files"]


def test_captions_are_grounded_in_the_annotations(tmp_path, capsys):
    from cpfean.data.captions import load_captions
    from cpfean.scenes.templates import CATEGORY_WORDS, tokenize

    out = tmp_path / "set"
    assert make_photo_set.main([str(out), "--train", "20", "--val", "4", "--size", "160x120"]) == 0
    assert "18 train, 2 val, 4 test" in capsys.readouterr().out.splitlines()[-1]
    data = json.loads((out / "captions.json").read_text())
    coco = {
        split: json.loads((out / f"instances_{split}.json").read_text())
        for split in ("train", "val")
    }
    names = {c["id"]: c["name"] for c in coco["train"]["categories"]}
    annotated = {
        im["file_name"]: sorted(
            names[a["category_id"]] for a in split["annotations"] if a["image_id"] == im["id"]
        )
        for split in coco.values()
        for im in split["images"]
    }
    nouns = {w: c for c, words in CATEGORY_WORDS.items() for w in words}
    for im in data["images"]:
        assert sorted(o["category"] for o in im["objects"]) == annotated[im["filename"]]
        assert any(o["role"] == "salient" for o in im["objects"])
        assert im["split"] == ("test" if im["filename"].startswith("val_") else im["split"])
        for sent in im["sentences"]:
            said = {nouns[t] for t in tokenize(sent["raw"]) if t in nouns}
            # every category a caption names is one of the objects it mentions, and back
            assert said == {im["objects"][k]["category"] for k in sent["mentions"]}, sent["raw"]
    caps = load_captions(out / "captions.json", split="test")
    assert len(caps.image_ids) == 4 and all(len(c) == 5 for c in caps.captions)
    again = tmp_path / "again.json"
    (out / "captions.json").rename(again)
    assert make_photo_set.main([str(out), "--captions-only"]) == 0  # seeded: the same file
    assert (out / "captions.json").read_text() == again.read_text()
    # a folder of the user's own with a captions.json: refused, the file left as it was
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in ("instances_train.json", "instances_val.json"):
        (theirs / name).write_bytes((out / name).read_bytes())
    (theirs / "captions.json").write_text("mine")
    assert make_photo_set.main([str(theirs), "--captions-only"]) == 2
    assert (theirs / "captions.json").read_text() == "mine"
    capsys.readouterr()
    # an annotation naming a category the file does not list: one error line, no traceback
    val = json.loads((out / "instances_val.json").read_text())
    val["annotations"][0]["category_id"] = 99
    (out / "instances_val.json").write_text(json.dumps(val))
    assert make_photo_set.main([str(out), "--captions-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a COCO detection file" in err[0]
    (out / "instances_val.json").unlink()
    assert make_photo_set.main([str(out), "--captions-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instances_val.json not found" in err[0]


def test_a_missing_package_is_one_error_line_before_any_image(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(photos, "CLIPART_ROOT", tmp_path / "no-openclipart")
    photos.catalogue.cache_clear()
    try:
        assert make_photo_set.main([str(tmp_path / "out"), "--train", "2", "--val", "1"]) == 2
    finally:
        photos.catalogue.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "openclipart-png" in err[0]
    assert not list((tmp_path / "out").glob("images/*.jpg"))


def test_scenes_without_the_drawings_are_one_error_line(tmp_path, monkeypatch, capsys):
    from pipelines import make_demo_data

    monkeypatch.setattr(photos, "CLIPART_ROOT", tmp_path / "no-openclipart")
    photos.catalogue.cache_clear()
    try:
        assert make_demo_data.main([str(tmp_path / "out"), "--images", "5", "--quiet"]) == 2
    finally:
        photos.catalogue.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "apt-get install" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_folder_of_the_users_is_refused_and_left_as_it_was(tmp_path, capsys):
    theirs = tmp_path / "coco"
    (theirs / "images").mkdir(parents=True)
    (theirs / "instances_train.json").write_text('{"mine": true}')
    assert make_photo_set.main([str(theirs), "--train", "2", "--val", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "SOURCES.json" in err[0]
    assert (theirs / "instances_train.json").read_text() == '{"mine": true}'
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert make_photo_set.main([str(other), "--train", "2", "--val", "1"]) == 2
    assert "thesis.tex" in capsys.readouterr().err and sorted(os.listdir(other)) == ["thesis.tex"]
    made = tmp_path / "set"
    assert make_photo_set.main([str(made), "--train", "2", "--val", "1"]) == 0
    assert make_photo_set.main([str(made), "--train", "2", "--val", "1"]) == 0  # its own: rebuilt
