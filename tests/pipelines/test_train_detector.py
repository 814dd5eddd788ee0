"""`python -m pipelines.train_detector`: registration, schedule, and an end-to-end smoke run
(generated scenes -> a few training iterations -> box AP -> extraction with the result)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2")

from detector.config import get_region_cfg  # noqa: E402
from detector.train import coco_category_names, register_scenes, scale_schedule  # noqa: E402

pytestmark = pytest.mark.detector


def _rectangles_coco(root: Path, n: int = 4) -> None:
    """A tiny COCO set of coloured rectangles on grey; category ids deliberately unsorted."""
    cats = [{"id": 7, "name": "red"}, {"id": 3, "name": "green"}]
    colours = {7: (220, 20, 20), 3: (20, 200, 40)}
    (root / "images").mkdir(parents=True)
    for split in ("train", "val"):
        images, anns = [], []
        for i in range(n):
            img = np.full((64, 80, 3), 128, np.uint8)
            cid = 7 if i % 2 else 3
            img[10:40, 20:60] = colours[cid]
            name = f"{split}_{i}.png"
            Image.fromarray(img).save(root / "images" / name)
            images.append({"id": i, "file_name": name, "height": 64, "width": 80})
            anns.append(
                {
                    "id": i + 1,
                    "image_id": i,
                    "bbox": [20, 10, 40, 30],
                    "category_id": cid,
                    "area": 1200,
                    "iscrowd": 0,
                }
            )
        (root / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


def test_register_rectangles_and_scale_schedule(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    _rectangles_coco(tmp_path)
    names, classes = register_scenes(tmp_path, prefix="rects")
    assert names == {"train": "rects_train", "val": "rects_val"}
    assert classes == ["green", "red"] == coco_category_names(tmp_path / "instances_val.json")
    dicts = DatasetCatalog.get("rects_train")
    assert len(dicts) == 4 and Path(dicts[0]["file_name"]).is_file()
    assert dicts[1]["annotations"][0]["category_id"] == 1  # "red" -> contiguous id 1
    assert MetadataCatalog.get("rects_val").thing_classes == ["green", "red"]
    register_scenes(tmp_path, prefix="rects")  # re-registering is allowed
    with pytest.raises(FileNotFoundError):
        register_scenes(tmp_path / "nowhere")
    cfg = get_region_cfg("scenes_r18_fpn", freeze=False)
    scale_schedule(cfg, 60)
    assert cfg.SOLVER.MAX_ITER == 60 and cfg.SOLVER.STEPS == (45, 55)
    assert cfg.SOLVER.WARMUP_ITERS == 12


SMALL_TRAIN = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "50",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "32",
    "DATALOADER.NUM_WORKERS",
    "0",
    "MODEL.DEVICE",
    "cpu",
]


@pytest.mark.slow
def test_end_to_end_scenes_train_then_extract(tmp_path, capsys):
    from cpfean.scenes.generate import generate_dataset
    from cpfean.scenes.shapes import CATEGORIES
    from pipelines.extract import main as extract_main
    from pipelines.train_detector import main as train_main

    data = tmp_path / "demo"
    generate_dataset(data, 20, seed=0, width=128, height=96)
    out = tmp_path / "det"
    torch.manual_seed(0)
    assert (
        train_main(
            ["--data", str(data), "--iters", "2", "--out", str(out), "--threads", "1", *SMALL_TRAIN]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "AP" in printed and printed["weights"] == str(out / "model_final.pth")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["wall_seconds"] > 0
    # COCOeval gives AP in [0, 100], or NaN (written as null) when nothing matched at all
    assert "AP" in metrics["bbox"]  # the evaluation hook ran on the val split
    assert metrics["AP"] == printed["AP"] == metrics["bbox"]["AP"]
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    cfg = get_region_cfg(out / "config.yaml")
    assert cfg.MODEL.WEIGHTS == str(out / "model_final.pth")
    assert list(cfg.REGIONS.LABEL_NAMES) == list(CATEGORIES)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == len(CATEGORIES)

    store = tmp_path / "regions.lmdb"
    code = extract_main(
        [
            str(data / "images"),
            "--out",
            str(store),
            "--config",
            str(out / "config.yaml"),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    from cpfean.data.region_store import RegionStore

    rs = RegionStore(store)
    assert len(rs) == 20 and rs.meta["label_names"] == list(CATEGORIES)
    rec = rs[rs.ids()[0]]
    assert rec.features.shape == (36, 1024) and rec.image_hw == (96, 128)
    assert rec.num_valid >= 10


@pytest.mark.slow
def test_the_same_seed_trains_the_same_detector(tmp_path, capsys):
    """SEED fixes initial weights, sampling and augmentation (the data loader's worker too):
    a study extends its sets later with the detector its first sets were extracted with."""
    from cpfean.scenes.generate import generate_dataset
    from pipelines.train_detector import main as train_main

    data = tmp_path / "scenes"
    generate_dataset(data, 12, seed=3, width=128, height=96)

    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        argv = ["--data", str(data), "--iters", "3", "--out", str(out), "--threads", "1"]
        opts = [*SMALL_TRAIN, "DATALOADER.NUM_WORKERS", "1", "SEED", str(seed)]
        assert train_main([*argv, *opts]) == 0
        return torch.load(out / "model_final.pth", weights_only=True)["model"]

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    capsys.readouterr()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # a trained tensor that a new seed changes (the box predictor starts from random weights)
    changed = [k for k in first if not torch.equal(first[k], other[k])]
    assert any("box_predictor" in k for k in changed)


@pytest.mark.parametrize(
    "amp, fast_bf16, expected",
    [
        (True, True, "CPUAutocastTrainer"),
        (True, False, "SimpleTrainer"),
        (False, True, "SimpleTrainer"),
    ],
)
def test_amp_trains_in_bfloat16_only_where_the_cpu_computes_it(
    tmp_path, monkeypatch, amp, fast_bf16, expected
):
    import detector.train as train_mod
    from cpfean import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    _rectangles_coco(tmp_path)
    names, classes = register_scenes(tmp_path, prefix=f"amp{int(amp)}{int(fast_bf16)}")
    cfg = get_region_cfg("scenes_effl0_fpn", [], freeze=False)
    cfg.MODEL.DEVICE, cfg.MODEL.EFFICIENTNET.PRETRAINED = "cpu", False
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names["train"],), (names["val"],)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.REGIONS.LABEL_NAMES = len(classes), classes
    cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = amp, 2, 0
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    trainer = train_mod.RegionTrainer(cfg)
    assert type(trainer._trainer).__name__ == expected
    seen = []
    model = trainer._trainer.model
    handle = model.backbone.register_forward_hook(
        lambda m, i, out: seen.append(next(iter(out.values())).dtype)
    )
    trainer._trainer.iter = 0
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        trainer._trainer.run_step()
    handle.remove()
    assert seen == [torch.bfloat16 if expected == "CPUAutocastTrainer" else torch.float32]
