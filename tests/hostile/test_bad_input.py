"""Careless input to every command, on the quick demo's output: one ``error:`` line naming
the thing, exit status 2, before any work, nothing the user had changed."""

import json
import os
import shutil
from pathlib import Path

import lmdb
import pytest
import torch

from cpfean.data.region_store import RegionStore
from tests.hostile.helpers import (
    digest,
    extract_args,
    one_error,
    run,
    run_process,
    train_argv,
)

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.slow, pytest.mark.detector]


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
    code, _, err = run(capsys, "train", *train_argv(demo, run_dir, override))
    one_error(code, err, needle)
    assert not run_dir.exists()


def test_train_refuses_missing_data_and_cuda_without_cuda(demo, capsys):
    run_dir = demo["tmp"] / "run"
    code, _, err = run(
        capsys, "train", *train_argv(demo, run_dir, f"data.captions={demo['tmp'] / 'no.json'}")
    )
    one_error(code, err, "no.json")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "train", *train_argv(demo, run_dir, "train.device=cuda"))
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
