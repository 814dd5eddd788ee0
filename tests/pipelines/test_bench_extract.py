"""The extraction benchmark's command line runs both pipelines on the same images."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("detectron2")

from pipelines.bench import extract as bench_extract  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.detector]


def test_bench_extract_quick_times_both_pipelines_on_the_same_images(tmp_path, capsys):
    out = tmp_path / "extract.json"
    assert bench_extract.main(["--quick", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"cpfean", "naive"}
    for r in rows.values():  # --quick: 8 generated scenes, every one extracted
        assert r["images"] == 8
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    assert "speed-up of the batched one-pass pipeline" in capsys.readouterr().out
