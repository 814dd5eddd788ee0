"""Plain-English queries for the bundled scenes, answered from the generator's ground truth.

A query names things (with a colour or not) and maybe a setting; a scene answers it when every
named thing is in the picture (mentioned by its captions or not: a user asking for a dog wants
every dog) and the scene takes place in that setting. `pipelines.queries` reports the
precision@5 of a search index on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["QUERIES", "Query", "relevant"]


@dataclass(frozen=True)
class Query:
    text: str
    things: tuple[tuple[str, str], ...]  # (category, colour); "" = any colour
    setting: str | None = None  # one of cpfean.scenes.settings.SETTINGS, None = any


def _q(text: str, *things: str, setting: str | None = None) -> Query:
    """``_q("a red car on the road", "red car", setting="road")``: "colour category" or
    "category" per thing."""
    parsed = tuple((t.split()[-1], t.split()[0] if len(t.split()) == 2 else "") for t in things)
    return Query(text, parsed, setting)


QUERIES: tuple[Query, ...] = (
    _q("a dog on grass", "dog", setting="grass"),
    _q("a dog on the beach", "dog", setting="sand"),
    _q("a cat in a room", "cat", setting="indoors"),
    _q("a cat in the snow", "cat", setting="snow"),
    _q("a horse in the snow", "horse", setting="snow"),
    _q("a horse on the grass", "horse", setting="grass"),
    _q("a boat on the water", "boat", setting="water"),
    _q("a bird over the water", "bird", setting="water"),
    _q("an airplane above the beach", "airplane", setting="sand"),
    _q("a truck on the road", "truck", setting="road"),
    _q("a red car on the road", "red car", setting="road"),
    _q("a black car", "black car"),
    _q("a tree in the snow", "tree", setting="snow"),
    _q("a house on the grass", "house", setting="grass"),
    _q("a yellow umbrella on the beach", "yellow umbrella", setting="sand"),
    _q("a blue ball in a room", "blue ball", setting="indoors"),
    _q("a fish in the water", "fish", setting="water"),
    _q("a kite on the beach", "kite", setting="sand"),
    _q("a cup indoors", "cup", setting="indoors"),
    _q("a dog and a cat", "dog", "cat"),
    _q("a bird and an airplane", "bird", "airplane"),
    _q("a horse and a tree", "horse", "tree"),
    _q("a green tree on the grass", "green tree", setting="grass"),
    _q("a red ball on the grass", "red ball", setting="grass"),
)


def relevant(query: Query, scene: Mapping[str, Any]) -> bool:
    """Whether a scene (an image entry of the generator's captions.json: ``objects`` with
    ``category`` and ``colour``, and ``background``, its setting) answers the query."""
    if query.setting is not None and scene.get("background") != query.setting:
        return False
    objects = scene.get("objects", [])
    return all(
        any(o["category"] == c and (not colour or o["colour"] == colour) for o in objects)
        for c, colour in query.things
    )
