"""`python -m pipelines.extract`: store contents, bad inputs, resume after kill -9, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2")

from cpfean.data.region_store import RegionStore, RegionStoreError  # noqa: E402
from tests.detector.conftest import SMALL_OPTS  # noqa: E402

pytestmark = pytest.mark.detector
REPO = Path(__file__).resolve().parents[2]
OPTS = SMALL_OPTS[2:]  # the device comes from --device


def _scene(i: int, h: int = 90, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = np.full((h, w, 3), rng.integers(0, 80, 3), np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        img[y : y + 25, x : x + 28] = rng.integers(100, 255, 3)
    return img


def _write_scenes(root: Path, n: int, sub: str = "") -> list[str]:
    (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        rel = f"{sub}/{i:03d}.jpg" if sub else f"{i:03d}.jpg"
        Image.fromarray(_scene(i)).save(root / rel, quality=95)
        ids.append(rel)
    return ids


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A seeded random-init checkpoint, so separate processes run the same detector."""
    from detectron2.modeling import build_model

    from detector.config import get_region_cfg

    torch.manual_seed(0)
    model = build_model(get_region_cfg("scenes_r18_fpn", ["MODEL.DEVICE", "cpu"]))
    path = tmp_path_factory.mktemp("weights") / "random.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _args(images: Path, store: Path, weights: str, *extra: str) -> list[str]:
    return [
        str(images),
        "--out",
        str(store),
        "--config",
        "scenes_r18_fpn",
        "--weights",
        weights,
        "--device",
        "cpu",
        "--workers",
        "0",
        "--threads",
        "1",
        "--no-progress",
        *extra,
        *OPTS,
    ]


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _assert_same_stores(a: Path, b: Path) -> None:
    sa, sb = RegionStore(a), RegionStore(b)
    assert sa.ids() == sb.ids()
    for image_id in sa.ids():
        ra, rb = sa[image_id], sb[image_id]
        assert ra.num_valid == rb.num_valid and ra.image_hw == rb.image_hw
        np.testing.assert_array_equal(ra.labels, rb.labels)
        np.testing.assert_allclose(ra.boxes, rb.boxes, atol=1e-2)
        np.testing.assert_allclose(ra.features, rb.features, rtol=5e-3, atol=5e-3)


def test_extract_folder_then_resume_is_a_no_op(tmp_path, weights, capsys):
    from pipelines.extract import main

    ids = _write_scenes(tmp_path / "imgs", 3) + _write_scenes(tmp_path / "imgs", 2, "sub/dir")
    store = tmp_path / "regions.lmdb"
    assert main(_args(tmp_path / "imgs", store, weights, "--batch-size", "2")) == 0
    s = _summary(capsys)
    assert s["written"] == 5 and s["skipped"] == 0 and s["in_store"] == 5
    rs = RegionStore(store)
    assert rs.ids() == sorted(ids)
    rec = rs["sub/dir/001.jpg"]
    assert rec.features.shape == (36, 1024) and rec.image_hw == (90, 120)
    assert 10 <= rec.num_valid <= 36
    meta = rs.meta
    assert meta["feature_dim"] == 1024 and meta["detector"]["config"] == "scenes_r18_fpn"
    assert meta["thresholds"]["score"] == 0.2 and len(meta["detector"]["weights_sha256"]) == 64
    assert main(_args(tmp_path / "imgs", store, weights)) == 0
    s = _summary(capsys)
    assert s["written"] == 0 and s["already_present"] == 5
    # a different detector must not be mixed into the same store
    assert main(_args(tmp_path / "imgs", store, weights, "REGIONS.NMS_THRESH", "0.5")) == 2


def test_a_rerun_brings_the_store_in_line_with_a_changed_folder(tmp_path, weights, capsys):
    from pipelines.extract import main

    root, store = tmp_path / "imgs", tmp_path / "regions.lmdb"
    _write_scenes(root, 4)
    assert main(_args(root, store, weights)) == 0
    capsys.readouterr()
    before = RegionStore(store)["000.jpg"]
    (root / "001.jpg").unlink()  # deleted
    Image.fromarray(_scene(11)).save(root / "002.jpg", quality=95)  # changed in place
    os.utime(root / "002.jpg", ns=(1_000_000_000, 1_000_000_000))
    for i in (21, 22):  # added
        Image.fromarray(_scene(i)).save(root / f"new{i}.jpg", quality=95)
    assert main(_args(root, store, weights)) == 0
    s = _summary(capsys)
    assert (s["removed"], s["changed"], s["written"], s["already_present"]) == (1, 1, 3, 2)
    assert RegionStore(store).ids() == ["000.jpg", "002.jpg", "003.jpg", "new21.jpg", "new22.jpg"]
    np.testing.assert_array_equal(RegionStore(store)["000.jpg"].features, before.features)
    fresh = tmp_path / "fresh.lmdb"  # what extracting the folder as it is now gives
    assert main(_args(root, fresh, weights)) == 0
    capsys.readouterr()
    _assert_same_stores(store, fresh)
    sources = RegionStore(store).sources()
    assert sources["002.jpg"]["mtime_ns"] == 1_000_000_000
    assert sources["002.jpg"]["size"] == (root / "002.jpg").stat().st_size
    # nothing changed since: a no-op
    assert main(_args(root, store, weights)) == 0
    s = _summary(capsys)
    assert (s["removed"], s["changed"], s["written"]) == (0, 0, 0)
    # a store of another folder is refused, not emptied
    other = tmp_path / "other"
    _write_scenes(other, 2, "elsewhere")
    assert main(_args(other, store, weights)) == 2
    assert "holds none of the 2 images" in capsys.readouterr().err
    assert len(RegionStore(store)) == 5


