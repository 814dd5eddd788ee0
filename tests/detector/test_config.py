"""Region config: defaults -> YAML -> overrides -> frozen; loud failures naming the key."""

from __future__ import annotations

import pytest

pytest.importorskip("detectron2")

from detector.config import (  # noqa: E402
    detectron2_device,
    get_label_names,
    get_region_cfg,
    resolve_config_file,
    split_opts,
)

pytestmark = pytest.mark.detector


def test_bundled_configs_build_frozen_with_region_keys():
    cfg = get_region_cfg("scenes_r18_fpn")
    assert cfg.is_frozen()
    assert cfg.REGIONS.MAX_REGIONS == 36 and cfg.REGIONS.MIN_REGIONS == 10
    assert cfg.REGIONS.SCORE_THRESH == 0.2 and cfg.REGIONS.NMS_THRESH == 0.3
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.RESNETS.NORM == "BN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.WEIGHTS == ""
    assert cfg.MODEL.DEVICE in ("cpu", "cuda")  # "auto" resolved
    assert cfg.REGIONS.CONFIG_NAME == "scenes_r18_fpn"
    butd = get_region_cfg("butd_r101_c4_vg")
    assert butd.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsDilated" and butd.MODEL.RESNETS.DEPTH == 101
    # the published 36-box features: exactly 36 regions, one image per forward pass
    assert butd.REGIONS.MIN_REGIONS == butd.REGIONS.MAX_REGIONS == 36
    assert butd.REGIONS.IMAGES_PER_BATCH == 1 and cfg.REGIONS.IMAGES_PER_BATCH == 4
    assert butd.MODEL.ROI_HEADS.NUM_CLASSES == 1600
    assert list(butd.MODEL.PIXEL_MEAN) == [102.9801, 115.9465, 122.7717]
    assert list(butd.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]


def test_overrides_both_forms_and_loud_failures():
    cfg = get_region_cfg("scenes_r18_fpn", ["REGIONS.NMS_THRESH", "0.5", "MODEL.DEVICE=cpu"])
    assert cfg.REGIONS.NMS_THRESH == 0.5 and cfg.MODEL.DEVICE == "cpu"
    with pytest.raises(Exception, match="REGIONS.NOT_A_KEY"):
        get_region_cfg("scenes_r18_fpn", ["REGIONS.NOT_A_KEY", "1"])
    with pytest.raises(ValueError, match="REGIONS.MAX_REGIONS"):
        get_region_cfg("scenes_r18_fpn", ["REGIONS.MAX_REGIONS", "many"])
    with pytest.raises(ValueError, match="MIN_REGIONS"):
        get_region_cfg("scenes_r18_fpn", ["REGIONS.MIN_REGIONS", "40"])
    with pytest.raises(ValueError, match="MAX_REGIONS <= 1000"):
        get_region_cfg("scenes_r18_fpn", ["REGIONS.MAX_REGIONS", "1001"])


def test_max_regions_and_its_former_name():
    fixed = get_region_cfg("scenes_r18_fpn", ["REGIONS.MAX_REGIONS=100", "REGIONS.MIN_REGIONS=100"])
    assert fixed.REGIONS.MAX_REGIONS == fixed.REGIONS.MIN_REGIONS == 100
    old = get_region_cfg("scenes_r18_fpn", ["REGIONS.NUM_REGIONS=20"])
    assert old.REGIONS.MAX_REGIONS == 20 and old.REGIONS.NUM_REGIONS == 0
    same = get_region_cfg("scenes_r18_fpn", ["REGIONS.NUM_REGIONS=50", "REGIONS.MAX_REGIONS=50"])
    assert same.REGIONS.MAX_REGIONS == 50
    with pytest.raises(ValueError, match="former name of MAX_REGIONS.*is 20 but MAX_REGIONS is 50"):
        get_region_cfg("scenes_r18_fpn", ["REGIONS.NUM_REGIONS=20", "REGIONS.MAX_REGIONS=50"])


def test_an_override_of_max_regions_wins_over_a_file_of_the_former_name(tmp_path):
    old = tmp_path / "old.yaml"  # what train_detector dumped before the rename
    old.write_text("_BASE_: scenes_r18_fpn.yaml\nREGIONS:\n  NUM_REGIONS: 36\n  MIN_REGIONS: 10\n")
    assert get_region_cfg(old).REGIONS.MAX_REGIONS == 36
    got = get_region_cfg(old, ["REGIONS.MAX_REGIONS=10"])
    assert got.REGIONS.MAX_REGIONS == 10 and got.REGIONS.NUM_REGIONS == 0
    assert get_region_cfg(old, ["REGIONS.NUM_REGIONS=20"]).REGIONS.MAX_REGIONS == 20
    both = tmp_path / "both.yaml"
    both.write_text("_BASE_: scenes_r18_fpn.yaml\nREGIONS:\n  NUM_REGIONS: 20\n  MAX_REGIONS: 50\n")
    with pytest.raises(ValueError, match="set MAX_REGIONS only"):
        get_region_cfg(both)
    with pytest.raises(ValueError, match="FEATURE_SOURCE"):
        get_region_cfg("scenes_r18_fpn", ["REGIONS.FEATURE_SOURCE", "fc6"])
    with pytest.raises(ValueError, match="pairs"):
        split_opts(["REGIONS.NMS_THRESH"])
    with pytest.raises(FileNotFoundError, match="scenes_r18_fpn"):
        resolve_config_file("no_such_config")
    assert detectron2_device("cpu") == "cpu" and detectron2_device("auto") in ("cpu", "cuda")


def test_label_names_from_list_file_and_default(tmp_path):
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("yolk,egg yolk\nbanana\n\nsky\n")
    cfg = get_region_cfg(
        "scenes_r18_fpn",
        ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "REGIONS.LABEL_NAMES_FILE", str(vocab)],
    )
    assert get_label_names(cfg) == ["yolk", "banana", "sky"]
    cfg = get_region_cfg(
        "scenes_r18_fpn", ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "REGIONS.LABEL_NAMES", "['a', 'b']"]
    )
    assert get_label_names(cfg) == ["a", "b"]
    cfg = get_region_cfg("scenes_r18_fpn", ["MODEL.ROI_HEADS.NUM_CLASSES", "2"])
    assert get_label_names(cfg) == ["class_0", "class_1"]
    cfg = get_region_cfg(
        "scenes_r18_fpn",
        ["MODEL.ROI_HEADS.NUM_CLASSES", "4", "REGIONS.LABEL_NAMES_FILE", str(vocab)],
    )
    with pytest.raises(ValueError, match="3 label names"):
        get_label_names(cfg)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "model_final.pth").write_bytes(b"x")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    base = get_region_cfg("scenes_r18_fpn", freeze=False)
    base.MODEL.WEIGHTS = "model_final.pth"
    base.REGIONS.LABEL_NAMES_FILE = "vocab.txt"
    (tmp_path / "config.yaml").write_text(base.dump())
    cfg = get_region_cfg(tmp_path / "config.yaml")
    assert cfg.MODEL.WEIGHTS == str(tmp_path / "model_final.pth")
    assert cfg.REGIONS.LABEL_NAMES_FILE == str(tmp_path / "vocab.txt")
    assert cfg.REGIONS.CONFIG_NAME == "scenes_r18_fpn"  # the saved name survives
