"""The retrieval benchmark builds its gallery through ``cpfean.index.build_index`` and searches
it through ``cpfean.index.search``: with every image a candidate, two-stage equals exhaustive."""

from __future__ import annotations

import json

import torch

from cpfean.index import RetrievalIndex
from pipelines.bench import retrieve as bench_retrieve


def test_bench_retrieve_small(tmp_path):
    threads = torch.get_num_threads()
    rows_json = tmp_path / "rows.json"
    argv = ["--sizes", "1500", "--dim", "64", "--queries", "5", "--candidates", "50,1500"]
    argv += ["--exhaustive-queries", "2", "--threads", "1", "--seed", "3"]
    argv += ["--workdir", str(tmp_path), "--keep", "--json", str(rows_json)]
    try:
        assert bench_retrieve.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    rows = {(r["path"], r["candidates"]): r for r in json.loads(rows_json.read_text())}
    assert rows[("two-stage", 1500)]["recall@10"] == 1.0  # every image re-ranked = exhaustive
    assert 0.0 < rows[("two-stage", 50)]["recall@10"] <= 1.0
    (index_dir,) = tmp_path.glob("bench_1500_*/index")
    index = RetrievalIndex(index_dir)  # a real index, as pipelines.index writes one
    assert index.count == 1500 and index.image_ids[0] == "0000000"
    assert index.meta["image_embeddings"]["fields"] == [
        "gate_context",
        "gate_self",
        "gram",
        "mask",
        "regions",
    ]
