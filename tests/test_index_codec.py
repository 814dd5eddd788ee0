"""Compressed region embeddings in the index (cpfean.index.codec), with the stand-in model of
test_index (a transparent score over a 12-dimensional concept space)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpfean import first_stage
from cpfean.index import RetrievalIndex, build_index, search_index
from cpfean.index.codec import CodecError, RegionCodec, gather_ragged
from tests.test_index import CKPT, StandInModel, build, make_store, query, random_scenes

TEXTS = ("large red ball", "small blue cone", "green ring and yellow box", "a yellow ball")


def test_gather_ragged_reads_each_image_rows_in_the_order_asked():
    array = np.arange(10)[:, None] * 10  # image 0: rows 0-2, image 1: none, image 2: 3-9
    offsets = np.array([0, 3, 3, 10])
    got = gather_ragged(array, offsets, np.array([2, 0, 1]))
    assert got[:, 0].tolist() == [30, 40, 50, 60, 70, 80, 90, 0, 10, 20]
    assert gather_ragged(array, offsets, np.array([1])).shape == (0, 1)


def test_codec_round_trip_is_close_and_survives_serialising():
    rng = np.random.default_rng(0)
    x = first_stage.normalise(rng.normal(size=(2000, 32)))
    codec = RegionCodec.fit("SQ8", x)
    again = RegionCodec.from_bytes(codec.to_bytes(), "SQ8")
    codes = codec.encode(x)
    assert codes.shape == (2000, 32) and codes.dtype == np.uint8
    np.testing.assert_array_equal(again.encode(x), codes)
    y = again.decode(codes)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    assert (x * y).sum(1).min() > 0.999  # 8 bits a dimension
    coarse = RegionCodec.fit("SQ4", x).decode(RegionCodec.fit("SQ4", x).encode(x))
    assert 0.95 < (x * coarse).sum(1).mean() < (x * y).sum(1).mean()


def test_a_name_faiss_does_not_know_is_refused_naming_it():
    with pytest.raises(CodecError, match="'SQ3x'"):
        RegionCodec.fit("SQ3x", np.ones((10, 8), np.float32))


def test_compressed_index_ranks_as_the_exact_one(tmp_path):
    scenes = random_scenes(80, seed=5)
    # float16, as the exact copy: the same values, so the same ranking
    model, store, exact = build(tmp_path, scenes, name="exact", shard_size=30)
    _, _, packed = build(
        tmp_path, scenes, name="packed", codec="SQ8", exact_copy=True, shard_size=30
    )
    meta = json.loads((packed.path / "index.json").read_text())
    assert meta["version"] == 2 and meta["image_embeddings"]["codec"]["factory"] == "SQ8"
    valid = int(np.asarray(exact.images(slice(None)).mask).sum())
    assert np.load(RetrievalIndex(packed.path).data / "images" / "codes.npy").shape == (valid, 12)
    rows = np.array([7, 0, 63, 21])  # any order, as an explanation asks
    a, b, c = exact.images(rows), packed.images(rows), packed.images(rows, exact=True)
    assert (a.mask == b.mask).all()
    assert 0 < float((a.regions - b.regions).abs().max()) < 0.02
    np.testing.assert_array_equal(c.regions.numpy(), a.regions.numpy())
    for text in TEXTS:
        txt = query(model, text)
        want, want_scores, _ = search_index(model, exact, txt, top_k=5)
        got, got_scores, info = search_index(model, packed, txt, top_k=5)
        assert info["exact_rerank"] == 50
        np.testing.assert_array_equal(got, want)  # the last re-rank reads the exact copy
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)


def test_compressed_index_without_exact_copy_and_preloaded(tmp_path):
    scenes = random_scenes(60, seed=6)
    model, _, exact = build(tmp_path, scenes, name="exact", dtype="float32")
    _, _, packed = build(tmp_path, scenes, name="packed", codec="SQ8")
    assert not packed.exact_copy
    for text in TEXTS:
        txt = query(model, text)
        want, _, _ = search_index(model, exact, txt, top_k=10)
        got, scores, info = search_index(model, packed, txt, top_k=10)
        assert "exact_rerank" not in info
        assert first_stage.recall_at(want, got) >= 0.9, text
        assert packed.preload()
        again, again_scores, _ = search_index(model, packed, txt, top_k=10)
        np.testing.assert_array_equal(again, got)
        np.testing.assert_allclose(again_scores, scores, rtol=1e-6)
        packed = RetrievalIndex(packed.path)


def test_the_codec_is_part_of_the_build_key(tmp_path):
    scenes = random_scenes(20, seed=7)
    store = make_store(tmp_path / "regions", scenes)
    model = StandInModel().eval()

    def build_with(**kw):
        return build_index(model, store, tmp_path / "index", checkpoint=CKPT, config={}, **kw)

    assert not build_with(codec="SQ8").up_to_date
    assert build_with(codec="SQ8").up_to_date
    assert not build_with(codec="SQ4").up_to_date
    assert not build_with().up_to_date
    assert build_with().up_to_date
    with pytest.raises(ValueError, match="needs a codec"):
        build_with(exact_copy=True)
    with pytest.raises(CodecError, match="'PQ99x'"):
        build_with(codec="PQ99x", force=True)
    assert RetrievalIndex(tmp_path / "index").codec is None  # the failed build left it as it was


def test_fp16_first_stage_finds_what_the_float32_one_finds():
    rng = np.random.default_rng(2)
    pooled = rng.normal(size=(3000, 64)).astype(np.float32)
    queries = pooled[:20] + rng.normal(0, 0.5, (20, 64)).astype(np.float32)
    flat = first_stage.FirstStage(pooled, kind="flat")
    half = first_stage.FirstStage(pooled.astype(np.float16), kind="auto")
    assert half.kind == "fp16"
    s_flat, r_flat = flat.search(queries, 50)
    s_half, r_half = half.search(queries, 50)
    assert (
        np.mean([first_stage.recall_at(a, b) for a, b in zip(r_flat, r_half, strict=True)]) >= 0.99
    )
    np.testing.assert_allclose(s_half[:, 0], s_flat[:, 0], atol=2e-3)


def test_filters_apply_before_the_top_k(tmp_path):
    """A label or folder filter keeps k results whenever k images pass it, on the exhaustive
    and the two-stage path alike, and returns only images that pass it."""
    from tests.test_index import SHAPES

    scenes = random_scenes(90, seed=8)
    model, _, index = build(tmp_path, scenes, name="filtered")
    cone = SHAPES.index("cone")
    with_cone = index.rows_with_label(cone)
    want = [r for r, objs in enumerate(scenes) if any(s == "cone" for _, s, _ in objs)]
    assert with_cone.tolist() == want and 10 < len(want) < 90
    txt = query(model, "large red ball")  # a query that cones do not answer first
    unfiltered, _, _ = search_index(model, index, txt, top_k=10)
    assert not set(unfiltered.tolist()) <= set(want)
    for kw in ({}, {"rerank": 15}):
        rows, scores, info = search_index(model, index, txt, top_k=10, within=with_cone, **kw)
        assert len(rows) == 10 and set(rows.tolist()) <= set(want), kw
        assert info["filtered"] == len(want) and np.all(np.diff(scores) <= 0)
        exact, _, _ = search_index(model, index, txt, top_k=10, within=with_cone, exhaustive=True)
        if not kw:
            np.testing.assert_array_equal(rows, exact)
    assert index.rows_under("nowhere").tolist() == []
    rows, _, info = search_index(model, index, txt, top_k=10, within=np.empty(0, np.int64))
    assert len(rows) == 0 and info["filtered"] == 0


def test_searcher_filters_by_label_and_folder(tmp_path):
    import torch

    from cpfean.search import QueryError, Searcher

    scenes = random_scenes(60, seed=9)
    model, _, index = build(tmp_path, scenes, name="folders")
    index.image_ids = [
        f"{'cats' if r % 3 else 'dogs/old'}/{i}" for r, i in enumerate(index.image_ids)
    ]
    searcher = Searcher(model, index, torch.device("cpu"))
    answer = searcher.text_to_images("small blue box", 5, label="Ring", under="./dogs/")
    ids = [r["image_id"] for r in answer["results"]]
    rings = {r for r, objs in enumerate(scenes) if any(s == "ring" for _, s, _ in objs)}
    passing = [r for r in range(60) if r % 3 == 0 and r in rings]
    assert len(ids) == min(5, len(passing)) > 0
    assert all(i.startswith("dogs/old/") for i in ids)
    assert {r["row"] for r in answer["results"]} <= set(passing)
    assert answer["search"]["filtered"] == len(passing)
    with pytest.raises(QueryError, match="no detected label 'dog'.*ball, box, cone, ring"):
        searcher.text_to_images("a ball", 5, label="dog")
    with pytest.raises(QueryError, match="under folder 'birds'"):
        searcher.text_to_images("a ball", 5, under="birds")


def test_maxsim_pass_is_the_late_interaction_score_of_the_decoded_regions(tmp_path):
    """The stand-in's score is exactly prominence x best region cosine, so the MaxSim pass of
    a compressed index equals it on the decoded regions; the two-stage path goes through it."""
    model, _, packed = build(tmp_path, random_scenes(70, seed=10), name="packed", codec="SQ8")
    rows = np.array([0, 3, 4, 41, 69])
    for text in TEXTS:
        txt = query(model, text)
        want = model.score(packed.images(rows), txt)[:, 0].numpy()
        linear, packed._linear = packed._linear, None  # decoded, scaled to unit norm
        np.testing.assert_allclose(packed.maxsim(rows, txt), want, rtol=1e-5, atol=1e-5)
        packed._linear = linear  # SQ8's linear form: the same products on the codes, unnormalised
        assert linear is not None
        np.testing.assert_allclose(packed.maxsim(rows, txt), want, atol=3e-3)
        got, _, info = search_index(model, packed, txt, top_k=5, rerank=8)
        assert info["maxsim"] == 48 and info["candidates"] == 8
        exhaustive, _, _ = search_index(model, packed, txt, top_k=5, exhaustive=True)
        assert first_stage.recall_at(exhaustive, got) >= 0.8, text
