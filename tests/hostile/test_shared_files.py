"""Files from strangers, against the real commands on the quick demo's output: nothing shared
runs code, and nothing the user had is lost or replaced.

Every case asserts the exit status, one ``error:`` line naming the thing, no traceback, and that
nothing the user had was changed. Payloads that would run code create a marker file if they
ran.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpfean.data.region_store import RegionRecord, RegionStore, RegionWriter
from cpfean.images import BadImage, decode_image
from tests.hostile.helpers import (
    REPO,
    digest,
    env,
    extract_args,
    one_error,
    run,
)

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.slow, pytest.mark.detector]


# --------------------------------------------------------------------- nothing shared runs code
EVIL_YAML = "MODEL:\n  DEVICE: !!python/object/apply:os.system ['touch {marker}']\n"


def test_detector_config_with_a_python_tag_is_refused(demo, capsys):
    marker = demo["tmp"] / "PWNED"
    evil = demo["tmp"] / "evil.yaml"
    evil.write_text(EVIL_YAML.format(marker=marker))
    store = demo["tmp"] / "store"
    code, _, err = run(capsys, "extract", *extract_args(demo, store)[:3], "--config", evil)
    one_error(code, err, "evil.yaml", "Python tag")
    assert not marker.exists() and not store.exists()


@pytest.mark.parametrize(
    "base", ["http://example.invalid/base.yaml", "~/base.yaml", "nowhere.yaml"]
)
def test_detector_config_base_is_local_or_bundled_only(demo, capsys, base):
    cfg = demo["tmp"] / "child.yaml"
    cfg.write_text(f"_BASE_: {base}\nMODEL:\n  DEVICE: cpu\n")
    code, _, err = run(
        capsys, "extract", demo["images"], "--out", demo["tmp"] / "s", "--config", cfg
    )
    one_error(code, err, "_BASE_")
    assert not (demo["tmp"] / "s").exists()


def test_detector_config_base_names_a_bundled_config(tmp_path):
    from detector.config import get_region_cfg

    cfg = tmp_path / "child.yaml"
    cfg.write_text("_BASE_: scenes_r18_fpn.yaml\nREGIONS:\n  NUM_REGIONS: 20\n")
    got = get_region_cfg(cfg, ["MODEL.DEVICE", "cpu"])
    # NUM_REGIONS, the former name of MAX_REGIONS, still sets it
    assert got.REGIONS.MAX_REGIONS == 20 and got.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"


def test_downloaded_index_with_an_evil_detector_config_runs_nothing(demo, capsys):
    marker = demo["tmp"] / "PWNED"
    (demo["det"] / "config.yaml").write_text(EVIL_YAML.format(marker=marker))
    image = sorted(demo["images"].iterdir())[0]
    code, out, err = run(capsys, "retrieve", "--image", image, "--index", demo["index"])
    one_error(code, err, "Python tag")
    assert not marker.exists() and out == ""


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Payload(marker)}, "__author__": "stranger"}, f)
    return path


def test_pickled_detector_weights_are_refused(demo, capsys):
    marker = demo["tmp"] / "PWNED"
    evil = _evil_pickle(demo["tmp"] / "weights.pkl", marker)
    store = demo["tmp"] / "store"
    argv = extract_args(demo, store)
    argv[argv.index("--weights") + 1] = str(evil)
    code, _, err = run(capsys, "extract", *argv)
    one_error(code, err, "weights.pkl", "convert_weights")
    assert not marker.exists() and not store.exists()


def test_pth_holding_code_is_refused(demo, capsys):
    marker = demo["tmp"] / "PWNED"
    evil = demo["tmp"] / "weights.pth"
    torch.save({"model": {"w": _Payload(marker)}}, evil)
    store = demo["tmp"] / "store"
    argv = extract_args(demo, store)
    argv[argv.index("--weights") + 1] = str(evil)
    code, _, err = run(capsys, "extract", *argv)
    one_error(code, err, "weights.pth")
    assert not marker.exists() and not store.exists()


def test_convert_weights_refuses_code_and_converts_arrays(demo, capsys):
    marker = demo["tmp"] / "PWNED"
    evil = _evil_pickle(demo["tmp"] / "evil.pkl", marker)
    code, _, err = run(capsys, "convert_weights", evil)
    one_error(code, err, "evil.pkl", "system")
    assert not marker.exists() and not evil.with_suffix(".pth").exists()

    # the demo detector as a Detectron2 model-zoo pickle of numpy arrays, as BUTD ships
    state = torch.load(demo["det"] / "model_final.pth", weights_only=True)["model"]
    good = demo["tmp"] / "zoo.pkl"
    with open(good, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "zoo"}, f)
    code, out, err = run(capsys, "convert_weights", good, "--sha256", "0" * 64)
    one_error(code, err, "expected")
    code, out, err = run(capsys, "convert_weights", good)
    assert code == 0, err
    report = json.loads(out)
    converted = torch.load(report["output"], weights_only=True)
    assert set(converted["model"]) == set(state)
    assert all(torch.equal(converted["model"][k], state[k]) for k in state)
    code, _, err = run(capsys, "convert_weights", good)  # never overwrites
    one_error(code, err, "exists")

    # and the converted file extracts exactly like the original
    a, b = demo["tmp"] / "a", demo["tmp"] / "b"
    assert run(capsys, "extract", *extract_args(demo, a))[0] == 0
    argv = extract_args(demo, b)
    argv[argv.index("--weights") + 1] = report["output"]
    assert run(capsys, "extract", *argv)[0] == 0
    sa, sb = RegionStore(a), RegionStore(b)
    assert sa.ids() == sb.ids()
    for i in sa.ids()[:5]:
        np.testing.assert_array_equal(sa[i].features, sb[i].features)


def test_pillow_opens_only_listed_formats(tmp_path):
    marker = tmp_path / "PWNED"
    eps = tmp_path / "photo.jpg"  # PostScript would reach Ghostscript through Pillow's EPS
    eps.write_text(
        f"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
        f"({marker}) (w) file closefile\nshowpage\n"
    )
    with pytest.raises(BadImage, match="not an image"):
        decode_image(eps)
    gif = tmp_path / "anim.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(gif, format="GIF")
    with pytest.raises(BadImage, match="not an image"):
        decode_image(gif)
    assert not marker.exists()
    ok = tmp_path / "ok.webp"
    Image.new("RGB", (8, 6), (0, 0, 255)).save(ok, format="WEBP")
    assert decode_image(ok).shape == (6, 8, 3)


def test_exif_orientation_is_applied_for_queries(tmp_path):
    from pipelines.retrieve import read_image

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)  # red strip on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(wide).save(path, exif=exif, quality=95)
    bgr = read_image(str(path))
    assert bgr.shape == (40, 20, 3)  # upright: portrait
    assert bgr[:10, :, 2].mean() > 200 and bgr[-10:, :, 2].mean() < 50  # red now on top


# --------------------------------------------------------------------------- nothing is lost
def test_index_out_never_replaces_a_folder_it_did_not_write(demo, capsys):
    mine = demo["tmp"] / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("six months of work")
    before = digest(mine)
    code, _, err = run(capsys, "index", "--checkpoint", demo["ckpt"], "--out", mine, "--quiet")
    one_error(code, err, "not a cpfean index", "thesis.tex")
    assert digest(mine) == before
    # a file beside our own files in an index folder is foreign too
    (demo["index"] / "notes.txt").write_text("mine")
    before = digest(demo["index"])
    code, _, err = run(
        capsys, "index", "--checkpoint", demo["ckpt"], "--out", demo["index"], "--force", "--quiet"
    )
    one_error(code, err, "notes.txt")
    assert digest(demo["index"]) == before


def test_stale_index_is_rebuilt(demo, capsys):
    base = [
        "--checkpoint",
        demo["ckpt"],
        "--regions",
        demo["regions"],
        "--captions",
        demo["captions"],
        "--out",
        demo["index"],
        "--quiet",
    ]
    code, out, _ = run(capsys, "index", *base, "--split", "test")
    assert code == 0 and "up to date" in out
    for changed in (["--split", "val"], ["--split", "val", "--dtype", "float32"]):
        code, out, err = run(capsys, "index", *base, *changed)
        assert code == 0 and "up to date" not in out, err
    meta = json.loads((demo["index"] / "index.json").read_text())
    assert meta["dtype"] == "float32"
    # a store re-extracted with the same ids is new content
    shutil.rmtree(demo["regions"])
    assert run(capsys, "extract", *extract_args(demo, demo["regions"]))[0] == 0
    code, out, _ = run(capsys, "index", *base, "--split", "val", "--dtype", "float32")
    assert code == 0 and "up to date" not in out


def _hold(kind: str, path: Path) -> subprocess.Popen:
    """Another process holding a store's writer (or an index lock) until killed."""
    code = {
        "store": (
            "from cpfean.data.region_store import RegionWriter, RegionStore\n"
            f"w = RegionWriter({str(path)!r}, RegionStore({str(path)!r}).meta)\n"
        ),
        "index": (
            "from cpfean.fileio import WriterLock\nfrom pathlib import Path\n"
            f"p = Path({str(path)!r})\n"
            "w = WriterLock(p.with_name(f'.{p.name}.lock'), 'index').acquire()\n"
        ),
    }[kind] + "print('holding', flush=True)\nimport time\ntime.sleep(120)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_one_writer_at_a_time(demo, capsys):
    holder = _hold("store", demo["regions"])
    try:
        before = digest(demo["regions"])
        code, _, err = run(capsys, "extract", *extract_args(demo, demo["regions"]))
        one_error(code, err, "being written by pid", str(holder.pid))
        assert digest(demo["regions"]) == before
    finally:
        holder.kill()
        holder.wait()
    holder = _hold("index", demo["index"])
    try:
        before = digest(demo["index"])
        code, _, err = run(
            capsys,
            "index",
            "--checkpoint",
            demo["ckpt"],
            "--out",
            demo["index"],
            "--force",
            "--quiet",
        )
        one_error(code, err, "being written by pid", str(holder.pid))
        assert digest(demo["index"]) == before
    finally:
        holder.kill()
        holder.wait()


