"""A smaller run of the whole demo answers the plain-English queries far better than chance.

300 scenes, 60 detector iterations from the ImageNet weights, 4 CPFEAN epochs: the chain of
`make demo`, a few minutes on the CPU. Chance is what a random ranking of the same gallery
scores: the share of the gallery that answers each query.
"""

from __future__ import annotations

import json

import pytest

from pipelines import demo

pytestmark = [pytest.mark.slow, pytest.mark.detector]


def test_a_small_run_answers_plain_english_queries(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--images", "300", "--detector-iters", "60", "--epochs", "4"]
    assert demo.main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "queries.json").read_text())
    rows = result["rows"]
    assert len(rows) >= 20 and rows[0]["query"] == "a dog on grass"
    chance = sum(r["relevant_in_gallery"] for r in rows) / (300 * len(rows))
    mean = result["mean_precision@5"]
    assert mean >= 3 * chance, (mean, chance)
    assert f"precision@5 {mean:.2f}" in printed
