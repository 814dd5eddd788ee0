"""The retrieval benchmark builds its gallery through ``cpfean.index.build_index``, searches it
through ``cpfean.index.search_index`` in a fresh process, and scores it against the exhaustive
top-10 over the gallery's exact values."""

from __future__ import annotations

import json

import torch

from cpfean.index import RetrievalIndex
from pipelines.bench import retrieve as bench_retrieve


def _run(tmp_path, *extra: str) -> dict:
    threads = torch.get_num_threads()
    rows_json = tmp_path / "rows.json"
    argv = ["--sizes", "1500", "--dim", "64", "--queries", "5", "--candidates", "50,1500"]
    argv += ["--threads", "1", "--seed", "3", "--no-encode", *extra]
    argv += ["--workdir", str(tmp_path), "--keep", "--json", str(rows_json)]
    try:
        assert bench_retrieve.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    return {(r["path"], r["candidates"]): r for r in json.loads(rows_json.read_text())}


def test_bench_retrieve_small(tmp_path):
    rows = _run(tmp_path, "--codec", "none")
    exhaustive = rows[("exhaustive", 1500)]
    # float16 on disk against float32 truth: only near-ties may swap
    assert exhaustive["recall_at_10"] >= 0.9
    assert rows[("two-stage", 1500)]["recall_at_10"] == exhaustive["recall_at_10"]
    assert 0.0 < rows[("two-stage", 50)]["recall_at_10"] <= exhaustive["recall_at_10"]
    assert exhaustive["resident_mb"] > 0 and exhaustive["index_bytes"] > 1500 * 64 * 10
    (index_dir,) = tmp_path.glob("retrieve_1500_*_exact/index")
    index = RetrievalIndex(index_dir)  # a real index, as pipelines.index writes one
    assert index.count == 1500 and index.image_ids[0] == "0000000" and index.codec is None
    again = _run(tmp_path, "--codec", "none")  # kept: neither the index nor the truth rebuilt
    assert again[("exhaustive", 1500)]["build_s"] is None
    assert again[("exhaustive", 1500)]["recall_at_10"] == exhaustive["recall_at_10"]


def test_bench_retrieve_compressed(tmp_path):
    rows = _run(tmp_path, "--codec", "SQ8")
    plain = _run(tmp_path, "--codec", "none")
    assert rows[("exhaustive", 1500)]["codec"] == "SQ8"
    assert rows[("exhaustive", 1500)]["recall_at_10"] >= 0.9
    assert rows[("exhaustive", 1500)]["index_bytes"] < plain[("exhaustive", 1500)]["index_bytes"]
    (index_dir,) = tmp_path.glob("retrieve_1500_*_SQ8/index")
    assert RetrievalIndex(index_dir).codec.factory == "SQ8"
