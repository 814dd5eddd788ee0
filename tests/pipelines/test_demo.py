"""The README's main job, in its quick variant: every stage runs and hands over to the next."""

import json

import pytest

from pipelines import demo, retrieve


@pytest.mark.slow
@pytest.mark.detector
def test_quick_demo_end_to_end_then_retrieve_and_rerun(quick_demo, capsys):
    out, text = quick_demo
    for stage in (
        "generate scenes",
        "train detector",
        "extract regions",
        "train CPFEAN",
        "evaluate",
        "build index",
        "plain-English queries",
    ):
        assert f"[demo] {stage}: done" in text, stage
    assert "rank" in text and "score" in text  # the example query's table
    assert f"serve it:    python -m pipelines.serve --index {out / 'index'}" in text
    metrics = json.loads((out / "cpfean" / "test_metrics.json").read_text())
    recalls = [metrics[d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10")]
    assert metrics["rsum"] == pytest.approx(sum(recalls)) and all(0 <= r <= 100 for r in recalls)
    assert f"test rSum:   {metrics['rsum']:.1f}" in text  # the summary shows what was measured

    # the index answers afterwards as a program would ask it
    assert (
        retrieve.main(
            ["--query", "a red ball", "--index", str(out / "index"), "--json", "--top-k", "3"]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["mode"] == "text2image" and len(answer["results"]) == 3
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)

    # an image query goes through the demo's own detector, then ranks the indexed captions
    image = out / "data" / "images" / "000000.jpg"
    assert (
        retrieve.main(
            ["--image", str(image), "--index", str(out / "index"), "--json", "--top-k", "2"]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["mode"] == "image2text" and len(answer["results"]) == 2
    assert all(r["caption"].strip() for r in answer["results"])

    # a re-run finds every stage whole and redoes nothing
    assert demo.main(["--out", str(out), "--quick", "--device", "cpu"]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("already done, skipping") == 7
