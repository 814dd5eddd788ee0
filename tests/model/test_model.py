"""Model invariants: gradients, padding, (cfg, state_dict) round trip, containers, overfit."""

from __future__ import annotations

import pytest
import torch

from cpfean.data.dataset import RegionBatch
from cpfean.model import (
    ContrastiveLoss,
    ImageEmbeddings,
    ModelConfig,
    TextEmbeddings,
    build_model,
)
from cpfean.model.loss import prominence_loss

from .conftest import CAPTIONS, LABELS, batch_recurrence_targets, random_regions, tiny_config

SWITCHES = {
    "full": {},
    "softmax_align": {"topk": 0},
    "region_alignment": {"use_region_alignment": True},
    "region_alignment_no_fusion": {"use_region_alignment": True, "use_fusion": False},
    "no_fusion": {"use_fusion": False},
    "no_prominence": {"use_prominence": False},
    "no_priors": {"use_spatial": False, "use_label_prior": False},
    "no_intra": {"use_gcn": False, "use_region_transformer": False},
    "frozen_text": {"freeze_text_encoder": True, "region_layers": 2},
    "centered_context": {"center_region_context": True},
    "post_norm_default_init": {"region_norm_first": False, "region_zero_init": False},
    "scan_baseline": "scan",
}


def _config(overrides):
    if overrides == "scan":
        return ModelConfig.scan_baseline(
            **{k: v for k, v in vars(tiny_config()).items() if k in _SIZES}
        )
    return tiny_config(**overrides)


_SIZES = ("feature_dim", "embed_dim", "text_encoder", "region_heads", "region_ff_dim", "dropout")


@pytest.mark.parametrize("name", list(SWITCHES))
def test_every_trainable_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(_config(SWITCHES[name]), LABELS).train()
    feats, boxes, labels, scores, mask = random_regions(4, n_valid=[36, 12, 5, 30])
    tok = model.tokenize(CAPTIONS[:4])

    def backward():
        model.zero_grad(set_to_none=True)
        sims = model(
            RegionBatch(feats, boxes, labels, scores, mask), tok["input_ids"], tok["attention_mask"]
        )
        assert sims.shape == (4, 4)
        ContrastiveLoss(margin=0.2, max_violation=False)(sims).backward()

    # zero-initialised output layers (the add-on components start as no-ops) pass no gradient
    # to the layers before them until the first step has moved them
    backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if SWITCHES[name] == {"freeze_text_encoder": True, "region_layers": 2}:
        assert all(p.grad is None for p in model.word_encoder.backbone.parameters())


def test_add_on_components_start_as_no_ops():
    """Box and label priors, region Transformer and word GCN add nothing until trained."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).eval()
    feats, boxes, labels, scores, mask = random_regions(2, n_valid=[36, 9])
    enc = model.region_encoder
    with torch.no_grad():
        regions = enc(RegionBatch(feats, boxes, labels, scores, mask))
        plain = torch.nn.functional.normalize(enc.proj(feats), dim=-1) * mask[..., None]
        torch.testing.assert_close(regions, plain)
        tok = model.tokenize(CAPTIONS[:3])
        words, wmask, _ = model.word_encoder(tok["input_ids"], tok["attention_mask"])
        model.word_encoder.gcn.out.weight.normal_()  # a trained GCN does change the words
        moved, _, _ = model.word_encoder(tok["input_ids"], tok["attention_mask"])
    assert model.word_encoder.gcn is not None and enc.spatial is not None
    assert enc.transformer is not None
    assert enc.label_prior is not None
    assert not torch.allclose(moved[wmask], words[wmask], atol=1e-3)
    h = model.word_encoder.backbone(**tok).last_hidden_state
    word_slots = tok["attention_mask"].bool() & ~torch.isin(
        tok["input_ids"], model.word_encoder.special_ids
    )
    start = int(word_slots.any(0).nonzero()[0])  # 1: after [CLS]
    plain_w = torch.nn.functional.normalize(model.word_encoder.proj(h), dim=-1)
    plain_w = plain_w[:, start : start + wmask.shape[1]]
    torch.testing.assert_close(words[wmask], plain_w[wmask])


def test_centered_context_removes_an_image_wide_update():
    """A Transformer whose update is the same vector for every region changes nothing once
    centred; uncentred, that one vector moves every region."""
    torch.manual_seed(0)
    feats, boxes, labels, scores, mask = random_regions(2, n_valid=[36, 7])
    out = {}
    for centered in (False, True):
        model = build_model(
            tiny_config(use_spatial=False, use_label_prior=False, center_region_context=centered),
            LABELS,
        ).eval()
        enc = model.region_encoder
        with torch.no_grad():
            for block in enc.transformer.layers:  # both branches emit a constant
                block.self_attn.out_proj.bias.normal_()
                block.linear1.weight.zero_()
                block.linear1.bias.fill_(1.0)
                block.linear2.weight.normal_()
            out[centered] = enc(RegionBatch(feats, boxes, labels, scores, mask))
            plain = torch.nn.functional.normalize(enc.proj(feats), dim=-1) * mask[..., None]
    torch.testing.assert_close(out[True], plain, atol=1e-5, rtol=0)
    assert (out[False] - plain)[mask].norm(dim=-1).min() > 0.1


def test_the_region_layer_starts_as_the_identity_only_when_zero_initialised():
    """Pre-norm with zero-started branches passes the projected regions through untouched;
    either the plain post-norm layer or PyTorch's initialisation moves them from the start."""
    feats, boxes, labels, scores, mask = random_regions(2, n_valid=[36, 7])
    out = {}
    for norm_first, zero_init in ((True, True), (True, False), (False, True)):
        torch.manual_seed(0)
        cfg = tiny_config(
            use_spatial=False,
            use_label_prior=False,
            region_norm_first=norm_first,
            region_zero_init=zero_init,
        )
        enc = build_model(cfg, LABELS).eval().region_encoder
        assert enc.transformer.layers[0].norm_first is norm_first
        with torch.no_grad():
            out[norm_first, zero_init] = enc(RegionBatch(feats, boxes, labels, scores, mask))
            plain = torch.nn.functional.normalize(enc.proj(feats), dim=-1) * mask[..., None]
    torch.testing.assert_close(out[True, True], plain)
    # post-norm renormalises x + 0 = x through a LayerNorm: the direction moves
    for key in ((True, False), (False, True)):
        assert (out[key] - plain)[mask].norm(dim=-1).min() > 1e-3, key


