"""Updating an index after its gallery changed: only new and changed images encoded, the
result equal to a full rebuild, and a kill at any moment leaving the old index or the new one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cpfean.data.region_store import RegionStore, RegionWriter
from cpfean.index import RetrievalIndex, build_index, search_index
from tests.test_index import CKPT, StandInModel, make_store, query, random_scenes

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = int(os.environ.get("CPFEAN_KILL_SEED", "0"))
QUERIES = ["large red ball", "small blue box", "green cone", "yellow ring and red box"]


def _answers(model, index: RetrievalIndex) -> list[tuple[list[str], np.ndarray]]:
    out = []
    for text in QUERIES:
        rows, scores, _ = search_index(model, index, query(model, text), top_k=10)
        out.append(([index.image_ids[r] for r in rows], scores))
    return out


def _assert_same_answers(model, a: RetrievalIndex, b: RetrievalIndex) -> None:
    for (ids_a, scores_a), (ids_b, scores_b) in zip(
        _answers(model, a), _answers(model, b), strict=True
    ):
        assert ids_a == ids_b
        np.testing.assert_allclose(scores_a, scores_b, rtol=1e-5, atol=1e-5)


def _change_gallery(store_path: Path, seed: int) -> None:
    """Delete 3 images, change 2 (new regions under the same id), add 4."""
    store = RegionStore(store_path)
    ids = store.ids()
    donors = make_store(store_path.with_name("donors"), random_scenes(6, seed=seed + 50))
    with RegionWriter(store_path, store.meta) as writer:
        writer.delete([ids[1], ids[7], ids[20]])
        writer.delete([ids[3], ids[11]])
        writer.put(ids[3], donors["000.png"])
        writer.put(ids[11], donors["001.png"])
        for k in range(4):
            writer.put(f"new/{k}.png", donors[f"{k + 2:03d}.png"])
    shutil.rmtree(store_path.with_name("donors"))


@pytest.mark.parametrize("codec", [None, "SQ8"])
def test_an_update_encodes_only_what_changed_and_answers_as_a_rebuild(tmp_path, codec):
    store = make_store(tmp_path / "regions", random_scenes(40, seed=3))
    model = StandInModel().eval()
    encoded: list[int] = []
    original = model.encode_images
    model.encode_images = lambda regions: encoded.append(len(regions.mask)) or original(regions)
    args = dict(checkpoint=CKPT, config={}, shard_size=8, batch_size=4, codec=codec)
    first = build_index(model, store, tmp_path / "index", **args)
    assert (first.encoded, first.removed, first.kept) == (40, 0, 0)
    old = RetrievalIndex(tmp_path / "index")
    old_codes = old.images(np.arange(40)).regions if codec else None
    _change_gallery(tmp_path / "regions", seed=3)
    store = RegionStore(tmp_path / "regions")
    encoded.clear()
    update = build_index(model, store, tmp_path / "index", **args)
    assert (update.encoded, update.removed, update.kept) == (6, 3, 35)
    assert sum(encoded) == 6  # a codec is not fitted again: its codes stay valid
    new = RetrievalIndex(tmp_path / "index")
    assert new.image_ids == store.ids() and new.meta["generation"] == "gen-000002"
    if codec is None:
        rebuilt = build_index(model, store, tmp_path / "rebuilt", **args)
        _assert_same_answers(model, new, RetrievalIndex(rebuilt.path))
    else:
        # every row is what this index's codec makes of the exact regions
        exact = build_index(
            model, store, tmp_path / "exact", **{**args, "codec": None, "dtype": "float32"}
        )
        want = RetrievalIndex(exact.path).images(np.arange(new.count))
        got = new.images(np.arange(new.count))
        mask = want.mask.numpy()
        round_trip = new.codec.decode(new.codec.encode(want.regions.float().numpy()[mask]))
        np.testing.assert_allclose(got.regions.float().numpy()[mask], round_trip, atol=1e-6)
        np.testing.assert_array_equal(got.mask.numpy(), mask)
        kept = [new.image_ids.index(i) for i in old.image_ids[:1]]  # 000.png, unchanged
        np.testing.assert_array_equal(got.regions[kept].numpy(), old_codes[:1].numpy())
    # the generation it replaced stays (a server may still answer from it); older ones go
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "gen-000001",
        "gen-000002",
        "index.json",
    ]
    assert build_index(model, store, tmp_path / "index", **args).up_to_date
    with RegionWriter(tmp_path / "regions", store.meta) as writer:
        writer.delete(["new/0.png"])
    third = build_index(model, RegionStore(tmp_path / "regions"), tmp_path / "index", **args)
    assert (third.encoded, third.removed, third.kept) == (0, 1, 40)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "gen-000002",
        "gen-000003",
        "index.json",
    ]
    assert "new/0.png" not in RetrievalIndex(tmp_path / "index").image_ids


def test_an_index_from_before_generations_is_updated_by_a_full_build(tmp_path):
    store = make_store(tmp_path / "regions", random_scenes(10, seed=4))
    model = StandInModel().eval()
    args = dict(checkpoint=CKPT, config={})
    build_index(model, store, tmp_path / "index", **args)
    # the layout written before generations: arrays beside index.json, no digests
    index = tmp_path / "index"
    meta = json.loads((index / "index.json").read_text())
    generation = meta.pop("generation")
    shutil.move(index / generation / "images", index / "images")
    (index / "images" / "digests.npy").unlink()
    (index / generation).rmdir()
    (index / "index.json").write_text(json.dumps(meta))
    with RegionWriter(tmp_path / "regions", store.meta) as writer:
        writer.delete(["004.png"])
    store = RegionStore(tmp_path / "regions")
    built = build_index(model, store, index, **args)
    assert (built.encoded, built.removed, built.kept) == (9, 1, 0)
    assert sorted(p.name for p in index.iterdir()) == ["gen-000001", "images", "index.json"]
    rebuilt = build_index(model, store, tmp_path / "rebuilt", **args)
    _assert_same_answers(model, RetrievalIndex(index), RetrievalIndex(rebuilt.path))
    # the next build drops the arrays from before generations
    with RegionWriter(tmp_path / "regions", store.meta) as writer:
        writer.delete(["005.png"])
    build_index(model, RegionStore(tmp_path / "regions"), index, **args)
    assert sorted(p.name for p in index.iterdir()) == ["gen-000001", "gen-000002", "index.json"]


CHILD = """
import sys
import threading
from cpfean.data.region_store import RegionStore
from cpfean.index import build_index
from tests.test_index import CKPT, StandInModel