def test_bad_inputs_are_converted_or_skipped_with_reasons(tmp_path, weights, capsys):
    from pipelines.extract import main

    root = tmp_path / "imgs"
    good = _write_scenes(root, 1)
    rgb = _scene(7)
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(root / "gray.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(root / "rgba.png")
    cv2.imwrite(str(root / "deep16.png"), rgb.astype(np.uint16) * 257)
    converted = good + ["cmyk.jpg", "deep16.png", "gray.png", "palette.png", "rgba.png"]
    (root / "zero.jpg").write_bytes(b"")
    (root / "notes.JPG").write_text("not an image at all\n")
    Image.fromarray(_scene(8, 120, 150)).save(root / "cut.jpg")
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:1500])
    Image.fromarray(_scene(9, 150, 160)).save(root / "huge.png")  # 24000 px > cap below
    skipped = {
        "zero.jpg": "empty",
        "notes.JPG": "not an image",
        "cut.jpg": "truncated",
        "huge.png": "too large",
    }
    store = tmp_path / "regions.lmdb"
    code = main(
        _args(root, store, weights, "--batch-size", "3", "REGIONS.MAX_IMAGE_PIXELS", "20000")
    )
    assert code == 3
    s = _summary(capsys)
    assert s["skipped"] == 4 and s["written"] == len(converted)
    assert RegionStore(store).ids() == sorted(converted)
    report = [
        json.loads(line)
        for line in (tmp_path / "regions.lmdb.skipped.jsonl").read_text().splitlines()
    ]
    assert {r["image_id"] for r in report} == set(skipped)
    for r in report:
        assert skipped[r["image_id"]] in r["reason"] and r["path"].endswith(r["image_id"])
    assert RegionStore(store)["gray.png"].image_hw == (90, 120)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")


def _count(store: Path) -> int:
    """Records committed so far (0 while the writer has not committed its meta yet)."""
    try:
        return len(RegionStore(store))
    except (FileNotFoundError, RegionStoreError):
        return 0


@pytest.mark.slow
def test_resume_after_kill_9_loses_and_duplicates_nothing(tmp_path, weights, capsys):
    from pipelines.extract import main

    ids = _write_scenes(tmp_path / "imgs", 24)
    store = tmp_path / "crash.lmdb"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.extract",
        *_args(tmp_path / "imgs", store, weights, "--batch-size", "1", "--commit-every", "1"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if _count(store) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = RegionStore(store).ids()
    assert 3 <= len(partial) < len(ids)
    assert main(_args(tmp_path / "imgs", store, weights, "--batch-size", "4")) == 0
    s = _summary(capsys)
    assert s["already_present"] == len(partial) and s["written"] == len(ids) - len(partial)
    assert RegionStore(store).ids() == ids
    clean = tmp_path / "clean.lmdb"
    assert main(_args(tmp_path / "imgs", clean, weights, "--batch-size", "4")) == 0
    _assert_same_stores(store, clean)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path, weights, capsys):
    from pipelines.extract import main

    ids = _write_scenes(tmp_path / "imgs", 5) + _write_scenes(tmp_path / "imgs", 2, "b")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"")
    single = tmp_path / "single.lmdb"
    assert main(_args(tmp_path / "imgs", single, weights, "--batch-size", "2")) == 3
    dist_store = tmp_path / "dist.lmdb"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pipelines.extract",
        *_args(tmp_path / "imgs", dist_store, weights, "--batch-size", "2"),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["in_store"] == len(ids) and summary["skipped"] == 1
    assert RegionStore(dist_store).ids() == sorted(ids)
    _assert_same_stores(dist_store, single)
    assert not list(tmp_path.glob("dist.lmdb.rank*"))  # per-rank stores merged and removed
    report = (tmp_path / "dist.lmdb.skipped.jsonl").read_text().splitlines()
    assert [json.loads(r)["image_id"] for r in report] == ["bad.png"]


def test_the_region_count_is_a_setting_the_store_records(tmp_path, weights, capsys):
    """REGIONS.MIN_REGIONS = MAX_REGIONS = R keeps exactly R regions (the small detector makes
    60 proposals); the store's records and meta hold R slots, and another R is refused."""
    from pipelines.extract import main

    _write_scenes(tmp_path / "imgs", 2)
    for r in (12, 50):
        store = tmp_path / f"r{r}"
        fixed = ("REGIONS.MAX_REGIONS", str(r), "REGIONS.MIN_REGIONS", str(r))
        assert main(_args(tmp_path / "imgs", store, weights, *fixed)) == 0
        rs = RegionStore(store)
        assert rs.meta["num_regions"] == rs.meta["thresholds"]["max_regions"] == r
        for image_id in rs.ids():
            rec = rs[image_id]
            assert rec.features.shape == (r, 1024) and rec.num_valid == r
    capsys.readouterr()
    twelve, fifty = RegionStore(tmp_path / "r12"), RegionStore(tmp_path / "r50")
    for image_id in twelve.ids():  # the same ranking: 12 slots are the first 12 of 50
        np.testing.assert_array_equal(twelve[image_id].boxes, fifty[image_id].boxes[:12])
    assert main(_args(tmp_path / "imgs", tmp_path / "r12", weights)) == 2  # 36 into a 12 store
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "num_regions" in err[0]
