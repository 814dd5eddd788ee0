"""The two places where the Caffe bottom-up-attention net differs from stock Detectron2 modules.

Registered by importing this module (`detector.config` does), used by
`configs/butd_r101_c4_vg.yaml`:

- `build_resnet_caffe_maxpool_backbone`: the stem max-pool of Caffe (kernel 3, stride 2,
  padding 0, ceil mode) instead of Detectron2's (padding 1, floor); the feature grid shifts.
- `Res5ROIHeadsDilated`: the per-region res5 stage with stride 1 and dilation 2 (Caffe
  `test.prototxt` of the VG model), so 14x14 pooled regions stay 14x14 before mean pooling.

The third difference, the RPN's 512-channel hidden conv, needs no code: `MODEL.RPN.CONV_DIMS
[512]`. Parameter names and shapes are those of the stock modules, so a converted checkpoint
loads with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.resnet import (
    BasicStem,
    BottleneckBlock,
    ResNet,
    build_resnet_backbone,
)
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

__all__ = ["CaffeMaxPoolStem", "Res5ROIHeadsDilated", "build_resnet_caffe_maxpool_backbone"]


class CaffeMaxPoolStem(BasicStem):
    """`BasicStem` (same parameters) whose max-pool rounds like Caffe's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_resnet_caffe_maxpool_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """`build_resnet_backbone` with the Caffe stem max-pool."""
    backbone = build_resnet_backbone(cfg, input_shape)
    assert type(backbone.stem) is BasicStem, type(backbone.stem)
    backbone.stem.__class__ = CaffeMaxPoolStem  # same state, different forward
    return backbone


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsDilated(Res5ROIHeads):
    """`Res5ROIHeads` whose res5 keeps the pooled resolution (stride 1, dilation 2)."""

    @classmethod
    def _build_res5_block(cls, cfg) -> tuple[nn.Module, int]:
        r = cfg.MODEL.RESNETS
        out_channels = r.RES2_OUT_CHANNELS * 8
        blocks = ResNet.make_stage(
            BottleneckBlock,
            3,
            stride_per_block=[1, 1, 1],
            in_channels=out_channels // 2,
            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
            out_channels=out_channels,
            num_groups=r.NUM_GROUPS,
            norm=r.NORM,
            stride_in_1x1=r.STRIDE_IN_1X1,
            dilation=2,
        )
        return nn.Sequential(*blocks), out_channels