model = StandInModel().eval()
build_index(model, RegionStore(sys.argv[1]), sys.argv[2], checkpoint=CKPT, config={},
            shard_size=64, batch_size=16)
"""


def _spawn(store: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_an_update_killed_at_any_moment_leaves_the_old_index_or_the_new(tmp_path):
    """kill -9 at seeded moments of an update (CPFEAN_KILL_SEED replays one): the index then
    answers as the old one or as the new one, and a re-run finishes the update."""
    rng = np.random.default_rng(KILL_SEED)
    store_path = tmp_path / "regions"
    make_store(store_path, random_scenes(1500, seed=8))
    model = StandInModel().eval()
    args = dict(checkpoint=CKPT, config={}, shard_size=64, batch_size=16)
    build_index(model, RegionStore(store_path), tmp_path / "old", **args)
    old = _answers(model, RetrievalIndex(tmp_path / "old"))
    _change_gallery(store_path, seed=8)
    build_index(model, RegionStore(store_path), tmp_path / "new", **args)
    new = _answers(model, RetrievalIndex(tmp_path / "new"))
    # how long an update runs once its first generation folder appears
    shutil.copytree(tmp_path / "old", tmp_path / "index")
    child, start = _spawn(store_path, tmp_path / "index"), None
    while child.poll() is None:
        if start is None and (tmp_path / "index" / "gen-000002").exists():
            start = time.perf_counter()
        time.sleep(0.005)
    assert child.returncode == 0, child.stderr.read().decode()
    span = time.perf_counter() - (start or time.perf_counter())
    outcomes = set()
    for attempt in range(4):
        shutil.rmtree(tmp_path / "index")
        shutil.rmtree(tmp_path / "index.building", ignore_errors=True)
        shutil.copytree(tmp_path / "old", tmp_path / "index")
        child = _spawn(store_path, tmp_path / "index")
        while child.poll() is None and not (tmp_path / "index" / "gen-000002").exists():
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, span * 1.2)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        got = _answers(model, RetrievalIndex(tmp_path / "index"))
        same_as = [name for name, want in (("old", old), ("new", new)) if _same(got, want)]
        assert same_as, (KILL_SEED, attempt)
        outcomes.add(same_as[0])
        finished = _spawn(store_path, tmp_path / "index")
        assert finished.wait() == 0, finished.stderr.read().decode()
        assert _same(_answers(model, RetrievalIndex(tmp_path / "index")), new), KILL_SEED


def _same(a, b) -> bool:
    return all(
        ids_a == ids_b and np.allclose(s_a, s_b, rtol=1e-5, atol=1e-5)
        for (ids_a, s_a), (ids_b, s_b) in zip(a, b, strict=True)
    )


def test_a_server_picks_up_an_update_without_failing_a_request(tmp_path):
    from fastapi.testclient import TestClient

    from cpfean.search import Searcher
    from pipelines.web.app import create_app

    store = make_store(tmp_path / "regions", random_scenes(40, seed=6))
    model = StandInModel().eval()
    args = dict(checkpoint=CKPT, config={})
    build_index(model, store, tmp_path / "index", **args)
    searcher = Searcher(model, RetrievalIndex(tmp_path / "index"), "cpu")
    app = create_app(searcher, reload_every=0.05)
    statuses: list[int] = []
    stop = threading.Event()
    with TestClient(app, raise_server_exceptions=False) as client:

        def hammer() -> None:
            while not stop.is_set():
                for path in ("/api/search?q=red+ball&k=5", "/api/similar/000.png", "/healthz"):
                    statuses.append(client.get(path).status_code)

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            time.sleep(0.3)
            _change_gallery(tmp_path / "regions", seed=6)
            build_index(model, RegionStore(tmp_path / "regions"), tmp_path / "index", **args)
            deadline = time.monotonic() + 20
            while client.get("/healthz").json()["generation"] != "gen-000002":
                assert time.monotonic() < deadline, "the update was not picked up"
                time.sleep(0.05)
            time.sleep(0.3)  # requests go on against the new index
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        health = client.get("/healthz").json()
        assert health["images"] == 41
        assert client.get("/api/similar/new/0.png").status_code == 200
        # an index that cannot be loaded is logged; the one loaded keeps serving
        (tmp_path / "index" / "index.json").write_text("{not json")
        time.sleep(0.3)
        assert client.get("/api/search", params={"q": "red ball"}).status_code == 200
        assert client.get("/healthz").json()["generation"] == "gen-000002"
