"""The researcher's route on tiny files in the published layouts: published features or raw
images with the BUTD architecture -> the shipped configs -> train -> evaluate as papers do."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from cpfean.data.region_store import RegionStore
from cpfean.metrics import evaluate_protocol
from pipelines import evaluate, import_precomp, train
from tests import published

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# the shipped configs, shrunk to seconds on a CPU; everything else as shipped
TINY = [
    "model.text_encoder=tiny-random",
    "model.feature_dim=16",
    "model.embed_dim=32",
    "model.region_ff_dim=64",
    "model.region_heads=4",
    "train.epochs=2",
    "train.batch_size=8",
    "train.log_every=5",
    "train.device=cpu",
    "--quiet",
]


def _train(config: str, run: Path, *overrides: str) -> int:
    return train.main(
        ["--config", str(REPO / "configs" / config), f"run_dir={run}", *TINY, *overrides]
    )


def _evaluate(capsys, *argv) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv] + ["--device", "cpu"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _evaluate_f30k(capsys, run: Path, out_json: Path) -> dict:
    """The f30k protocol on a small test set (--any-size); its metrics."""
    code, _, err = _evaluate(
        capsys,
        "--checkpoint",
        run / "best.pt",
        "--protocol",
        "f30k",
        "--any-size",
        "--json",
        out_json,
    )
    assert code == 0, err
    return json.loads(out_json.read_text())


def test_f30k_precomp_import_train_evaluate(tmp_path, capsys, caplog):
    published.flickr30k(tmp_path)
    run = tmp_path / "run"
    src = tmp_path / "f30k_precomp"
    assert import_precomp.main([str(src), "--no-progress"]) == 0
    code = _train(
        "f30k_precomp.yaml",
        run,
        f"data.regions={src / 'regions.lmdb'}",
        f"data.captions={src / 'captions.jsonl'}",
        "model.feature_dim=2048",
    )
    assert code == 2 and "holds 16-d features" in capsys.readouterr().err  # before any model
    assert not run.exists()
    (src / "regions.lmdb").rename(tmp_path / "unused.lmdb")

    published.flickr30k(tmp_path)
    src = tmp_path / "f30k_precomp"
    assert (
        import_precomp.main(
            [str(src), "--karpathy", str(tmp_path / "dataset_flickr30k.json"), "--no-progress"]
        )
        == 0
    )
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="cpfean.train"):
        assert (
            _train(
                "f30k_precomp.yaml",
                run,
                f"data.regions={src / 'regions.lmdb'}",
                f"data.captions={src / 'captions.jsonl'}",
                "data.num_workers=2",
            )
            == 0
        )
    said = [r.getMessage() for r in caplog.records if "region store has no" in r.getMessage()]
    assert said == [
        "the region store has no boxes and no labels: model.use_spatial and "
        "model.use_label_prior off for this run"
    ]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["use_spatial"] is False and saved["model"]["use_label_prior"] is False
    assert saved["model"]["use_region_transformer"] is True  # the paper's setting, as shipped
    capsys.readouterr()

    code, _, err = _evaluate(capsys, "--checkpoint", run / "best.pt", "--protocol", "f30k")
    assert code == 2 and "expects 1000 test images, got 8" in err  # strict: the real size
    metrics = _evaluate_f30k(capsys, run, tmp_path / "f30k.json")
    assert metrics["protocol"] == "f30k" and metrics["n_images"] == 8
    assert 0 < metrics["rsum"] <= 600


def test_coco_precomp_validates_on_a_slice_and_reports_both_tables(tmp_path, capsys):
    published.coco(tmp_path, rows_per_caption=True)
    src = tmp_path / "coco_precomp"
    assert (
        import_precomp.main(
            [str(src), "--karpathy", str(tmp_path / "dataset_coco.json"), "--no-progress"]
        )
        == 0
    )
    run = tmp_path / "run"
    assert (
        _train(
            "coco_precomp.yaml",
            run,
            f"data.regions={src / 'regions.lmdb'}",
            f"data.captions={src / 'captions.jsonl'}",
            "data.val_limit=4",
            "data.num_workers=0",
        )
        == 0
    )
    best = json.loads((run / "best.json").read_text())
    assert best["metrics"]["n_images"] == 4  # the first 4 of the 10 dev images, as SCAN's 1K
    capsys.readouterr()

    both = tmp_path / "both.json"
    code, out, err = _evaluate(
        capsys, "--checkpoint", run / "best.pt", "--fold-size", "2", "--any-size", "--json", both
    )  # testall, as configured
    assert code == 0, err
    assert "(coco-5fold-1k)" in out and "(coco-5k)" in out
    tables = json.loads(both.read_text())
    assert tables["coco-5k"]["n_images"] == 10 and len(tables["coco-5fold-1k"]["folds"]) == 5

    folds = tmp_path / "folds.json"
    code, _, err = _evaluate(
        capsys,
        "--checkpoint",
        run / "best.pt",
        "--fold-size",
        "2",
        "--any-size",
        "--protocol",
        "coco-5fold-1k",
        "--json",
        folds,
    )
    assert code == 0, err
    blocks_only = json.loads(folds.read_text())
    assert blocks_only["rsum"] == pytest.approx(tables["coco-5fold-1k"]["rsum"], abs=1e-6)
    code, _, err = _evaluate(capsys, "--checkpoint", run / "best.pt", "--protocol", "coco-5fold-1k")
    assert code == 2 and "expects 5000 test images, got 10" in err


def test_raw_images_butd_extraction_train_evaluate(tmp_path, capsys):
    pytest.importorskip("detectron2")
    from pipelines import extract

    splits = published.flickr30k(tmp_path, sizes=(8, 4, 4))  # R101 regions cost ~1 s each
    images = tmp_path / "flickr30k-images"
    scenes = [s for part in splits.values() for s in part]
    published.write_images(images, scenes, [published.f30k_name(s) for s in scenes])
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("".join(f"object{i},thing{i}\n" for i in range(1600)))
    store = tmp_path / "regions.lmdb"
    code = extract.main(
        [
            str(images),
            "--out",
            str(store),
            "--config",
            "butd_r101_c4_vg",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
            "REGIONS.LABEL_NAMES_FILE",
            str(vocab),
            "INPUT.MIN_SIZE_TEST",
            "128",
            "INPUT.MAX_SIZE_TEST",
            "192",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "40",
            # random weights under FrozenBN grow activations without bound; a
            # smaller input scale keeps them finite, the architecture unchanged
            "MODEL.PIXEL_STD",
            "[1e5, 1e5, 1e5]",
        ]
    )
    assert code == 0
    regions = RegionStore(store)
    assert len(regions) == 16 and regions.meta["feature_dim"] == 2048
    assert regions.meta["label_names"][:2] == ["object0", "object1"]
    rec = regions[published.f30k_name(scenes[0])]
    assert rec.num_valid == 36 and (rec.labels >= 0).all()  # exactly 36, never fewer
    capsys.readouterr()

    run = tmp_path / "run"
    assert (
        _train(
            "f30k_butd.yaml",
            run,
            "model.feature_dim=2048",
            f"data.regions={store}",
            f"data.captions={tmp_path / 'dataset_flickr30k.json'}",
            "data.num_workers=0",
        )
        == 0
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["use_spatial"] and saved["model"]["use_label_prior"]
    metrics = _evaluate_f30k(capsys, run, tmp_path / "m.json")
    assert metrics["n_images"] == 4 and np.isfinite(metrics["rsum"])


def test_block_scores_equal_the_full_matrix(tmp_path):
    """The five diagonal blocks give the same 5-fold result as slicing the whole matrix."""
    from cpfean.checkpoint import load_model
    from cpfean.data.captions import load_captions
    from cpfean.evaluation import similarity_blocks, similarity_matrix
    from cpfean.metrics import evaluate_fold_blocks

    published.coco(tmp_path, rows_per_caption=False)
    src = tmp_path / "coco_precomp"
    assert import_precomp.main([str(src), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert (
        _train(
            "coco_precomp.yaml",
            run,
            f"data.regions={src / 'regions.lmdb'}",
            f"data.captions={src / 'captions.jsonl'}",
            "train.epochs=1",
            "data.num_workers=0",
        )
        == 0
    )
    model, _, _ = load_model(run / "best.pt")
    store = RegionStore(src / "regions.lmdb")
    caps = load_captions(src / "captions.jsonl", split="testall")
    flat = caps.flatten(5)[0]
    full = similarity_matrix(model, store, caps.image_ids, flat)
    blocks = similarity_blocks(model, store, caps.image_ids, flat, fold_size=2)
    for k, block in enumerate(blocks):
        np.testing.assert_allclose(block, full[2 * k : 2 * k + 2, 10 * k : 10 * k + 10], atol=1e-5)
    a = evaluate_fold_blocks(blocks)
    b = evaluate_protocol(full, "coco-5fold-1k", fold_size=2, strict=False)
    assert a["rsum"] == pytest.approx(b["rsum"], abs=1e-9)
