"""Files from strangers and careless input, against the real commands on the quick demo's output.

Every case asserts the exit status, one ``error:`` line naming the thing, no traceback, and that
nothing the user had was changed. Payloads that would run code create a marker file if they
ran. The kill -9 cases pick their kill point from ``CPFEAN_KILL_SEED`` (default 0), printed in
every failure, so a failure can be replayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from cpfean.data.region_store import RegionRecord, RegionStore, RegionStoreError, RegionWriter
from cpfean.images import BadImage, decode_image
from cpfean.index import RetrievalIndex

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.slow, pytest.mark.detector]

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = int(os.environ.get("CPFEAN_KILL_SEED", "0"))


# ----------------------------------------------------------------------------------- helpers
def digest(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``roots`` (and the roots themselves)."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for p in paths:
            if p.is_file() and p.name not in ("lock.mdb", "writer.lock", "train.lock"):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(capsys, module: str, *argv: str) -> tuple[int, str, str]:
    """``python -m pipelines.MODULE ARGV`` in this process: (exit status, stdout, stderr)."""
    import importlib

    main = importlib.import_module(f"pipelines.{module}").main
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


def run_process(module: str, *argv: str, timeout: float = 300) -> tuple[int, str, str]:
    """The same in a new process (for failures that would kill the test process)."""
    done = subprocess.run(
        [sys.executable, "-m", f"pipelines.{module}", *map(str, argv)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr


def one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _link_checkpoints(src: str, dst: str) -> None:
    if src.endswith((".pt", ".pth")):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def demo(quick_demo, tmp_path):
    """A private copy of the quick demo (so cases may change it) and its paths."""
    src, _ = quick_demo
    out = tmp_path / "demo"
    shutil.copytree(
        src,
        out,
        # the detector's training folder is not read by any case; checkpoints are only read
        # or replaced by rename, so a hard link shares them (~600 MB a copy otherwise)
        ignore=shutil.ignore_patterns("lock.mdb", "*.lock", "train"),
        copy_function=_link_checkpoints,
    )
    # as if downloaded: the absolute paths recorded on the maker's machine do not exist here,
    # so the copy finds its store, images and checkpoint by their paths relative to the index
    meta_path = out / "index" / "index.json"
    index = json.loads(meta_path.read_text())
    for key in ("regions", "images_root"):
        index[key] = f"/elsewhere/{key}"
    index["checkpoint"]["path"] = "/elsewhere/best.pt"
    meta_path.write_text(json.dumps(index))
    return {
        "root": out,
        "images": out / "data" / "images",
        "det": out / "detector",
        "regions": out / "regions",
        "captions": out / "data" / "captions.json",
        "ckpt": out / "cpfean" / "best.pt",
        "index": out / "index",
        "tmp": tmp_path,
    }


def extract_args(d: dict, store: Path, *extra: str) -> list[str]:
    return [
        str(d["images"]),
        "--out",
        str(store),
        "--config",
        str(d["det"] / "config.yaml"),
        "--weights",
        str(d["det"] / "model_final.pth"),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


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
    assert got.REGIONS.NUM_REGIONS == 20 and got.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"


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


# ------------------------------------------------------------------ every bad input, one line
def test_bad_file_names_are_skipped_and_reported(demo, capsys):
    images = demo["tmp"] / "odd"
    images.mkdir()
    src = sorted(demo["images"].iterdir())[:2]
    names = [os.fsdecode(b"b\xff.jpg"), "back\\slash.jpg", "fine.jpg", "also fine.jpg"]
    sub = images / ("d" * 200) / ("e" * 200) / ("f" * 200)  # a path past LMDB's 511-byte keys
    sub.mkdir(parents=True)
    for name in names:
        shutil.copy(src[0], images / name)
    shutil.copy(src[1], sub / "long.jpg")
    store = demo["tmp"] / "odd.lmdb"
    argv = extract_args(demo, store)
    argv[0] = str(images)
    for _attempt in range(2):  # a re-run is not blocked by the same files
        code, out, err = run(capsys, "extract", *argv)
        assert code == 3 and "Traceback" not in err, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["in_store"] == 2 and summary["skipped"] == 3
        report = [
            json.loads(line)
            for line in Path(str(store) + ".skipped.jsonl").read_text().splitlines()
        ]
        reasons = " | ".join(r["reason"] for r in report)
        assert "not valid UTF-8" in reasons and "backslash" in reasons and "510" in reasons
    assert RegionStore(store).ids() == ["also fine.jpg", "fine.jpg"]


def _cut(path: Path) -> None:
    data = path / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["truncated", "not lmdb", "foreign keys", "missing"])
def test_damaged_store_is_one_line(demo, damage):
    store = demo["regions"]
    if damage == "truncated":
        _cut(store)
    elif damage == "not lmdb":
        (store / "data.mdb").write_bytes(b"PK\x03\x04 a zip file, not a database" * 200)
    elif damage == "foreign keys":
        env = lmdb.open(str(store), map_size=1 << 30)
        with env.begin(write=True) as txn:
            txn.put(b"\xff\xfeforeign", b"value")
        env.close()
    else:
        shutil.rmtree(store)
    before = digest(demo["root"])
    # a new process: a regression here kills it with SIGBUS instead of the test run
    code, out, err = run_process(
        "evaluate", "--checkpoint", demo["ckpt"], "--regions", store, "--device", "cpu"
    )
    want = {
        "truncated": "truncated",
        "not lmdb": "not an LMDB data file",
        "foreign keys": "not UTF-8",
        "missing": "no region store",
    }[damage]
    one_error(code, err, want)
    assert digest(demo["root"]) == before


def _train_argv(d: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"run_dir={run_dir}",
        f"data.regions={d['regions']}",
        f"data.captions={d['captions']}",
        "train.device=cpu",
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lr=[", "train.lr=["),
        ("train.batch_size=0", "train.batch_size"),
        ("train.log_every=0", "train.log_every"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("data.val_split=nosuch", "nosuch"),
        ("data.num_workers=-2", "data.num_workers"),
        ("train.device=tpu", "train.device"),
        ("model.region_heads=7", "model.region_heads"),
        ("train.epochs=0", "train.epochs"),
        ("train.nosuch=1", "train.nosuch"),
    ],
)
def test_train_bad_config_is_one_line_before_any_file(demo, capsys, monkeypatch, override, needle):
    import cpfean.engine

    def no_model(*a, **k):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(cpfean.engine, "build_model", no_model)
    run_dir = demo["tmp"] / "run"
    code, _, err = run(capsys, "train", *_train_argv(demo, run_dir, override))
    one_error(code, err, needle)
    assert not run_dir.exists()


def test_train_refuses_missing_data_and_cuda_without_cuda(demo, capsys):
    run_dir = demo["tmp"] / "run"
    code, _, err = run(
        capsys, "train", *_train_argv(demo, run_dir, f"data.captions={demo['tmp'] / 'no.json'}")
    )
    one_error(code, err, "no.json")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "train", *_train_argv(demo, run_dir, "train.device=cuda"))
        one_error(code, err, "CUDA")
    assert not run_dir.exists()


def test_evaluate_checks_the_protocol_size_before_scoring(demo, capsys, monkeypatch):
    import pipelines.evaluate

    def no_scoring(*a, **k):
        raise AssertionError("scored before checking the test-set size")

    monkeypatch.setattr(pipelines.evaluate, "similarity_matrix", no_scoring)
    json_out = demo["tmp"] / "m.json"
    code, _, err = run(
        capsys, "evaluate", "--checkpoint", demo["ckpt"], "--protocol", "f30k", "--json", json_out
    )
    one_error(code, err, "f30k", "expects 1000 test images")
    assert not json_out.exists()
    code, _, err = run(capsys, "evaluate", "--checkpoint", demo["ckpt"], "--batch-size", "0")
    one_error(code, err, "--batch-size")
    # the ECCV protocol: its COCO ids are checked before any scoring too
    code, _, err = run(capsys, "evaluate", "--checkpoint", demo["ckpt"], "--protocol", "eccv")
    one_error(code, err, "--protocol eccv and --coco-captions go together")
    coco = demo["tmp"] / "captions_val2014.json"
    coco.write_text('{"annotations": []}')
    argv = ["--checkpoint", demo["ckpt"], "--protocol", "eccv", "--coco-captions", coco]
    code, _, err = run(capsys, "evaluate", *argv, "--any-size")
    one_error(code, err, "test images are not COCO 5K test images that eccv-caption knows")


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--workers", "-1"], "--workers"),
        (["--commit-every", "0"], "--commit-every"),
        (["--threads", "-3"], "--threads"),
        (["--weights", "/nope.pth"], "/nope.pth"),
        (["--batch-size", "many"], "--batch-size"),
        (["MODEL.NOSUCH", "1"], "MODEL.NOSUCH"),
    ],
)
def test_extract_bad_arguments_before_any_file(demo, capsys, extra, needle):
    store = demo["tmp"] / "store"
    argv = extract_args(demo, store)
    if extra[0] == "--weights":
        argv[argv.index("--weights") + 1] = extra[1]
    else:
        argv += extra
    code, _, err = run(capsys, "extract", *argv)
    one_error(code, err, needle)
    assert not store.exists()


def test_extract_refuses_missing_folders_and_cuda_without_cuda(demo, capsys):
    store = demo["tmp"] / "store"
    argv = extract_args(demo, store)
    argv[0] = str(demo["tmp"] / "no-such-folder")
    code, _, err = run(capsys, "extract", *argv)
    one_error(code, err, "no-such-folder")
    mine = demo["tmp"] / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "extract", *extract_args(demo, mine))
    one_error(code, err, "not a region store", "notes.txt")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    if not torch.cuda.is_available():
        code, _, err = run(
            capsys, "extract", *extract_args(demo, store)[:-5], "--device", "cuda", "--workers", "0"
        )
        one_error(code, err, "CUDA")
    assert not store.exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--query", "red", "--top-k", "10000000"], "--top-k"),
        (["--query", "red", "--first-stage", "0"], "--first-stage"),
        (["--query", "red", "--show", "out.gif"], "--show"),
    ],
)
def test_retrieve_bounds(demo, capsys, argv, needle):
    code, _, err = run(capsys, "retrieve", *argv, "--index", demo["index"])
    one_error(code, err, needle)


@pytest.mark.parametrize(
    "module,argv,needle",
    [
        ("index", ["--batch-size", "0"], "--batch-size"),
        ("index", ["--split", "nosuch"], "nosuch"),
        ("convert_weights", ["/nope.pkl"], "/nope.pkl"),
        ("import_precomp", ["/nope", "--split", "test"], "/nope"),
        ("train_detector", ["--data", "/nope", "--iters", "0"], "--iters"),
        ("train", ["--config", "/nope.yaml"], "/nope.yaml"),
    ],
)
def test_other_commands_one_line(demo, capsys, module, argv, needle):
    if module == "index":
        argv = ["--checkpoint", str(demo["ckpt"]), "--out", str(demo["tmp"] / "i"), *argv]
    code, _, err = run(capsys, module, *argv)
    one_error(code, err, needle)
    assert not (demo["tmp"] / "i").exists()


# ------------------------------------------------------------------- kill -9, then a re-run
def _kill_when(proc: subprocess.Popen, ready, delay: float, budget: float = 240) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()`` first holds; False if it ended first."""
    deadline = time.time() + budget
    while proc.poll() is None and not ready():
        assert time.time() < deadline, "the run never reached the kill window"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _spawn(module: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"pipelines.{module}", *map(str, argv)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _count(store: Path) -> int:
    try:
        return len(RegionStore(store))
    except (FileNotFoundError, RegionStoreError):
        return 0


def test_kill_9_extract_then_rerun(demo, capsys):
    rng = np.random.default_rng(KILL_SEED)
    store = demo["tmp"] / "killed"
    argv = extract_args(demo, store, "--batch-size", "1", "--commit-every", "1")
    n = len(RegionStore(demo["regions"]))
    at, delay = int(rng.integers(1, n // 2)), float(rng.uniform(0, 0.3))
    assert _kill_when(_spawn("extract", *argv), lambda: _count(store) >= at, delay), KILL_SEED
    partial = RegionStore(store).ids()
    code, out, err = run(capsys, "extract", *argv)
    assert code == 0, (KILL_SEED, err)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["already_present"] == len(partial), KILL_SEED
    assert summary["written"] == n - len(partial), KILL_SEED
    assert RegionStore(store).ids() == RegionStore(demo["regions"]).ids(), KILL_SEED


def test_kill_9_index_then_rerun(demo, capsys):
    rng = np.random.default_rng(KILL_SEED + 1)
    out = demo["tmp"] / "killed_index"
    argv = [
        "--checkpoint",
        demo["ckpt"],
        "--regions",
        demo["regions"],
        "--captions",
        demo["captions"],
        "--split",
        "test",
        "--out",
        out,
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--quiet",
    ]
    shards = Path(str(out) + ".building") / "shards"
    at, delay = int(rng.integers(1, 8)), float(rng.uniform(0, 0.2))
    assert _kill_when(
        _spawn("index", *argv), lambda: shards.is_dir() and len(list(shards.iterdir())) >= at, delay
    )
    code, _, err = run(capsys, "index", *argv)
    assert code == 0, (KILL_SEED, err)
    clean = json.loads((demo["index"] / "index.json").read_text())
    got = json.loads((out / "index.json").read_text())
    assert got["count"] == clean["count"] and got["ids_sha256"] == clean["ids_sha256"]
    for name in ["pooled", *(f"emb.{f}" for f in clean["image_embeddings"]["fields"])]:
        a = np.load(RetrievalIndex(out).data / "images" / f"{name}.npy")
        b = np.load(RetrievalIndex(demo["index"]).data / "images" / f"{name}.npy")
        np.testing.assert_allclose(
            a.astype(np.float32),
            b.astype(np.float32),
            atol=2e-3,
            err_msg=f"{name} (seed {KILL_SEED})",
        )
    leftovers = [
        p.name
        for p in out.parent.iterdir()
        if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock")
    ]
    assert leftovers == [] and not shards.exists(), KILL_SEED


def test_kill_9_train_then_resume(demo, capsys):
    rng = np.random.default_rng(KILL_SEED + 2)
    run_dir = demo["tmp"] / "run"
    argv = _train_argv(
        demo,
        run_dir,
        "train.epochs=3",
        "train.batch_size=8",
        "train.log_every=1",
        "train.lr_decay_epochs=[]",
    )
    metrics = run_dir / "metrics.csv"
    rows = int(rng.integers(2, 12))

    def logged() -> bool:
        try:
            return len(metrics.read_text().splitlines()) > rows
        except OSError:
            return False

    assert _kill_when(_spawn("train", *argv), logged, float(rng.uniform(0, 0.5))), KILL_SEED
    resume = ["--resume"] if (run_dir / "last.pt").exists() else []
    code, _, err = run(capsys, "train", *resume, *argv)
    assert code == 0, (KILL_SEED, err)
    import csv

    with open(metrics, newline="") as f:
        table = list(csv.DictReader(f))
    keys = [(r["epoch"], r["step"], r["rsum"] != "") for r in table]
    assert len(keys) == len(set(keys)), f"duplicated rows (seed {KILL_SEED})"
    steps = [int(r["step"]) for r in table if r["rsum"] == ""]
    assert steps == sorted(steps), KILL_SEED
    best = json.loads((run_dir / "best.json").read_text())
    assert best["epoch"] in (1, 2, 3), KILL_SEED
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")], KILL_SEED