@pytest.mark.parametrize(
    "name",
    ["full", "region_alignment", "scan_baseline", "centered_context", "post_norm_default_init"],
)
def test_padding_does_not_change_scores(name):
    torch.manual_seed(0)
    model = build_model(_config(SWITCHES[name]), LABELS).eval()
    n_valid = [36, 11, 4]
    feats, boxes, labels, scores, mask = random_regions(3, n_valid=n_valid)
    g = torch.Generator().manual_seed(5)
    pad = ~mask
    junk_feats = torch.where(pad[..., None], 1e3 * torch.randn(feats.shape, generator=g), feats)
    junk_boxes = torch.where(pad[..., None], torch.rand(boxes.shape, generator=g), boxes)
    junk_labels = torch.where(pad, torch.randint(0, len(LABELS), labels.shape, generator=g), labels)
    junk_scores = torch.where(pad, torch.rand(scores.shape, generator=g), scores)
    short = model.tokenize(CAPTIONS)
    long = model.tokenizer(
        CAPTIONS, padding="max_length", max_length=40, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        txt_short = model.encode_texts(short["input_ids"], short["attention_mask"])
        txt_long = model.encode_texts(long["input_ids"], long["attention_mask"])
        clean = model.score(
            model.encode_images(RegionBatch(feats, boxes, labels, scores, mask)), txt_short
        )
        junk = model.score(
            model.encode_images(
                RegionBatch(junk_feats, junk_boxes, junk_labels, junk_scores, mask)
            ),
            txt_long,
        )
        # the same caption alone, and an image alone (other batch members must not matter)
        alone = model.score(
            model.encode_images(
                RegionBatch(feats[1:2], boxes[1:2], labels[1:2], scores[1:2], mask[1:2])
            ),
            model.encode_texts(**model.tokenize(CAPTIONS[3:4])),
        )
    torch.testing.assert_close(junk, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0, 0], clean[1, 3], atol=1e-5, rtol=0)


def test_rebuild_from_config_and_state_dict(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg, LABELS).eval()
    state = model.state_dict()
    assert "region_encoder.label_prior.table" in state
    assert state["region_encoder.label_prior.table"].shape[0] == len(LABELS)
    torch.save({"model": state}, tmp_path / "ckpt.pt")
    torch.manual_seed(123)  # a different random init must not matter
    again = build_model(cfg, LABELS)
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    again.load_state_dict(loaded["model"], strict=True)
    again.eval()
    feats, boxes, labels, scores, mask = random_regions(3, n_valid=[36, 8, 20])
    tok = model.tokenize(CAPTIONS)
    with torch.no_grad():
        a = model(
            RegionBatch(feats, boxes, labels, scores, mask), tok["input_ids"], tok["attention_mask"]
        )
        b = again(
            RegionBatch(feats, boxes, labels, scores, mask), tok["input_ids"], tok["attention_mask"]
        )
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_runs_without_labels_or_boxes():
    torch.manual_seed(0)
    model = build_model(tiny_config(use_spatial=False, use_label_prior=False), []).eval()
    assert not any("label" in k for k in model.state_dict())
    feats, _, _, _, mask = random_regions(2)
    tok = model.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        sims = model(
            RegionBatch(
                feats, torch.zeros(2, 36, 4), torch.full((2, 36), -1), torch.ones(2, 36), mask
            ),
            tok["input_ids"],
            tok["attention_mask"],
        )
    assert sims.shape == (2, 3) and torch.isfinite(sims).all()
    # label prior switched on but an empty vocabulary: no prior, still runs
    empty = build_model(tiny_config(), []).eval()
    assert empty.region_encoder.label_prior is None


