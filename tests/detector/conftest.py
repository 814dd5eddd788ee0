"""Shared fixtures for the region-stage tests: a small randomly initialised detector."""

from __future__ import annotations

import pytest
import torch

# Shrunk scenes config: same architecture, smaller inputs and fewer proposals (fast on CPU).
SMALL_OPTS = [
    "MODEL.DEVICE",
    "cpu",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "160",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "60",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "200",
]


@pytest.fixture(scope="session")
def small_extractor():
    """A random-init `RegionExtractor` of the scenes config (seeded, shrunk inputs)."""
    pytest.importorskip("detectron2")
    from detector.config import get_region_cfg
    from detector.extractor import RegionExtractor

    torch.manual_seed(0)
    return RegionExtractor(get_region_cfg("scenes_r18_fpn", SMALL_OPTS))
