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


# query | the things it names ("colour category" or "category", comma-separated) | setting
_TABLE = """
a dog on grass                 | dog             | grass
a dog on the beach             | dog             | sand
a cat in a room                | cat             | indoors
a cat in the snow              | cat             | snow
a horse in the snow            | horse           | snow
a horse on the grass           | horse           | grass
a boat on the water            | boat            | water
a bird over the water          | bird            | water
an airplane above the beach    | airplane        | sand
a truck on the road            | truck           | road
a red car on the road          | red car         | road
a black car                    | black car       | -
a tree in the snow             | tree            | snow
a house on the grass           | house           | grass
a yellow umbrella on the beach | yellow umbrella | sand
a blue ball in a room          | blue ball       | indoors
a fish in the water            | fish            | water
a kite on the beach            | kite            | sand
a cup indoors                  | cup             | indoors
a dog and a cat                | dog, cat        | -
a bird and an airplane         | bird, airplane  | -
a horse and a tree             | horse, tree     | -
a green tree on the grass      | green tree      | grass
a red ball on the grass        | red ball        | grass
"""


def _parse(line: str) -> Query:
    text, things, setting = (part.strip() for part in line.split("|"))
    named = tuple(
        (words[-1], words[0] if len(words) == 2 else "")
        for words in (t.split() for t in things.split(","))
    )
    return Query(text, named, None if setting == "-" else setting)


QUERIES: tuple[Query, ...] = tuple(_parse(line) for line in _TABLE.strip().splitlines())


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
