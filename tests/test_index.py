"""The retrieval index and the first stage, with a tiny stand-in model (no text backbone).

The stand-in has CPFEAN's interface (encode_images / tokenize / encode_texts / score with
details) and a transparent score: sum over words of prominence x best cosine with a region.
Words and regions live in a "concept" space: each colour/shape/size word is one axis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from cpfean import first_stage
from cpfean.data.region_store import RegionRecord, RegionStore, RegionWriter
from cpfean.index import IndexMismatchError, RetrievalIndex, build_index, search_index

COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["ball", "box", "cone", "ring"]
SIZES = ["large", "small"]
CONCEPTS = COLOURS + SHAPES + SIZES
VOCAB = ["[PAD]", "[UNK]", *CONCEPTS, "a", "the", "left", "right", "of", "and", "on"]
DIM = len(CONCEPTS) + 2  # + one axis for function words, one for unknown words
RGB = {
    "red": (220, 30, 30),
    "blue": (30, 30, 220),
    "green": (30, 180, 30),
    "yellow": (230, 220, 20),
}


class _Batch:
    """Batch conveniences of the real embeddings containers (slice, cat, to, len)."""

    def _items(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __len__(self) -> int:
        return next(iter(self._items().values())).shape[0]

    def __getitem__(self, index):
        if isinstance(index, int):
            index = slice(index, index + 1)
        return type(self)(**{k: v[index] for k, v in self._items().items()})

    def to(self, device):
        return type(self)(**{k: v.to(device) for k, v in self._items().items()})

    @classmethod
    def cat(cls, parts):
        size = max(p.mask.shape[1] for p in parts)
        out = {}
        for name in parts[0]._items():
            ts = []
            for p in parts:
                t = getattr(p, name)
                pad = [0, 0] * (t.dim() - 2) + [0, size - t.shape[1]]
                value = float("-inf") if name == "log_prominence" else 0
                ts.append(nn.functional.pad(t, pad, value=value) if t.shape[1] < size else t)
            out[name] = torch.cat(ts)
        return cls(**out)


@dataclass
class StandInImages(_Batch):
    regions: torch.Tensor  # (B, R, d) unit norm, zero padding
    mask: torch.Tensor  # (B, R) bool


@dataclass
class StandInTexts(_Batch):
    words: torch.Tensor  # (C, L, d)
    mask: torch.Tensor  # (C, L)
    log_prominence: torch.Tensor  # (C, L), -inf masked
    token_ids: torch.Tensor  # (C, L)


class StandInTokenizer:
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [VOCAB[i] for i in ids]


class StandInModel(nn.Module):
    """CPFEAN's interface over the concept space; score = sum_l p_l max_r cos(w_l, v_r)."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(len(VOCAB), DIM)
        for i, word in enumerate(VOCAB[2:], start=2):
            table[i, CONCEPTS.index(word) if word in CONCEPTS else DIM - 2] = 1.0
        table[1, DIM - 1] = 1.0
        self.register_buffer("table", table)
        self.register_buffer(
            "logit", torch.tensor([0.0, -1.0] + [2.0 if w in CONCEPTS else -2.0 for w in VOCAB[2:]])
        )
        self.tokenizer = StandInTokenizer()
        self.max_words = 32

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict:
        limit = max_length or self.max_words
        ids = [
            [VOCAB.index(w) if w in VOCAB else 1 for w in t.lower().split()][:limit] for t in texts
        ]
        length = max(1, max(len(i) for i in ids))
        input_ids = torch.zeros(len(texts), length, dtype=torch.long)
        for k, i in enumerate(ids):
            input_ids[k, : len(i)] = torch.tensor(i, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    def encode_images(self, regions) -> StandInImages:
        v = nn.functional.normalize(regions.features.float(), dim=-1) * regions.mask[..., None]
        return StandInImages(regions=v, mask=regions.mask.bool())

    def encode_texts(self, input_ids, attention_mask) -> StandInTexts:
        mask = attention_mask.bool()
        logp = self.logit[input_ids].masked_fill(~mask, float("-inf")).log_softmax(-1)
        return StandInTexts(
            words=self.table[input_ids] * mask[..., None],
            mask=mask,
            log_prominence=logp.masked_fill(~mask, float("-inf")),
            token_ids=input_ids,
        )

    def score(
        self, img, txt, image_chunk: int = 64, text_chunk: int = 128, return_details: bool = False
    ):
        sims = torch.einsum("bri,cli->bclr", img.regions, txt.words)  # (B, C, L, R)
        sims = sims.masked_fill(~img.mask[:, None, None, :], -1.0)
        best, arg = sims.max(-1)  # (B, C, L)
        p = txt.log_prominence.exp().nan_to_num(0.0)[None].expand_as(best)
        scores = (best * p).sum(-1)
        if not return_details:
            return scores
        gates = sims.max(2).values.clamp_min(0)  # (B, C, R)
        return scores, {
            "region_gates": gates,
            "word_weights": p,
            "alignment": arg[..., None],
            "word_scores": best,
        }


def object_feature(
    colour: str, shape: str, size: str | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    f = np.zeros(DIM, np.float32)
    for word in (colour, shape, size):
        if word:
            f[CONCEPTS.index(word)] = 1.0
    if rng is not None:
        f += rng.normal(0, 0.05, DIM).astype(np.float32)
    return f


def make_store(path, scenes: list[list[tuple]], images_root=None, seed: int = 0) -> RegionStore:
    """A region store of 64x64 scenes; scene = [(colour, shape, size), ...] left to right.
    Writes a matching PNG per image under ``images_root`` when given."""
    rng = np.random.default_rng(seed)
    meta = {"feature_dim": DIM, "label_names": SHAPES}
    if images_root is not None:
        meta["images_root"] = str(images_root)
        images_root.mkdir(parents=True, exist_ok=True)
    with RegionWriter(path, meta) as writer:
        for i, objects in enumerate(scenes):
            w = 64 // max(1, len(objects))
            boxes = [[k * w + 2, 16, k * w + w - 2, 48] for k in range(len(objects))]
            feats = [object_feature(c, s, z, rng) for c, s, z in objects]
            labels = [SHAPES.index(s) for _, s, _ in objects]
            writer.put(
                f"{i:03d}.png",
                RegionRecord.from_detections(
                    np.array(feats), np.array(boxes), labels, None, (64, 64)
                ),
            )
            if images_root is not None:
                im = Image.new("RGB", (64, 64), (240, 240, 240))
                draw = ImageDraw.Draw(im)
                for (c, _, _), box in zip(objects, boxes, strict=True):
                    draw.rectangle(box, fill=RGB[c])
                im.save(images_root / f"{i:03d}.png")
    return RegionStore(path)


def random_scenes(n: int, seed: int = 1) -> list[list[tuple]]:
    rng = np.random.default_rng(seed)
    return [
        [
            (COLOURS[rng.integers(4)], SHAPES[rng.integers(4)], SIZES[rng.integers(2)])
            for _ in range(rng.integers(1, 4))
        ]
        for _ in range(n)
    ]


KNOWN = [
    [("red", "ball", None), ("blue", "box", None)],  # 000
    [("green", "cone", None)],  # 001
    [("yellow", "ball", None), ("red", "box", None)],  # 002
    [("blue", "cone", None), ("yellow", "ring", None)],
]  # 003
CKPT = {"path": "standin.pt", "sha256": "a" * 64}


def build(tmp_path, scenes, name="index", **kwargs):
    store = make_store(tmp_path / f"{name}_regions", scenes, tmp_path / f"{name}_images")
    model = StandInModel().eval()
    out = build_index(
        model,
        store,
        tmp_path / name,
        checkpoint=kwargs.pop("checkpoint", CKPT),
        config={},
        images_root=store.meta["images_root"],
        **kwargs,
    )
    return model, store, RetrievalIndex(out.path)


def query(model, text):
    t = model.tokenize([text])
    return model.encode_texts(t["input_ids"], t["attention_mask"])


def test_known_answer_ranking(tmp_path):
    model, _, index = build(
        tmp_path,
        KNOWN,
        captions=["a green cone", "a red ball"],
        caption_image_ids=["001.png", "000.png"],
        shard_size=3,
    )
    assert index.count == 4 and index.image_ids == [f"{i:03d}.png" for i in range(4)]
    for text, best in (
        ("a green cone", "001.png"),
        ("yellow ball", "002.png"),
        ("the blue box", "000.png"),
        ("blue cone and yellow ring", "003.png"),
    ):
        rows, scores, info = search_index(model, index, query(model, text), top_k=4)
        assert index.image_ids[rows[0]] == best, text
        assert info["path"] == "exhaustive" and np.all(np.diff(scores) <= 0)
    assert index.image_path(1).endswith("001.png")
    # image -> captions over the indexed captions
    img = index.images(np.array([1]))
    rows, _, _ = search_index(model, index, img, direction="image2text", top_k=2)
    assert index.captions[rows[0]] == "a green cone"


def test_index_matches_live_scores(tmp_path):
    """float32 index: the same scores as encoding and scoring on the fly."""
    scenes = random_scenes(30)
    model, store, index = build(tmp_path, scenes, dtype="float32", shard_size=7)
    txt = query(model, "large red ball")
    rows, scores, _ = search_index(model, index, txt, top_k=30)
    from cpfean.encode import encode_records

    live = model.score(encode_records(model, [store[i] for i in store.ids()]), txt)[:, 0].numpy()
    np.testing.assert_allclose(scores, live[rows], rtol=1e-6, atol=1e-6)
    assert rows[0] == int(np.argmax(live))
    assert index.boxes.shape == (30, 36, 4) and index.labels.shape == (30, 36)
    assert not index.path.with_name("index.building").exists()
    assert json.loads((index.path / "index.json").read_text())["count"] == 30


def test_mismatched_checkpoint_refused(tmp_path):
    _, _, index = build(tmp_path, KNOWN)
    index.check_checkpoint("standin.pt", "a" * 64)
    with pytest.raises(IndexMismatchError) as err:
        index.check_checkpoint("other.pt", "b" * 64)
    msg = str(err.value)
    assert "standin.pt" in msg and "other.pt" in msg and "aaaaaaaaaaaa" in msg
    assert "bbbbbbbbbbbb" in msg


def test_resume_after_interrupt(tmp_path):
    scenes = random_scenes(20)
    store = make_store(tmp_path / "regions", scenes)
    model = StandInModel().eval()
    calls = {"n": 0}
    original = model.encode_images

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # shards of 5 images, batches of 2: dies inside the 2nd shard
            raise KeyboardInterrupt
        return original(*args)

    model.encode_images = flaky
    with pytest.raises(KeyboardInterrupt):
        build_index(
            model, store, tmp_path / "index", checkpoint=CKPT, config={}, shard_size=5, batch_size=2
        )
    shards = tmp_path / "index.building" / "shards"
    assert sorted(p.name for p in shards.iterdir() if p.is_dir()) == ["00000"]
    assert not (tmp_path / "index" / "index.json").exists()
    logs: list[str] = []
    calls["n"] = -1000
    build_index(
        model,
        store,
        tmp_path / "index",
        checkpoint=CKPT,
        config={},
        shard_size=5,
        batch_size=2,
        log=logs.append,
    )
    assert any("1 of 4 shards already whole" in s for s in logs)
    model.encode_images = original
    fresh = build_index(
        model, store, tmp_path / "fresh", checkpoint=CKPT, config={}, shard_size=5, batch_size=2
    )
    a, b = RetrievalIndex(tmp_path / "index"), RetrievalIndex(fresh.path)
    for name in ("pooled", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.images(slice(None)).regions, b.images(slice(None)).regions)


def test_a_current_index_is_kept_and_a_changed_input_rebuilds_it(tmp_path):
    scenes = random_scenes(12, seed=5)
    model, store, _ = build(tmp_path, scenes)
    args = dict(checkpoint=CKPT, config={}, images_root=store.meta["images_root"])
    encoded = []
    original = model.encode_images
    model.encode_images = lambda regions: encoded.append(len(regions.mask)) or original(regions)
    again = build_index(model, store, tmp_path / "index", **args)
    assert again.up_to_date and encoded == []  # nothing encoded, nothing rewritten
    forced = build_index(model, store, tmp_path / "index", force=True, **args)
    assert not forced.up_to_date and sum(encoded) == 12
    other = build_index(model, store, tmp_path / "index", **{**args, "dtype": "float32"})
    assert not other.up_to_date
    assert json.loads((other.path / "index.json").read_text())["dtype"] == "float32"


def test_two_stage_agrees_with_exhaustive(tmp_path):
    model, _, index = build(tmp_path, random_scenes(120, seed=3), shard_size=50)
    for text in ("large red ball", "small blue cone", "green ring and yellow box"):
        txt = query(model, text)
        ex_rows, ex_scores, _ = search_index(model, index, txt, top_k=10, exhaustive=True)
        all_rows, all_scores, info = search_index(model, index, txt, top_k=10, rerank=120)
        assert info["path"] == "two-stage"
        np.testing.assert_array_equal(all_rows, ex_rows)
        np.testing.assert_allclose(all_scores, ex_scores, rtol=1e-6)
        few_rows, _, _ = search_index(model, index, txt, top_k=10, rerank=40)
        assert first_stage.recall_at(ex_rows, few_rows) >= 0.8, text


def test_first_stage_ivf_and_exhaustive_helpers():
    rng = np.random.default_rng(0)
    pooled = first_stage.normalise(rng.normal(size=(3000, 16)))
    flat = first_stage.FirstStage(pooled, kind="flat")
    ivf = first_stage.FirstStage(pooled, kind="ivf", nlist=16, nprobe=16)  # every list: exact
    q = pooled[7] + 0.1 * rng.normal(size=16)
    _, r_flat = flat.search(q, 20)
    _, r_ivf = ivf.search(q, 20)
    assert r_flat[0, 0] == 7
    np.testing.assert_array_equal(np.sort(r_flat[0]), np.sort(r_ivf[0]))
    score = lambda rows: pooled[rows] @ first_stage.normalise(q[None])[0]
    rows, scores = first_stage.exhaustive(score, 3000, 5, chunk=700)
    np.testing.assert_array_equal(rows, r_flat[0, :5])
    two_rows, _ = first_stage.two_stage(q, flat, score, 5, n_candidates=50)
    np.testing.assert_array_equal(two_rows, rows)


def test_ivf_cache_is_reused(tmp_path):
    pooled = first_stage.normalise(np.random.default_rng(1).normal(size=(2000, 8)))
    cache = tmp_path / "ivf.faiss"
    first = first_stage.FirstStage(pooled, kind="ivf", nlist=8, nprobe=8, cache=cache)
    assert cache.is_file()
    again = first_stage.FirstStage(pooled, kind="ivf", nlist=8, nprobe=8, cache=cache)
    assert not hasattr(again, "_quantiser")  # loaded, not trained
    q = pooled[:3]
    np.testing.assert_array_equal(first.search(q, 5)[1], again.search(q, 5)[1])


def test_an_index_written_before_a_field_was_renamed_still_loads(tmp_path):
    """Indexes name their embedding files by field; gate_ctx became gate_context."""
    from cpfean.model import build_model
    from tests.model.conftest import tiny_config

    torch.manual_seed(0)
    store = make_store(tmp_path / "regions", KNOWN)
    model = build_model(tiny_config(feature_dim=DIM), label_names=SHAPES).eval()
    path = build_index(
        model,
        store,
        tmp_path / "index",
        checkpoint=CKPT,
        config={},
        captions=["a green cone"],
        caption_image_ids=["001.png"],
    )
    path = path.path
    index = RetrievalIndex(path)
    want_img, want_txt = index.images(np.arange(4)), index.caption_embeddings(np.array([0]))
    meta_path = path / "index.json"
    meta = json.loads(meta_path.read_text())
    for side, spec in (("images", meta["image_embeddings"]), ("captions", meta["captions"])):
        spec["fields"] = ["gate_ctx" if f == "gate_context" else f for f in spec["fields"]]
        folder = index.data / side
        (folder / "emb.gate_context.npy").rename(folder / "emb.gate_ctx.npy")
    meta_path.write_text(json.dumps(meta))
    old = RetrievalIndex(path)
    assert torch.equal(old.images(np.arange(4)).gate_context, want_img.gate_context)
    assert torch.equal(old.caption_embeddings(np.array([0])).gate_context, want_txt.gate_context)
    a = search_index(model, index, query(model, "a green cone"), top_k=4)
    b = search_index(model, old, query(model, "a green cone"), top_k=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_preloaded_gallery_gives_the_same_rows(tmp_path):
    """A served index keeps its gallery in memory; every way of asking for rows agrees."""
    _, _, index = build(tmp_path, random_scenes(12), shard_size=5)
    asked = [np.arange(12), np.arange(3, 9), np.array([7, 2, 11]), slice(2, 6), np.array([4])]
    want = [index.images(rows) for rows in asked]
    assert index.preload() and not RetrievalIndex(index.path).preload(max_bytes=10)
    for rows, expected in zip(asked, want, strict=True):
        got = index.images(rows)
        for name in ("regions", "mask"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (rows, name)
