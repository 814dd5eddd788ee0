"""RegionExtractor invariants on randomly initialised detectors (no weights needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detector.config import get_region_cfg  # noqa: E402
from detector.extractor import RegionExtractor, select_regions  # noqa: E402
from tests.detector.conftest import SMALL_OPTS  # noqa: E402

pytestmark = pytest.mark.detector


def _images(seed: int = 0) -> list[np.ndarray]:
    """Two same-size scenes-like BGR images with blocks of colour (boxes to find)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        img = rng.integers(0, 60, (120, 160, 3), dtype=np.uint8)
        for _ in range(4):
            x, y = rng.integers(0, 120), rng.integers(0, 80)
            img[y : y + 30, x : x + 40] = rng.integers(80, 255, 3, dtype=np.uint8)
        out.append(img)
    return out


@pytest.fixture(scope="module")
def permissive_extractor() -> RegionExtractor:
    """SCORE_THRESH below a random model's uniform class score: up to 36 regions pass."""
    torch.manual_seed(0)
    return RegionExtractor(
        get_region_cfg("scenes_r18_fpn", SMALL_OPTS + ["REGIONS.SCORE_THRESH", "0.01"])
    )


def _check_record(rec, hw, dim, num_regions=36):
    n = rec.num_valid
    assert rec.features.shape == (num_regions, dim) and rec.boxes.shape == (num_regions, 4)
    assert rec.image_hw == hw
    assert (rec.labels[:n] >= 0).all() and (rec.labels[n:] == -1).all()
    assert not rec.features[n:].any() and not rec.boxes[n:].any() and not rec.scores[n:].any()
    assert np.abs(rec.features[:n]).sum(axis=1).min() > 0
    b = rec.boxes[:n]
    h, w = hw
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    assert (np.diff(rec.scores[:n]) <= 1e-6).all(), "regions must be sorted by score"
    assert rec.mask.sum() == n


def test_records_have_36_consistent_slots(small_extractor, permissive_extractor):
    imgs = _images()
    recs = small_extractor(imgs)
    assert len(recs) == 2
    for rec in recs:
        _check_record(rec, (120, 160), small_extractor.feature_dim)
        assert rec.num_valid == 10  # a random model passes no threshold: MIN_REGIONS kept
    for rec in permissive_extractor(imgs):
        _check_record(rec, (120, 160), permissive_extractor.feature_dim)
        assert rec.num_valid == 36  # many pass: capped at NUM_REGIONS
    assert small_extractor.feature_dim == 1024


def test_one_pass_features_equal_separately_pooled_features(permissive_extractor):
    """The gathered box-head features are those of the returned boxes (no second pass)."""
    ex = permissive_extractor
    img = _images(1)[0][:100, :150]  # resized by the extractor: scale != 1
    det = ex.detect([img])[0]
    again = ex.features_for_boxes(img, det["boxes"])
    assert det["features"].shape == again.shape == (36, 1024)
    torch.testing.assert_close(det["features"], again, rtol=1e-3, atol=1e-4)
    # and they differ from the features of other boxes: the check has teeth
    shifted = det["boxes"].clone()
    shifted[:, [0, 2]] = (shifted[:, [0, 2]] + 20).clamp(max=150)
    assert not torch.allclose(ex.features_for_boxes(img, shifted), det["features"], atol=1e-3)


def test_batch_equals_single_and_rgb_equals_bgr(small_extractor):
    imgs = _images(2)
    batch = small_extractor(imgs)
    single = small_extractor([imgs[1]])[0]
    np.testing.assert_allclose(batch[1].features, single.features, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(batch[1].boxes, single.boxes, atol=1e-3)
    rgb = small_extractor([imgs[1][:, :, ::-1].copy()], image_format="RGB")[0]
    np.testing.assert_array_equal(rgb.features, single.features)


def test_regressed_boxes_and_pooler_features():
    torch.manual_seed(0)
    ex = RegionExtractor(
        get_region_cfg(
            "scenes_r18_fpn",
            SMALL_OPTS + ["REGIONS.BOX_SOURCE", "regressed", "REGIONS.FEATURE_SOURCE", "pooler"],
        )
    )
    assert ex.feature_dim == 128  # FPN channels
    rec = ex(_images(3)[:1])[0]
    _check_record(rec, (120, 160), 128)


def test_no_proposals_gives_an_all_padding_record():
    torch.manual_seed(0)
    ex = RegionExtractor(
        get_region_cfg(
            "scenes_r18_fpn",
            SMALL_OPTS
            + ["MODEL.PROPOSAL_GENERATOR.MIN_SIZE", "100000", "REGIONS.BOX_SOURCE", "regressed"],
        )
    )
    rec = ex(_images(4)[:1])[0]
    assert rec.num_valid == 0 and (rec.labels == -1).all() and not rec.features.any()


def test_rejects_bad_arrays(small_extractor):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        small_extractor([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        small_extractor([np.zeros((10, 10, 3), np.float32)])
    assert small_extractor([]) == []


def test_select_regions_per_class_nms_threshold_and_bounds():
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [100, 100, 120, 120]],
        dtype=torch.float32,
    )
    # class 0: boxes 0 and 1 overlap (IoU 0.81) -> box 1 suppressed in class 0
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.1], [0.0, 0.5], [0.05, 0.1]])
    keep, conf = select_regions(
        boxes, scores, score_thresh=0.2, nms_thresh=0.3, min_regions=1, max_regions=10
    )
    assert keep.tolist() == [0, 2] and conf.tolist() == pytest.approx([0.9, 0.5])
    # a different class keeps an overlapping box (per-class NMS)
    scores2 = torch.tensor([[0.9, 0.0], [0.0, 0.8], [0.0, 0.0], [0.0, 0.0]])
    keep, _ = select_regions(
        boxes, scores2, score_thresh=0.2, nms_thresh=0.3, min_regions=1, max_regions=10
    )
    assert keep.tolist() == [0, 1]
    # too few pass: MIN_REGIONS best by surviving score (box 1 survives only in class 1)
    keep, conf = select_regions(
        boxes, scores, score_thresh=0.95, nms_thresh=0.3, min_regions=3, max_regions=10
    )
    assert keep.tolist() == [0, 2, 1] and conf.tolist() == pytest.approx([0.9, 0.5, 0.1])
    # cap at max_regions and at the number of proposals
    keep, _ = select_regions(
        boxes, scores, score_thresh=0.0, nms_thresh=0.3, min_regions=1, max_regions=2
    )
    assert len(keep) == 2
    keep, _ = select_regions(
        boxes[:0], scores[:0], score_thresh=0.2, nms_thresh=0.3, min_regions=10, max_regions=36
    )
    assert len(keep) == 0


