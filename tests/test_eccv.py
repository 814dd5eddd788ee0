"""ECCV Caption and CxC metrics through eccv-caption: on the package's own 5K test ids, with
score matrices built so that the values are known; ids matched from a COCO caption file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("eccv_caption")

from cpfean.data.captions import CaptionSet  # noqa: E402
from cpfean.eccv import (  # noqa: E402
    METRICS,
    caption_ids,
    check_known,
    coco_image_id,
    eccv_ids,
    eccv_metrics,
)


@pytest.fixture(scope="module")
def package():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics

    metric = Metrics()
    images = sorted(metric.coco_gts["i2t"])
    captions = [c for i in images for c in metric.coco_gts["i2t"][i]]
    return metric, images, captions


def _matrix(images, captions, pairs) -> np.ndarray:
    """1 at the (image, caption) pairs given as {image: captions}, 0 elsewhere."""
    col = {c: k for k, c in enumerate(captions)}
    sims = np.zeros((len(images), len(captions)), np.int8)
    for r, image in enumerate(images):
        for c in pairs.get(image, ()):
            if c in col:
                sims[r, col[c]] = 1
    return sims


def _invert(t2i: dict) -> dict:
    out: dict = {}
    for c, images in t2i.items():
        for i in images:
            out.setdefault(i, []).append(c)
    return out


@pytest.mark.slow
def test_known_values_on_the_package_test_ids(package):
    metric, images, captions = package
    # every positive of every annotation scored lowest: nothing is found
    worst = {}
    for gts in (metric.coco_gts, metric.cxc_gts, metric.eccv_gts):
        for i, cs in gts["i2t"].items():
            worst.setdefault(i, set()).update(cs)
        for i, cs in _invert(gts["t2i"]).items():
            worst.setdefault(i, set()).update(cs)
    zero = eccv_metrics(-_matrix(images, captions, worst), images, captions, metric)
    assert set(zero) == set(METRICS)
    assert all(v == {"i2t": 0.0, "t2i": 0.0} for v in zero.values()), zero
    # each image's ECCV positives first: the m of its |P| positives that are test captions
    # (a few are not) fill ranks 1..m, so mAP@R and R-Precision are m / |P|, R@1 is m > 0
    i2t = eccv_metrics(_matrix(images, captions, metric.eccv_gts["i2t"]), images, captions, metric)
    known = set(captions)
    share = [len(set(p) & known) / len(set(p)) for p in metric.eccv_gts["i2t"].values()]
    assert i2t["eccv_map_at_r"]["i2t"] == pytest.approx(100 * np.mean(share), abs=1e-4)
    assert i2t["eccv_rprecision"]["i2t"] == pytest.approx(100 * np.mean(share), abs=1e-4)
    assert i2t["eccv_r1"]["i2t"] == 100.0 and min(share) > 0 and np.mean(share) < 1
    # each caption's ECCV positive images first: every ECCV text -> image metric is perfect
    pairs = _invert(metric.eccv_gts["t2i"])
    t2i = eccv_metrics(_matrix(images, captions, pairs), images, captions, metric)
    assert {k: t2i[k]["t2i"] for k in METRICS[:3]} == dict.fromkeys(METRICS[:3], 100.0)
    # each image's CxC positive captions first: CxC image -> text recall is perfect
    cxc = eccv_metrics(_matrix(images, captions, metric.cxc_gts["i2t"]), images, captions, metric)
    assert [cxc[k]["i2t"] for k in ("cxc_r1", "cxc_r5", "cxc_r10")] == [100.0] * 3


def test_images_and_captions_the_package_does_not_know(package, tmp_path):
    metric, images, _ = package
    assert coco_image_id("val2014/COCO_val2014_000000179765.jpg") == 179765
    assert coco_image_id("179765") == 179765 and coco_image_id("cat.jpg") is None
    with pytest.raises(ValueError, match="^3 of the 5000 test images are not COCO 5K"):
        check_known([*images[:-3], 1, 2, None], metric)
    with pytest.raises(
        ValueError, match="scores all 5000 COCO 5K test images; the test set has 10"
    ):
        check_known(images[:10], metric)
    annotations = tmp_path / "captions_val2014.json"
    annotations.write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": 7, "id": 70, "caption": "A dog on grass."},
                    {"image_id": 7, "id": 71, "caption": "a dog on  grass"},
                    {"image_id": 8, "id": 80, "caption": "A red bus"},
                ]
            }
        )
    )
    # matched by text within the image, each annotation used once, case and punctuation aside
    got = caption_ids([7, 8], [["a dog on grass", "A DOG on grass!"], ["a red bus."]], annotations)
    assert got == [[70, 71], [80]]
    with pytest.raises(ValueError, match="^2 of 3 captions are not in --coco-captions"):
        caption_ids([7, 8], [["a dog on grass", "a cat"], ["a red car"]], annotations)
    caps = CaptionSet(["a/1.jpg", "b/2.jpg"], [["x"], ["y"]], [None, None])
    with pytest.raises(ValueError, match="^2 of the 2 test images are not COCO 5K"):
        eccv_ids(caps, annotations)
