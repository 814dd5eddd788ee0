"""Metrics by kind of scene: groups average over their own queries, ranked against the whole
gallery; the groups come from the generated scenes' objects and mentions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpfean.breakdown import metrics_by_group, scene_groups
from cpfean.metrics import recall_metrics


def test_each_group_averages_its_own_queries_over_the_whole_gallery():
    n = 12
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(n, 5 * n))
    for i in range(6):  # images 0-5 and their captions find each other first
        sims[i, 5 * i : 5 * i + 5] += 100
    groups = ["easy"] * 6 + ["hard"] * 6
    out = metrics_by_group(sims, groups)
    assert list(out) == ["easy", "hard"] and out["easy"]["images"] == 6
    assert out["easy"]["rsum"] == 600.0 and out["easy"]["i2t"]["medr"] == 1.0
    assert out["hard"]["rsum"] < 600.0
    # the two groups' recalls average back to the whole set's (equal sizes)
    whole = recall_metrics(sims)
    for d in ("i2t", "t2i"):
        for k in ("r1", "r5", "r10"):
            assert (out["easy"][d][k] + out["hard"][d][k]) / 2 == pytest.approx(whole[d][k])


def test_scene_groups_count_mentioned_and_unmentioned_objects(tmp_path):
    def scene(name, objects, mentions):
        sentences = [{"raw": "x", "mentions": m} for m in mentions]
        return {
            "filename": name,
            "split": "test",
            "sentences": sentences,
            "objects": [{"category": "c"}] * objects,
        }

    path = tmp_path / "captions.json"
    path.write_text(
        json.dumps(
            {
                "images": [
                    scene("a.jpg", 2, [[0], [0, 1]]),  # 2 mentioned, none left
                    scene("b.jpg", 6, [[0], [1], [2], [3], [4]]),  # 5 mentioned, 1 left
                    scene("c.jpg", 5, [[0]] * 5),  # 1 mentioned, 4 left
                ]
            }
        )
    )
    groups = scene_groups(path, ["c.jpg", "a.jpg", "b.jpg"])
    assert groups["mentioned"] == ["1", "2", "4+"]
    assert groups["clutter"] == ["3+ unmentioned", "0 unmentioned", "1 unmentioned"]
    with pytest.raises(ValueError, match="no scene facts .* 'zzz.jpg'"):
        scene_groups(path, ["zzz.jpg"])


def test_the_command_prints_both_tables_and_refuses_a_wrong_matrix(tmp_path, capsys):
    from pipelines.breakdown import main

    images = []
    for i in range(4):
        sentences = [
            {"raw": f"a thing {i} {k}", "mentions": list(range(1 + i % 3))} for k in range(5)
        ]
        images.append(
            {
                "filename": f"{i}.jpg",
                "split": "test",
                "sentences": sentences,
                "objects": [{"category": "c"}] * 4,
            }
        )
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images}))
    sims = np.random.default_rng(1).normal(size=(4, 20)).astype(np.float32)
    np.save(tmp_path / "a.npy", sims)
    np.save(tmp_path / "bad.npy", sims[:, :10])
    out = tmp_path / "out.json"
    argv = ["--captions", str(captions), "--sims", f"A={tmp_path / 'a.npy'}", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| objects the captions mention | images | A rSum | A t2i R@1 |" in printed
    assert "| 3+ unmentioned | 2 |" in printed and "| 1 unmentioned | 1 |" in printed
    saved = json.loads(out.read_text())
    assert saved["mentioned"]["A"]["1"]["images"] == 2
    assert main(["--captions", str(captions), "--sims", f"B={tmp_path / 'bad.npy'}"]) == 2
    assert "shape (4, 10), the captions make (4, 20)" in capsys.readouterr().err