def test_embedding_containers_slice_cat_and_move():
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).eval()
    feats, boxes, labels, scores, mask = random_regions(4, n_valid=[36, 3, 9, 20])
    with torch.no_grad():
        img = model.encode_images(RegionBatch(feats, boxes, labels, scores, mask))
        t1 = model.encode_texts(**model.tokenize(CAPTIONS[:3]))  # different word spans
        t2 = model.encode_texts(**model.tokenize(CAPTIONS[3:]))
        txt = TextEmbeddings.cat([t1, t2])
        both = model.encode_texts(**model.tokenize(CAPTIONS))
        assert len(img[1:3]) == 2 and len(img[0]) == 1 and len(txt) == len(CAPTIONS)
        img2 = ImageEmbeddings.cat([img[:1], img[1:]]).to("cpu")
        torch.testing.assert_close(
            model.score(img2, txt), model.score(img, both), atol=1e-5, rtol=0
        )
        assert img.to(torch.float64).regions.dtype == torch.float64
        assert img.to(torch.float64).mask.dtype == torch.bool


def test_prominence_loss_runs_and_has_gradient():
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).train()
    caps = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2], CAPTIONS[3]]
    txt = model.encode_texts(**model.tokenize(caps))
    targets = batch_recurrence_targets(txt.token_ids, txt.mask, torch.tensor([0, 0, 1, 1]))
    loss = prominence_loss(txt.log_prominence, targets)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.prominence[0].weight.grad.abs().sum() > 0


OVERFIT_CAPTIONS = [
    "a dog catches a frisbee on the grass",
    "a brown dog jumps for a frisbee",
    "a red traffic light over a wet street",
    "cars wait at the traffic light",
    "two cats sleep on a sofa",
    "a cat curled up on the couch",
    "a plate of pasta with tomato sauce",
    "spaghetti and sauce on a white plate",
    "a surfer rides a large wave",
    "a man surfing in the ocean",
    "a train pulls into the station",
    "people board a long train",
    "a bowl of fresh fruit on a table",
    "apples and bananas in a bowl",
    "a child flies a kite at the beach",
    "a kite high above the sand",
]


