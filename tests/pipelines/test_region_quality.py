import json

import numpy as np

from cpfean.data.region_store import RegionRecord, RegionStore, RegionWriter
from pipelines import region_quality


def test_found_and_labelled_fractions_per_role(tmp_path, capsys):
    meta = {"feature_dim": 4, "label_names": ["ball", "box"]}
    with RegionWriter(tmp_path / "s", meta) as w:
        # region 0 overlaps the ball exactly but says "box"; region 1 is the box, right label
        w.put(
            "a.jpg",
            RegionRecord.from_detections(
                np.zeros((2, 4), np.float32),
                np.array([[0, 0, 10, 10], [50, 50, 70, 70]], np.float32),
                np.array([1, 1]),
                np.ones(2),
                image_hw=(100, 100),
            ),
        )
    images = [
        {
            "filename": "a.jpg",
            "filepath": "",
            "split": "test",
            "objects": [
                {"category": "ball", "role": "salient", "bbox": [0, 0, 10, 10]},
                {"category": "box", "role": "salient", "bbox": [50, 50, 20, 20]},
                {"category": "ball", "role": "background", "bbox": [80, 0, 10, 10]},  # no region
            ],
        }
    ]
    result = region_quality.region_quality(RegionStore(tmp_path / "s"), images)
    assert result["salient"] == {"objects": 2, "found": 1.0, "labelled": 0.5}
    assert result["background"] == {"objects": 1, "found": 0.0, "labelled": 0.0}
    assert result["all"]["objects"] == 3 and abs(result["all"]["labelled"] - 1 / 3) < 1e-9
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images}))
    out = tmp_path / "q.json"
    assert (
        region_quality.main(
            ["--regions", str(tmp_path / "s"), "--captions", str(captions), "--json", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text())["salient"]["labelled"] == 0.5
    assert "salient" in capsys.readouterr().out
    assert (
        region_quality.main(
            ["--regions", str(tmp_path / "s"), "--captions", str(captions), "--split", "val"]
        )
        == 2
    )