def test_butd_config_builds_and_returns_36_slots_of_2048(tmp_path):
    """The BUTD R101-C4 VG config (random init, tiny input, made-up 1600-word vocabulary)."""
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("".join(f"thing{i},synonym{i}\n" for i in range(1600)))
    cfg = get_region_cfg(
        "butd_r101_c4_vg",
        [
            "MODEL.DEVICE",
            "cpu",
            "REGIONS.LABEL_NAMES_FILE",
            str(vocab),
            "INPUT.MIN_SIZE_TEST",
            "128",
            "INPUT.MAX_SIZE_TEST",
            "192",
            "MODEL.RPN.PRE_NMS_TOPK_TEST",
            "100",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "12",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
            "7",  # 4x less res5 work than 14; same dims
            # a random 101-layer net without biases scales activations by ~1e4 (real weights do
            # not); it is positively homogeneous, so a large std keeps the RPN deltas sane
            "MODEL.PIXEL_STD",
            "[1e6, 1e6, 1e6]",
        ],
    )
    torch.manual_seed(0)
    ex = RegionExtractor(cfg)
    assert ex.feature_dim == 2048 and len(ex.label_names) == 1600
    model = ex.model
    assert model.proposal_generator.rpn_head.conv.out_channels == 512
    assert model.roi_heads.res5[0].conv2.dilation == (2, 2)
    assert model.roi_heads.res5[0].conv1.stride == (1, 1)
    assert type(model.backbone.stem).__name__ == "CaffeMaxPoolStem"
    assert ex.label_names[5] == "thing5"
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    rec = ex([img])[0]
    assert rec.features.shape == (36, 2048) and rec.image_hw == (96, 128)
    assert 1 <= rec.num_valid <= 12
    _check_record(rec, (96, 128), 2048)
    assert ex.meta["detector"]["config"] == "butd_r101_c4_vg"


def test_bfloat16_backbone_where_native_keeps_float32_heads(small_extractor):
    """REGIONS.BACKBONE_BF16: the backbone's features come back float32 and close to the
    float32 pass, the records keep their invariants, and the store's meta says which; on a
    device without native bfloat16 the switch changes nothing."""
    from cpfean.precision import native_bf16

    torch.manual_seed(0)
    fast = RegionExtractor(
        get_region_cfg("scenes_r18_fpn", SMALL_OPTS + ["REGIONS.BACKBONE_BF16", "True"])
    )
    fast.model.load_state_dict(small_extractor.model.state_dict())
    imgs = _images(3)
    if not native_bf16(torch.device("cpu")):
        assert not fast.backbone_bf16 and "backbone_dtype" not in fast.meta["detector"]
        for a, b in zip(fast(imgs), small_extractor(imgs), strict=True):
            np.testing.assert_array_equal(a.features, b.features)
        return
    assert fast.backbone_bf16 and fast.meta["detector"]["backbone_dtype"] == "bfloat16"
    assert "backbone_dtype" not in small_extractor.meta["detector"]
    with torch.no_grad():
        _, _, low = fast._preprocess(imgs, "BGR")
        _, _, full = small_extractor._preprocess(imgs, "BGR")
    for name, f in full.items():
        assert low[name].dtype == torch.float32
        assert float((low[name] - f).norm() / f.norm()) < 0.02, name
    assert not torch.equal(low["p2"], full["p2"])  # it did run in bfloat16
    for rec in fast(imgs):
        _check_record(rec, (120, 160), fast.feature_dim)
