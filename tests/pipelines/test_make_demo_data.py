"""Command-line smoke runs of `pipelines.make_demo_data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from cpfean.data.captions import check_ids, load_captions
from pipelines.make_demo_data import main


def test_cli_writes_a_small_data_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main([str(out), "--images", "10", "--seed", "3", "--size", "160x120", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 10 images (8 train / 1 val / 1 test, 160x120)" in printed and " s " in printed
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == [f"{i:06d}.jpg" for i in range(10)]
    with Image.open(out / "images" / images[0]) as im:
        assert im.size == (160, 120)
    caps = load_captions(out / "captions.json")
    check_ids(caps, images)
    flat, _ = caps.select("test").flatten(5)
    assert len(flat) == 5
    coco = COCO(str(out / "instances_train.json"))
    assert len(coco.getImgIds()) == 8 and len(coco.getAnnIds()) >= 3 * 8
    assert json.loads((out / "captions.json").read_text())["generator"]["seed"] == 3


def test_cli_png_and_workers_give_the_same_scenes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        main(
            [
                str(a),
                "--images",
                "40",
                "--seed",
                "1",
                "--workers",
                "1",
                "--quiet",
                "--format",
                "png",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                str(b),
                "--images",
                "40",
                "--seed",
                "1",
                "--workers",
                "2",
                "--quiet",
                "--format",
                "png",
            ]
        )
        == 0
    )
    assert (a / "captions.json").read_bytes() == (b / "captions.json").read_bytes()
    assert (a / "images" / "000039.png").read_bytes() == (b / "images" / "000039.png").read_bytes()


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "x"), "--images", "2", "--quiet"]) == 2
    assert "at least 3 images" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "y"), "--size", "320by240"])
    assert "size must look like 320x240" in capsys.readouterr().err
