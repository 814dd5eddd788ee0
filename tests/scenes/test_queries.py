"""The plain-English queries: valid vocabulary, ground truth read from the scenes, and every
query answerable in a modest gallery of the generator."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from cpfean.scenes.generate import make_scene
from cpfean.scenes.queries import QUERIES, Query, relevant
from cpfean.scenes.settings import SETTINGS
from cpfean.scenes.shapes import CATEGORIES, COLOURS, THINGS
from cpfean.scenes.templates import CATEGORY_WORDS, tokenize


def test_at_least_twenty_queries_in_the_generators_vocabulary():
    assert len(QUERIES) >= 20 and len({q.text for q in QUERIES}) == len(QUERIES)
    assert QUERIES[0].text == "a dog on grass"
    for q in QUERIES:
        assert q.setting is None or q.setting in SETTINGS
        for category, colour in q.things:
            assert category in CATEGORIES and (colour == "" or colour in COLOURS)
            assert not (colour and category in THINGS), "drawings of things have no colour"
            assert set(CATEGORY_WORDS[category]) & set(tokenize(q.text)), q.text


def test_relevance_needs_every_thing_its_colour_and_the_setting():
    q = Query("a red car on the road", (("car", "red"),), "road")
    car = {"category": "car", "colour": "red"}
    assert relevant(q, {"background": "road", "objects": [car]})
    assert not relevant(q, {"background": "grass", "objects": [car]})
    assert not relevant(q, {"background": "road", "objects": [{**car, "colour": "blue"}]})
    both = Query("a dog and a cat", (("dog", ""), ("cat", "")))
    dog, cat = {"category": "dog", "colour": ""}, {"category": "cat", "colour": ""}
    assert relevant(both, {"background": "sand", "objects": [cat, dog]})
    assert not relevant(both, {"background": "sand", "objects": [dog]})


@pytest.fixture(scope="module")
def gallery() -> list[dict]:
    scenes = [make_scene(1, i)[0] for i in range(300)]
    return [{"background": s.background, "objects": [asdict(o) for o in s.objects]} for s in scenes]


def test_every_query_is_answered_in_300_scenes_and_none_by_most(gallery):
    for q in QUERIES:
        n = sum(relevant(q, s) for s in gallery)
        assert 1 <= n <= 0.3 * len(gallery), (q.text, n)


def test_the_command_refuses_captions_not_made_by_the_generator(tmp_path, capsys):
    from pipelines import queries

    foreign = tmp_path / "dataset_flickr30k.json"
    foreign.write_text('{"dataset": "flickr30k", "images": []}')
    assert queries.main(["--index", str(tmp_path), "--captions", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "scene generator" in err[0]
