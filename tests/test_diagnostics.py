"""Component diagnostics: values a hand computation or a constructed model knows."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from cpfean.checkpoint import model_payload, save_checkpoint
from cpfean.config import Config, DataConfig
from cpfean.data.captions import load_captions
from cpfean.data.region_store import RegionStore
from cpfean.diagnostics import recurrence_report, region_report, within_image_cosine
from pipelines import diagnose
from tests.tiny_data import CATEGORIES, make_tiny_dataset, tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _model(**overrides):
    return tiny_model(use_spatial=False, use_label_prior=False, **overrides)


def test_within_image_cosine_by_hand():
    x = torch.tensor([[[1.0, 0], [0, 2], [3, 0]], [[1, 1], [5, 5], [9, 9]]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    got = within_image_cosine(x, mask)
    # pairs (0,1) 0, (0,2) 1, (1,2) 0; lengths do not matter; one valid row has no pair
    assert got[0].item() == pytest.approx(1 / 3)
    assert math.isnan(got[1].item())


def test_region_report_of_a_transformer_adding_one_vector_with_uniform_attention(data):
    store_path, captions_path = data
    store = RegionStore(store_path)
    ids = load_captions(captions_path, split="test").image_ids
    model, _ = _model(use_region_transformer=True)
    plain = region_report(model, store, ids)  # the layer starts as a no-op
    with torch.no_grad():
        layer = model.region_encoder.transformer.layers[0]
        layer.self_attn.in_proj_weight.zero_()  # equal scores: uniform attention
        layer.self_attn.in_proj_bias.zero_()
        layer.self_attn.out_proj.bias.normal_()  # and a constant attention update
        layer.linear1.weight.zero_()  # the feed-forward update is constant too
        layer.linear1.bias.fill_(1.0)
        layer.linear2.weight.normal_()
    report = region_report(model, store, ids, batch_size=3)
    stats = report["transformer_layer_0"]
    assert stats["attention_entropy_over_uniform"] == pytest.approx(1.0, abs=1e-3)
    assert stats["attention_update_within_image_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert stats["feedforward_update_within_image_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert plain["transformer_layer_0"]["attention_update_norm"] == 0
    # the shared vector makes an image's regions more alike than the projection alone
    assert report["region_within_image_cosine"] > plain["region_within_image_cosine"] + 0.1
    assert report["images"] == len(ids)


def test_region_report_without_transformer_is_the_projection(data):
    store_path, captions_path = data
    store = RegionStore(store_path)
    ids = load_captions(captions_path, split="val").image_ids
    model, _ = _model(use_region_transformer=False)
    report = region_report(model, store, ids)
    assert "transformer_layer_0" not in report
    by_image = []
    for image_id in ids:
        record = store[image_id]
        feats = torch.from_numpy(record.features.astype("float32"))[None]
        with torch.no_grad():
            x = model.region_encoder.proj(feats)
        by_image.append(within_image_cosine(x, torch.from_numpy(record.mask)[None]))
    assert report["region_within_image_cosine"] == pytest.approx(
        float(torch.cat(by_image).mean()), abs=1e-4
    )


def test_recurrence_report_of_a_uniform_prominence(data):
    store_path, captions_path = data
    store = RegionStore(store_path)
    train = load_captions(captions_path, split="train")
    model, _ = _model()
    with torch.no_grad():
        model.prominence[-1].weight.zero_()  # equal logits: p uniform over the words
    report = recurrence_report(model, store, train, batches=3, batch_size=16, seed=1)
    assert report["captions"] > 0
    assert report["kl_model"] == pytest.approx(report["kl_uniform"], abs=1e-4)
    assert 0 < report["target_entropy"] and 0 < report["kl_uniform"]
    # the tiny captions open with "a", "there is a", "the picture": template words recur
    assert 0 < report["function_word_share"] < 1
    assert report == recurrence_report(model, store, train, batches=3, batch_size=16, seed=1)


def test_cli_reports_and_refuses_a_missing_checkpoint(data, tmp_path, capsys):
    store_path, captions_path = data
    model, model_cfg = _model(use_region_transformer=True)
    cfg = replace(
        Config(),
        model=model_cfg,
        data=DataConfig(regions=str(store_path), captions=str(captions_path)),
    )
    save_checkpoint(tmp_path / "best.pt", **model_payload(model, cfg, CATEGORIES))
    out = tmp_path / "report.json"
    args = ["--checkpoint", str(tmp_path / "best.pt"), "--images", "5", "--batches", "2"]
    assert diagnose.main([*args, "--json", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["regions"]["images"] == 5 and report["recurrence"]["captions"] > 0
    capsys.readouterr()
    assert diagnose.main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.pt" in err[0]
    # a folder as --json is refused before any work, not after it
    ckpt = str(tmp_path / "best.pt")
    assert diagnose.main(["--checkpoint", ckpt, "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder" in err[0]