def test_reader_follows_a_store_another_process_grows(tmp_path):
    store = tmp_path / "grow"
    meta = {"feature_dim": 64, "label_names": ["a"]}
    rng = np.random.default_rng(0)

    def record():
        return RegionRecord.from_detections(
            rng.normal(size=(36, 64)).astype(np.float32),
            np.ones((36, 4), np.float32),
            np.zeros(36),
            np.ones(36),
            (8, 8),
        )

    with RegionWriter(store, meta) as w:
        w.put("first", record())
    reader = RegionStore(store)
    assert len(reader) == 1  # opened (and mapped) before the store grows
    code = (
        "import numpy as np\nfrom cpfean.data.region_store import RegionWriter, "
        "RegionRecord\nrng = np.random.default_rng(1)\n"
        f"with RegionWriter({str(store)!r}, {meta!r}, commit_every=8, map_size=1 << 20) "
        "as w:\n    for i in range(3000):\n"
        "        w.put(f'{i:05d}', RegionRecord.from_detections(rng.normal(size=(36, 64))"
        ".astype(np.float32), np.ones((36, 4), np.float32), np.zeros(36), np.ones(36), "
        "(8, 8)))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env())
    reads = 0
    try:
        while proc.poll() is None:
            for image_id in reader.ids()[-16:]:
                assert reader[image_id].num_valid == 36
                reads += 1
    finally:
        proc.wait()
    assert proc.returncode == 0 and reads > 0
    assert len(reader) == 3001 and reader.ids()[-2] == "02999"
