"""The algebraic scorer against an explicit d-dim reference; chunking; details."""

from __future__ import annotations

import pytest
import torch

from cpfean.data.dataset import RegionBatch
from cpfean.model import build_model
from cpfean.model.reference import reference_pair_score, scan_t2i_naive

from .conftest import CAPTIONS, FEATURE_DIM, LABELS, random_regions, tiny_config

SWITCHES = [
    {},
    {"topk": 0},
    {"topk": 1},
    {"topk": 50},  # more than the regions: all valid ones
    {"use_prominence": False},
    {"lambda_softmax": 30.0},  # two softmaxes instead of the shared exp
    {"lambda_softmax": 30.0, "topk": 0},
    {"use_fusion": False},
    {"use_region_alignment": True},
    {"use_region_alignment": True, "lambda_softmax": 30.0},
    {"use_region_alignment": True, "use_fusion": False},
    {
        "use_fusion": False,
        "topk": 0,
        "use_prominence": False,
        "use_region_alignment": True,
    },  # SCAN t-i AVG + i-t AVG
    {"use_fusion": False, "topk": 0, "use_prominence": False},  # SCAN t-i AVG
]


def _encode(model, n_valid):
    feats, boxes, labels, scores, mask = random_regions(len(n_valid), n_valid=n_valid, seed=1)
    with torch.no_grad():
        img = model.encode_images(RegionBatch(feats, boxes, labels, scores, mask))
        txt = model.encode_texts(**model.tokenize(CAPTIONS))
    return img, txt


@pytest.mark.parametrize("overrides", SWITCHES)
def test_algebraic_equals_explicit_reference(overrides):
    torch.manual_seed(0)
    model = build_model(tiny_config(embed_dim=64, **overrides), LABELS).eval()
    img, txt = _encode(model, n_valid=[36, 7, 2])
    with torch.no_grad():
        fast = model.score(img, txt)
        ref = torch.stack(
            [
                torch.stack(
                    [reference_pair_score(img[i], txt[j], model.scoring) for j in range(len(txt))]
                )
                for i in range(len(img))
            ]
        )
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides", [{}, {"use_fusion": False, "topk": 0}, {"use_region_alignment": True}]
)
def test_chunked_equals_full(overrides):
    torch.manual_seed(0)
    model = build_model(tiny_config(**overrides), LABELS).eval()
    img, txt = _encode(model, n_valid=[36, 5, 20, 36, 1])
    with torch.no_grad():
        full = model.score(img, txt, image_chunk=100, text_chunk=100)
        for ic, tc in [(1, 1), (2, 3), (4, 5)]:
            torch.testing.assert_close(
                model.score(img, txt, image_chunk=ic, text_chunk=tc), full, atol=1e-6, rtol=0
            )


def test_scan_baseline_matches_naive_scan_loop():
    torch.manual_seed(0)
    model = build_model(tiny_config(use_fusion=False, topk=0, use_prominence=False), []).eval()
    img, txt = _encode(model, n_valid=[36, 36, 36])
    with torch.no_grad():
        fast = model.score(img, txt)
        words = [txt.words[j][txt.mask[j]] for j in range(len(txt))]
        naive = scan_t2i_naive(img.regions, words, lambda_softmax=model.lambda_softmax)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


def test_details_for_one_pair():
    torch.manual_seed(0)
    model = build_model(tiny_config(topk=3, use_region_alignment=True), LABELS).eval()
    img, txt = _encode(model, n_valid=[9])
    with torch.no_grad():
        sims, det = model.score(img[0], txt[1], return_details=True)
    L = txt.words.shape[1]
    assert sims.shape == (1, 1)
    torch.testing.assert_close(sims, model.score(img[0], txt[1]))
    assert det["region_gates"].shape == (1, 1, 36)
    assert det["word_gates"].shape == det["word_weights"].shape == (1, 1, L)
    assert det["alignment"].shape == (1, 1, L, 3)
    gates = det["region_gates"][0, 0]
    assert (gates[9:] == 0).all() and ((gates[:9] > 0) & (gates[:9] < 1)).all()
    assert (det["alignment"] < 9).all()  # words align only to valid regions
    weights = det["word_weights"][0, 0]  # the caption's prominence x this pair's word gate
    prominence = txt.log_prominence[1].exp()
    torch.testing.assert_close(prominence.sum(), torch.tensor(1.0))
    torch.testing.assert_close(weights, prominence * det["word_gates"][0, 0])
    assert (weights[~txt.mask[1]] == 0).all()
    by_words = (weights * det["word_scores"][0, 0]).sum()
    # the region direction: each valid region's cosine with its word context, gate / 9 each
    region_w, region_s = det["region_weights"][0, 0], det["region_scores"][0, 0]
    torch.testing.assert_close(region_w, gates / 9)
    assert (region_s[9:] == 0).all() and (region_s[:9].abs() <= 1 + 1e-6).all()
    torch.testing.assert_close((by_words + (region_w * region_s).sum()) / 2, sims[0, 0])


def test_low_precision_inputs_are_scored_in_float32():
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).eval()
    img, txt = _encode(model, n_valid=[36, 7])
    with torch.no_grad():
        ref = model.score(img, txt)
        half = model.score(img.to(torch.bfloat16), txt.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model.score(img, txt)
    assert half.dtype == auto.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=3e-2, rtol=0)
    torch.testing.assert_close(auto, ref, atol=1e-6, rtol=0)


def test_empty_inputs():
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).eval()
    img, txt = _encode(model, n_valid=[3])
    with torch.no_grad():
        assert model.score(img[:0], txt).shape == (0, len(txt))
        assert model.score(img, txt[:0]).shape == (1, 0)


@pytest.mark.parametrize(
    "overrides", [{}, {"topk": 1}, {"topk": 0}, {"use_region_alignment": True}]
)
def test_region_slots_past_the_fullest_image_are_skipped_without_changing_scores(overrides):
    """score() cuts blocks to their fullest image's region span, and training batches are
    trimmed to theirs (RegionBatch.trimmed); the scores must equal one unchunked block over all
    36 slots, holes in the mask included."""
    from cpfean.model.fusion import score_block

    torch.manual_seed(0)
    model = build_model(tiny_config(**overrides), LABELS).eval()
    feats, boxes, labels, scores, mask = random_regions(5, n_valid=[9, 3, 1, 6, 2], seed=2)
    mask[0, 4] = False  # a hole before the last valid slot: spans count slots, not regions
    tok = model.tokenize(CAPTIONS)
    with torch.no_grad():
        img = model.encode_images(RegionBatch(feats, boxes, labels, scores, mask))
        txt = model.encode_texts(**tok)
        full = score_block(img, txt, model.scoring)  # every block of 36 region slots
        assert img.region_span().tolist() == [9, 3, 1, 6, 2]
        for ic, tc in [(2, 3), (5, 8)]:
            cut = model.score(img, txt, image_chunk=ic, text_chunk=tc)
            torch.testing.assert_close(cut, full, atol=1e-6, rtol=0)
        batch = RegionBatch(feats, boxes, labels, scores, mask).trimmed()
        assert batch.mask.shape == (5, 9)
        trained = model(batch, tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(trained, full, atol=1e-5, rtol=0)


def test_trimming_a_batch_with_no_valid_region_keeps_one_slot():

    batch = RegionBatch(*random_regions(2, n_valid=[0, 0])).trimmed()
    assert batch.features.shape == (2, 1, FEATURE_DIM) and not batch.mask.any()
