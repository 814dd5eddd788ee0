"""Smoke run of the scoring benchmark's command line (``--quick``)."""

from __future__ import annotations

import torch

from pipelines.bench import score as bench_score


def test_bench_score_quick(capsys):
    threads = torch.get_num_threads()
    try:
        assert bench_score.main(["--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    out = capsys.readouterr().out
    for row in ("CPFEAN score", "SCAN-style baseline", "floor", "naive SCAN loop"):
        assert row in out
    agree = float(out.strip().splitlines()[-1].split("=")[-1])
    assert agree < 1e-5  # the algebraic baseline equals SCAN's explicit loop
