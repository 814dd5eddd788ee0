"""The first stage in Qdrant (the client's local mode, as CI can run it): the collection
mirrors the index, updates follow it, and its MaxSim candidates with the filters are the ones
computed here."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qdrant_client")

from cpfean.data.region_store import RegionStore  # noqa: E402
from cpfean.index import RetrievalIndex, build_index, pooled_texts  # noqa: E402
from cpfean.index.qdrant import EngineError, QdrantStage, folders_of  # noqa: E402
from cpfean.index.reader import query_words  # noqa: E402
from cpfean.search import Searcher  # noqa: E402
from tests.test_index import CKPT, SHAPES, StandInModel, make_store, query, random_scenes  # noqa: E402
from tests.test_index_update import _change_gallery  # noqa: E402

TEXTS = ["large red ball", "small blue box", "green cone", "yellow ring and red box"]


def _maxsim(index: RetrievalIndex, encoded) -> np.ndarray:
    """Prominence-weighted best-region cosine of every image, computed from the index."""
    words, weights = query_words(encoded)
    emb = index.images(np.arange(index.count))
    sims = emb.regions.float().numpy() @ words.T  # [N, R, L]
    sims[~emb.mask.bool().numpy()] = -np.inf
    return sims.max(1) @ weights


def test_collection_mirrors_the_index_and_ranks_by_maxsim(tmp_path):
    store = make_store(tmp_path / "regions", random_scenes(40, seed=2))
    model = StandInModel().eval()
    built = build_index(model, store, tmp_path / "index", checkpoint=CKPT, config={})
    index = RetrievalIndex(built.path)
    stage = QdrantStage(str(tmp_path / "qdrant"), "gallery")
    assert stage.write(index) == {"upserted": 40, "deleted": 0, "kept": 0}
    assert stage.write(index) == {"upserted": 0, "deleted": 0, "kept": 40}
    for text in TEXTS:
        encoded = query(model, text)
        words, weights = query_words(encoded)
        got = stage.candidates(pooled_texts(encoded)[0], words, weights, n=5, widened=40)
        scores = _maxsim(index, encoded)
        best = np.sort(scores)[::-1][:5]
        # the engine's five best by its MaxSim are the five best here (up to float ties)
        np.testing.assert_allclose(scores[[index.image_ids.index(i) for i in got]], best, atol=1e-5)
    # the searcher re-ranks the engine's candidates with CPFEAN: here they are every image,
    # so the answer is the exhaustive one
    searcher = Searcher(model, index, "cpu", engine=stage)
    local = Searcher(model, index, "cpu")
    for text in TEXTS:
        a = searcher.text_to_images(text, 5)
        b = local.text_to_images(text, 5, exhaustive=True)
        assert [r["image_id"] for r in a["results"]] == [r["image_id"] for r in b["results"]]
        assert a["search"]["path"] == "engine"
    # the filters run inside the engine and keep what the local filters keep
    label = SHAPES[int(index.labels[0][0])]
    a = searcher.text_to_images("red ball", 40, label=label)
    b = local.text_to_images("red ball", 40, label=label)
    assert [r["image_id"] for r in a["results"]] == [r["image_id"] for r in b["results"]]
    assert folders_of("a/b/c.jpg") == ["a", "a/b"] and folders_of("c.jpg") == []


def test_an_update_of_the_index_updates_the_collection(tmp_path):
    store = make_store(tmp_path / "regions", random_scenes(40, seed=3))
    model = StandInModel().eval()
    build_index(model, store, tmp_path / "index", checkpoint=CKPT, config={})
    stage = QdrantStage(str(tmp_path / "qdrant"), "gallery")
    stage.write(RetrievalIndex(tmp_path / "index"))
    _change_gallery(tmp_path / "regions", seed=3)
    build_index(
        model, RegionStore(tmp_path / "regions"), tmp_path / "index", checkpoint=CKPT, config={}
    )
    index = RetrievalIndex(tmp_path / "index")
    with pytest.raises(EngineError, match="holds 40 images, the index 41"):
        Searcher(model, index, "cpu", engine=stage)
    assert stage.write(index) == {"upserted": 6, "deleted": 3, "kept": 35}
    searcher = Searcher(model, index, "cpu", engine=stage)
    found = {r["image_id"] for r in searcher.text_to_images("red ball", 41)["results"]}
    assert found == set(index.image_ids)
    with pytest.raises(EngineError, match="no collection 'other'"):
        Searcher(model, index, "cpu", engine=QdrantStage(str(tmp_path / "qdrant2"), "other"))


def test_a_server_that_is_not_there_is_named_as_unreachable(tmp_path):
    """Port 9 on this machine has no listener: the check says the server cannot be reached,
    not that the collection is missing."""
    store = make_store(tmp_path / "regions", random_scenes(6, seed=4))
    build_index(StandInModel().eval(), store, tmp_path / "index", checkpoint=CKPT, config={})
    stage = QdrantStage("http://127.0.0.1:9", "gallery")
    with pytest.raises(EngineError, match=r"cannot reach qdrant at http://127\.0\.0\.1:9: "):
        stage.check(RetrievalIndex(tmp_path / "index"))
    stage.close()
