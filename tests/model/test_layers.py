"""The paper's small components, one named layer each: what each computes, that each starts
as a no-op, and that checkpoints written with the earlier parameter names still load."""

from __future__ import annotations

import torch

from cpfean.data.dataset import RegionBatch
from cpfean.model import build_model
from cpfean.model.layers import BoxEmbedding, LabelPrior, Prominence, WordGCN

from .conftest import CAPTIONS, LABELS, random_regions, tiny_config


def test_box_embedding_sees_the_box_and_its_area_and_starts_at_zero():
    torch.manual_seed(0)
    layer = BoxEmbedding(8)
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 0.5], [0.3, 0.3, 0.9, 0.9]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(layer(boxes, mask, torch.float32), torch.zeros(1, 3, 8))
    seen = {}
    layer[0].register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    layer(boxes, mask, torch.float32)
    expected = torch.tensor([[[0.1, 0.2, 0.5, 0.6, 0.16], [0, 0, 1, 0.5, 0.5], [0, 0, 0, 0, 0]]])
    torch.testing.assert_close(seen["x"], expected)  # a padded slot's box is never read


def test_label_prior_is_zero_for_unknown_labels_and_scales_with_the_score():
    torch.manual_seed(0)
    layer = LabelPrior(torch.randn(3, 6), embed_dim=4)
    x = torch.randn(1, 4, 4)
    labels = torch.tensor([[0, 2, -1, 7]])  # two known, one padding, one outside the table
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert not layer(x, labels, torch.ones(1, 4), mask).any()  # W_p starts at zero
    layer.proj.weight.data.normal_()
    full = layer(x, labels, torch.ones(1, 4), mask)
    half = layer(x, labels, torch.full((1, 4), 0.5), mask)
    assert full[0, :2].abs().min() > 0 and not full[0, 2:].any()
    torch.testing.assert_close(half, full / 2)  # the gate does not see the score
    assert not layer(x, labels, torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.bool)).any()


def test_word_gcn_starts_as_identity_and_ignores_padded_words():
    torch.manual_seed(0)
    layer = WordGCN(8)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    torch.testing.assert_close(layer(x, mask), x)
    layer.out.weight.data.normal_()
    moved = layer(x, mask)
    assert (moved - x).norm() > 0.1
    junk = x.clone()
    junk[1, 3:] = 100.0  # padded words hold garbage
    torch.testing.assert_close(layer(junk, mask)[1, :3], moved[1, :3])


def test_prominence_logits_are_the_mlp_without_an_output_bias():
    torch.manual_seed(0)
    layer = Prominence(8)
    words = torch.randn(3, 4, 8)
    first, act, last = layer
    assert last.bias is None
    torch.testing.assert_close(layer(words), last(act(first(words))).squeeze(-1))


def test_a_checkpoint_with_the_earlier_parameter_names_still_loads():
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).eval()
    for p in model.parameters():  # trained-looking weights: none of the add-ons at zero
        p.data.normal_(0, 0.1)
    old_names = {
        "region_encoder.label_prior.table": "region_encoder.label_table",
        "region_encoder.label_prior.proj": "region_encoder.label_proj",
        "region_encoder.label_prior.gate": "region_encoder.label_gate",
        "word_encoder.gcn.q": "word_encoder.gcn_q",
        "word_encoder.gcn.k": "word_encoder.gcn_k",
        "word_encoder.gcn.out": "word_encoder.gcn_out",
    }
    old = {}
    for key, value in model.state_dict().items():
        for new, was in old_names.items():
            if key.startswith(new):
                key = was + key[len(new) :]
        old[key] = value
    assert "region_encoder.label_table" in old and "word_encoder.gcn_out.weight" in old
    torch.manual_seed(1)
    again = build_model(tiny_config(), LABELS).eval()
    again.load_state_dict(old, strict=True)
    regions = RegionBatch(*random_regions(2, n_valid=[9, 4]))
    tok = model.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        torch.testing.assert_close(
            again(regions, tok["input_ids"], tok["attention_mask"]),
            model(regions, tok["input_ids"], tok["attention_mask"]),
        )
