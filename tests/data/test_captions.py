"""Caption sources: every format, splits, restval, id checks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpfean.data.captions import (
    CaptionSet,
    MissingImagesError,
    check_ids,
    detect_format,
    load_captions,
)


def _sentences(*raws: str) -> list[dict]:
    return [{"raw": r, "tokens": r.lower().split()} for r in raws]


def _karpathy(tmp_path: Path, name: str = "dataset_coco.json") -> Path:
    five = [f"caption {k}" for k in range(5)]
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "test",
                "imgid": 0,
                "sentences": _sentences(*five, "a sixth caption"),
            },
            {
                "filepath": "train2014",
                "filename": "b.jpg",
                "split": "train",
                "imgid": 1,
                "sentences": _sentences(" a dog runs \n", "a dog"),
            },
            {
                "filepath": "val2014",
                "filename": "c.jpg",
                "split": "restval",
                "imgid": 2,
                "sentences": _sentences("a cat"),
            },
            {
                "filepath": "val2014",
                "filename": "d.jpg",
                "split": "val",
                "imgid": 3,
                "sentences": _sentences(*five),
            },
            {
                "filepath": "val2014",
                "filename": "e.jpg",
                "split": "test",
                "imgid": 4,
                "sentences": _sentences(*[f"e {k}" for k in range(5)]),
            },
        ],
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_karpathy_ids_splits_and_restval_folding(tmp_path: Path) -> None:
    path = _karpathy(tmp_path)
    caps = load_captions(path)
    assert caps.image_ids == [
        "val2014/a.jpg",
        "train2014/b.jpg",
        "val2014/c.jpg",
        "val2014/d.jpg",
        "val2014/e.jpg",
    ]
    assert caps.captions[1] == ["a dog runs", "a dog"]  # stripped, in file order
    assert caps.splits == ["test", "train", "train", "val", "test"]
    assert load_captions(path, "train").image_ids == ["train2014/b.jpg", "val2014/c.jpg"]
    unfolded = load_captions(path, "train", fold_restval=False)
    assert unfolded.image_ids == ["train2014/b.jpg"]
    assert load_captions(path, "restval", fold_restval=False).image_ids == ["val2014/c.jpg"]
    with pytest.raises(ValueError, match=r"no images in split 'restval'.*'test', 'train'"):
        load_captions(path, "restval")


def test_flickr_style_ids_without_filepath(tmp_path: Path) -> None:
    data = {
        "dataset": "flickr30k",
        "images": [
            {"filename": "1000092795.jpg", "split": "test", "sentences": _sentences("two men")}
        ],
    }
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    assert load_captions(path).image_ids == ["1000092795.jpg"]
    assert load_captions(path, image_prefix="flickr30k-images/").image_ids == [
        "flickr30k-images/1000092795.jpg"
    ]


def test_flatten_five_per_image(tmp_path: Path) -> None:
    test = load_captions(_karpathy(tmp_path), "test")
    flat, owner = test.flatten(5)
    assert flat[:5] == [f"caption {k}" for k in range(5)]  # the sixth is dropped
    assert flat[5:] == [f"e {k}" for k in range(5)]
    assert owner == [0] * 5 + [1] * 5
    everything, owner_all = test.flatten(None)
    assert len(everything) == 11 and owner_all[5] == 0
    train = load_captions(_karpathy(tmp_path), "train")
    with pytest.raises(ValueError, match=r"image 'train2014/b.jpg' has 2 captions, 5 are"):
        train.flatten(5)


def test_coco_caption_annotations(tmp_path: Path) -> None:
    data = {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_09.jpg"},
            {"id": 3, "file_name": "COCO_train2014_03.jpg"},
            {"id": 4, "file_name": "COCO_train2014_04.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "caption": "A bus."},
            {"id": 2, "image_id": 9, "caption": "A tree. "},
            {"id": 5, "image_id": 3, "caption": "A red bus."},
        ],
    }
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"dropped 1 images without captions.*_04"):
        caps = load_captions(path, image_prefix="train2014")
    assert caps.image_ids == ["train2014/COCO_train2014_09.jpg", "train2014/COCO_train2014_03.jpg"]
    assert caps.captions == [["A tree."], ["A bus.", "A red bus."]]
    assert caps.splits == [None, None]
    with pytest.raises(ValueError, match="no split information"), pytest.warns(UserWarning):
        load_captions(path, "train")
    data["annotations"].append({"id": 7, "image_id": 99, "caption": "x"})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[3\] \(id 7\).*image_id 99"):
        load_captions(path)


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    rows = [
        {"image": "./x/1.jpg", "caption": "one", "split": "train"},
        {"image": "x\\2.jpg", "caption": "two", "split": "test"},
        {"image": "x/1.jpg", "caption": "one again", "split": "train"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    caps = load_captions(path)
    assert caps.image_ids == ["x/1.jpg", "x/2.jpg"]
    assert caps.captions == [["one", "one again"], ["two"]]
    assert load_captions(path, "test").image_ids == ["x/2.jpg"]
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg"}\n')
    with pytest.raises(ValueError, match=r"caps.jsonl: line 2: needs keys"):
        load_captions(path)
    path.write_text('{"image": "a.jpg", "caption": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        load_captions(path)


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "caps.csv"
    path.write_text(
        'image,caption\nimgs/a.png,"a dog, running"\nimgs/b.png,a cat\nimgs/a.png,another dog\n'
    )
    caps = load_captions(path)
    assert caps.image_ids == ["imgs/a.png", "imgs/b.png"]
    assert caps.captions == [["a dog, running", "another dog"], ["a cat"]]
    path.write_text("file,text\na.png,x\n")
    with pytest.raises(ValueError, match="'image' and 'caption'"):
        load_captions(path)


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "karpathy", "coco"])
def test_empty_caption_is_an_error_naming_the_place(tmp_path: Path, suffix: str) -> None:
    if suffix == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text(
            '{"image": "a.jpg", "caption": "fine"}\n{"image": "b.jpg", "caption": " "}\n'
        )
        where = r"c.jsonl: line 2: empty caption for image 'b.jpg'"
    elif suffix == "csv":
        path = tmp_path / "c.csv"
        path.write_text("image,caption\na.jpg,fine\nb.jpg,\n")
        where = r"c.csv: line 3: empty caption for image 'b.jpg'"
    elif suffix == "karpathy":
        path = tmp_path / "k.json"
        path.write_text(
            json.dumps(
                {
                    "images": [
                        {"filename": "a.jpg", "split": "train", "sentences": _sentences("fine")},
                        {
                            "filename": "b.jpg",
                            "split": "train",
                            "sentences": _sentences("ok", "\t"),
                        },
                    ]
                }
            )
        )
        where = r"k.json: images\[1\].sentences\[1\]: empty caption for image 'b.jpg'"
    else:
        path = tmp_path / "c.json"
        path.write_text(
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "b.jpg"}],
                    "annotations": [{"id": 4, "image_id": 1, "caption": ""}],
                }
            )
        )
        where = r"annotations\[0\] \(id 4\): empty caption for image 'b.jpg'"
    with pytest.raises(ValueError, match=where):
        load_captions(path)


def test_skip_empty_drops_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"image": "a.jpg", "caption": "fine"}\n{"image": "a.jpg", "caption": ""}\n'
        '{"image": "b.jpg", "caption": ""}\n'
    )
    with pytest.warns(UserWarning) as record:
        caps = load_captions(path, skip_empty=True)
    messages = [str(w.message) for w in record]
    assert any("skipped 2 empty captions" in m for m in messages)
    assert any("dropped 1 images without captions (first: 'b.jpg')" in m for m in messages)
    assert caps.image_ids == ["a.jpg"] and caps.captions == [["fine"]]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "dataset_coco.json"
    with pytest.raises(FileNotFoundError, match=r"nope/dataset_coco\.json"):
        load_captions(missing)


def test_format_detection(tmp_path: Path) -> None:
    assert detect_format(_karpathy(tmp_path)) == "json"
    odd = tmp_path / "captions.txt"
    odd.write_text("a.jpg\tsomething\n")
    with pytest.raises(ValueError, match="cannot tell the caption format"):
        load_captions(odd)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"file": "a.jpg"}]}))
    with pytest.raises(ValueError, match="neither Karpathy"):
        load_captions(other)
    padded = tmp_path / "padded.dat"
    padded.write_text(
        "\n  "
        + json.dumps(
            {"images": [{"filename": "a.jpg", "split": "val", "sentences": _sentences("x")}]}
        )
    )
    assert load_captions(padded).image_ids == ["a.jpg"]


def test_absolute_ids_are_rejected_and_an_image_may_be_in_several_splits(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"image": "/data/a.jpg", "caption": "x"}\n')
    with pytest.raises(ValueError, match="relative to the images root"):
        load_captions(path)
    # COCO's published test split is the first part of testall: one image, two splits
    path.write_text(
        '{"image": "a.jpg", "caption": "x", "split": "test"}\n'
        '{"image": "b.jpg", "caption": "z", "split": "testall"}\n'
        '{"image": "a.jpg", "caption": "x", "split": "testall"}\n'
    )
    caps = load_captions(path)
    assert caps.image_ids == ["a.jpg", "b.jpg", "a.jpg"]
    assert load_captions(path, split="testall").image_ids == ["b.jpg", "a.jpg"]
    assert load_captions(path, split="test").captions == [["x"]]


def test_check_ids_lists_the_first_ten_missing() -> None:
    ids = [f"img{k:02d}.jpg" for k in range(25)]
    caps = CaptionSet(ids, [["c"]] * 25, [None] * 25, "caps.jsonl")
    check_ids(caps, ids + ["extra.jpg"])  # all present: no error
    with pytest.raises(MissingImagesError) as err:
        check_ids(caps, ids[:5])
    msg = str(err.value)
    assert msg.startswith("20 of 25 image ids from caps.jsonl are missing")
    assert "'img05.jpg'" in msg and "'img14.jpg'" in msg and "'img15.jpg'" not in msg
    assert "first 10 shown" in msg
    with pytest.raises(MissingImagesError, match=r"^1 of 25 .*: 'img24.jpg'$"):
        check_ids(caps, ids[:24])


def test_caption_set_validates_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        CaptionSet(["a"], [], [None])