def test_overfits_a_tiny_set():
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).train()
    feats, boxes, labels, scores, mask = random_regions(8, n_valid=[36, 30, 20, 12, 36, 25, 8, 16])
    tok = model.tokenize(OVERFIT_CAPTIONS)
    image_ids = torch.arange(8)
    cap_ids = torch.arange(8).repeat_interleave(2)
    loss_fn = ContrastiveLoss(margin=0.2, max_violation=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        sims = model(
            RegionBatch(feats, boxes, labels, scores, mask), tok["input_ids"], tok["attention_mask"]
        )
        loss = loss_fn(sims, image_ids=image_ids, caption_image_ids=cap_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        sims = model(
            RegionBatch(feats, boxes, labels, scores, mask), tok["input_ids"], tok["attention_mask"]
        )
    pos = sims[cap_ids, torch.arange(16)]  # (16,) each caption with its own image
    neg = sims.masked_fill(image_ids[:, None] == cap_ids[None, :], float("-inf"))
    assert (pos > neg.max(dim=0).values).float().mean() >= 0.9


def test_grouping_captions_by_length_changes_no_word_embedding_nor_gradient():
    """The backbone runs on groups of similar length, each cut to its longest caption: the
    words, their gradients and the in-batch scores equal one padded pass over the batch."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), LABELS).train()
    model.word_encoder.backbone.eval()  # dropout off: the two passes must see the same net
    captions = CAPTIONS + ["a dog", "the cat on the sofa sleeps and the dog on the grass runs"]
    tok = model.tokenize(captions)
    feats, boxes, labels, scores, mask = random_regions(len(captions), n_valid=[36, 7] * 5)
    outs = {}
    for group in (0, 3):
        model.word_encoder.length_group = group
        model.zero_grad(set_to_none=True)
        sims = model(
            RegionBatch(feats, boxes, labels, scores, mask), tok["input_ids"], tok["attention_mask"]
        )
        words, wmask, _ = model.word_encoder(tok["input_ids"], tok["attention_mask"])
        ContrastiveLoss(margin=0.2, max_violation=False)(sims).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs[group] = (sims.detach(), words.detach(), wmask, grads)
    (s0, w0, m0, g0), (s3, w3, m3, g3) = outs[0], outs[3]
    assert torch.equal(m0, m3)
    torch.testing.assert_close(w3, w0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s3, s0, atol=1e-5, rtol=1e-4)
    assert set(g0) == set(g3)
    for name in g0:
        torch.testing.assert_close(g3[name], g0[name], atol=1e-4, rtol=1e-3, msg=name)
    # the spread of lengths is real: the longest caption is over twice the shortest
    lengths = tok["attention_mask"].sum(-1)
    assert lengths.max() > 2 * lengths.min()


def test_frozen_text_layers_get_no_gradient_and_the_layers_above_do():
    """text_frozen_layers=1 of the tiny encoder's 2: the embeddings and layer 0 stay fixed and
    out of the optimizer; layer 1 and the projection train; the words are those of the same
    weights unfrozen."""
    from cpfean.engine import TEXT_BACKBONE_PREFIX

    torch.manual_seed(0)
    frozen = build_model(tiny_config(text_frozen_layers=1), LABELS)
    torch.manual_seed(0)
    free = build_model(tiny_config(), LABELS)
    tok = frozen.tokenize(CAPTIONS[:4])
    feats, boxes, labels, scores, mask = random_regions(4, n_valid=[36, 12, 5, 30])
    batch = RegionBatch(feats, boxes, labels, scores, mask)
    with torch.no_grad():  # eval: no dropout, so the two are comparable
        same = frozen.eval()(batch, tok["input_ids"], tok["attention_mask"])
        torch.testing.assert_close(
            same, free.eval()(batch, tok["input_ids"], tok["attention_mask"])
        )
    sims = frozen.train()(batch, tok["input_ids"], tok["attention_mask"])
    ContrastiveLoss(margin=0.2, max_violation=False)(sims).backward()
    backbone = frozen.word_encoder.backbone
    fixed = [*backbone.embeddings.parameters(), *backbone.encoder.layer[0].parameters()]
    assert fixed and all(p.grad is None and not p.requires_grad for p in fixed)
    top = list(backbone.encoder.layer[1].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top)
    trained = {n for n, p in frozen.named_parameters() if p.requires_grad}
    prefix = TEXT_BACKBONE_PREFIX.removeprefix("word_encoder.")
    assert not any(n.startswith(f"word_encoder.{prefix}embeddings.") for n in trained)
    assert any(n.startswith(f"word_encoder.{prefix}encoder.layer.1.") for n in trained)


def test_more_frozen_text_layers_than_the_encoder_has_is_refused():
    with pytest.raises(ValueError, match="text_frozen_layers: 3 is more than .* 2 layers"):
        build_model(tiny_config(text_frozen_layers=3), LABELS)


def test_cached_frozen_states_train_as_running_every_layer():
    """With the frozen bottom cached, two training steps (the second served from the cache)
    give the same similarities and gradients as running every layer, dropout above included;
    each distinct caption is kept once, and loading weights empties the cache."""
    model = build_model(tiny_config(text_frozen_layers=1), LABELS)
    encoder = model.word_encoder
    encoder.length_group = 3  # several groups of similar length, as in a real batch
    captions = [*CAPTIONS[:6], CAPTIONS[0]]  # one caption twice
    tok = model.tokenize(captions)
    batch = RegionBatch(*random_regions(len(captions), n_valid=[36, 12, 5, 30, 8, 20, 3]))

    def step(cached: bool, seed: int):
        encoder.frozen_cache = cached
        model.zero_grad()
        torch.manual_seed(seed)
        sims = model.train()(batch, tok["input_ids"], tok["attention_mask"])
        ContrastiveLoss(margin=0.2, max_violation=False)(sims).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return sims.detach(), grads

    for seed in (0, 1):
        want, want_grads = step(False, seed)
        got, got_grads = step(True, seed)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert set(got_grads) == set(want_grads)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
        assert len(encoder._frozen_states) == len(set(captions))
    with torch.no_grad():  # evaluation runs every layer and leaves the cache as it is
        model.eval()(batch, tok["input_ids"], tok["attention_mask"])
    assert len(encoder._frozen_states) == len(set(captions))
    model.load_state_dict(model.state_dict())
    assert encoder._frozen_states == {}
