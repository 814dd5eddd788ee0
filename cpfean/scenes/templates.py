"""Captions for the bundled captioned scenes: vocabulary, spatial relations, templates.

Every caption is grounded: it is built from a list of object indices (its mentions) and every
spatial relation it states is computed from the objects' boxes. Salient objects (the large
ones) are mentioned in almost every caption, minor objects now and then, and background objects
never; this reproduces the prominence assumption of CPFEAN (prominent words recur across the
captions of an image).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Nouns a caption may use for each category. Single words, disjoint across categories, so a
#: caption's mentioned categories can be read back from its tokens.
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "ball": ("ball", "sphere", "orb"),
    "box": ("box", "cube", "crate"),
    "tree": ("tree", "pine", "fir"),
    "star": ("star", "starfish"),
    "car": ("car", "automobile", "vehicle"),
    "house": ("house", "cottage", "hut"),
    "cup": ("cup", "mug"),
    "heart": ("heart",),
    "arrow": ("arrow", "pointer"),
    "flower": ("flower", "blossom", "daisy"),
    "fish": ("fish", "goldfish"),
    "moon": ("moon", "crescent"),
    "kite": ("kite",),
    "umbrella": ("umbrella", "parasol"),
    "dog": ("dog", "puppy", "hound"),
    "cat": ("cat", "kitten", "kitty"),
    "bird": ("bird",),
    "horse": ("horse", "pony"),
    "truck": ("truck", "lorry"),
    "airplane": ("airplane", "plane", "aeroplane"),
    "boat": ("boat", "ship"),
    # only in the photo set (`cpfean.scenes.photos`)
    "bear": ("bear",),
    "fruit": ("fruit",),
    "book": ("book",),
    "clock": ("clock",),
}

#: Phrases that place a scene in its setting (`cpfean.scenes.settings`).
SETTING_WORDS: dict[str, tuple[str, ...]] = {
    "grass": ("on the grass", "on grass", "on a lawn", "in a field"),
    "sand": ("on the sand", "on the beach", "on sand"),
    "water": ("on the water", "in the water", "on a lake", "at sea"),
    "snow": ("in the snow", "on snow", "on a snowy field"),
    "road": ("on the road", "on a street", "on the road"),
    "indoors": ("indoors", "in a room", "inside a room"),
    # the photo set: a crop of one of many photographs, which no annotation describes
    "photo": ("in a photo", "in the picture", "in this photograph"),
}

#: Words for each named colour; the first is the plain name and is used most often.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"),
    "orange": ("orange", "tangerine"),
    "purple": ("purple", "violet"),
    "white": ("white", "snow-white"),
    "black": ("black", "jet-black"),
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}

#: Spatial relations ("a REL b") and their wordings.
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath"),
    "next to": ("next to", "beside", "close to"),
}

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class SceneObject:
    """One drawn object of a scene."""

    category: str  # one of CATEGORY_WORDS
    colour: str  # one of COLOUR_WORDS
    size: str  # "small" or "large"
    bbox: Box  # tight box around the drawn pixels, x, y, w, h in pixels
    role: str  # "salient", "minor" (sometimes mentioned) or "background" (never mentioned)
    area: int = 0  # number of drawn pixels


@dataclass(frozen=True)
class Caption:
    """One grounded caption."""

    raw: str  # the sentence as written
    mentions: tuple[int, ...]  # indices of the objects it names
    relations: tuple[tuple[int, str, int], ...]  # (a, relation, b): "object a REL object b"


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped (the Karpathy `tokens` convention)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def relation(a: Box, b: Box, width: int) -> str:
    """The spatial relation of box `a` to box `b` ("a is REL b"), from the boxes' geometry.

    Horizontal relations win when the centres differ more in x than in y; two horizontally
    arranged boxes closer than 6% of the image width are "next to" each other.
    """
    ax, ay = a[0] + a[2] / 2, a[1] + a[3] / 2
    bx, by = b[0] + b[2] / 2, b[1] + b[3] / 2
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        gap = max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2]))
        if gap < 0.06 * width:
            return "next to"
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area (boxes x, y, w, h)."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def _position(box: Box, width: int, height: int) -> str:
    """Where in the picture a box sits, as a phrase ("in the top left corner")."""
    cx, cy = (box[0] + box[2] / 2) / width, (box[1] + box[3] / 2) / height
    col = "left" if cx < 0.36 else "right" if cx > 0.64 else ""
    row = "top" if cy < 0.36 else "bottom" if cy > 0.64 else ""
    if row and col:
        return f"in the {row} {col} corner"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the middle"


class _Writer:
    """Draws words for one caption from a seeded generator."""

    def __init__(
        self,
        rng: np.random.Generator,
        objects: Sequence[SceneObject],
        width: int,
        height: int,
        background: str,
    ) -> None:
        self.rng, self.objects = rng, objects
        self.width, self.height, self.background = width, height, background
        self.relations: list[tuple[int, str, int]] = []

    def pick(self, options: Sequence[str], first_weight: float = 0.0) -> str:
        """A random option; `first_weight` extra probability on the first one."""
        if first_weight and self.rng.random() < first_weight:
            return options[0]
        return options[int(self.rng.integers(len(options)))]

    def noun(self, i: int) -> str:
        return self.pick(CATEGORY_WORDS[self.objects[i].category], 0.5)

    def phrase(self, i: int, article: str = "a") -> str:
        """A noun phrase for object i, e.g. "a big crimson ball"."""
        obj = self.objects[i]
        words = []
        p_size = 0.55 if obj.role == "salient" else 0.3
        if self.rng.random() < p_size:
            words.append(self.pick(SIZE_WORDS[obj.size]))
        if obj.colour:  # drawings of real things keep their own colours and take no word
            words.append(self.pick(COLOUR_WORDS[obj.colour], 0.6))
        words.append(self.noun(i))
        if article == "a" and words[0][0] in "aeiou":
            article = "an"
        return " ".join([article, *words])

    def setting(self) -> str:
        return self.pick(SETTING_WORDS[self.background], 0.3)

    def rel(self, a: int, b: int) -> str:
        """A wording of the relation of object a to object b, recorded for grounding."""
        name = relation(self.objects[a].bbox, self.objects[b].bbox, self.width)
        self.relations.append((a, name, b))
        return self.pick(RELATION_WORDS[name])

    def single(self, a: int) -> str:
        pos = _position(self.objects[a].bbox, self.width, self.height)
        templates = (
            f"{self.phrase(a)} {pos}",
            f"a picture of {self.phrase(a)}",
            f"{self.phrase(a)} {self.setting()}",
            f"{self.phrase(a)} {pos}, {self.setting()}",
            f"there is {self.phrase(a)} {pos}",
            f"{self.phrase(a, 'the')} is {pos} of the image",
            f"an image showing {self.phrase(a)}",
        )
        return self.pick(templates)

    def pair(self, a: int, b: int) -> str:
        kind = int(self.rng.integers(6))
        if kind == 0:
            where = f" {self.setting()}" if self.rng.random() < 0.4 else ""
            return f"{self.phrase(a)} {self.rel(a, b)} {self.phrase(b)}{where}"
        if kind == 1:
            return f"{self.phrase(a, 'the')} is {self.rel(a, b)} {self.phrase(b, 'the')}"
        if kind == 2:
            return f"there is {self.phrase(a)} {self.rel(a, b)} {self.phrase(b)}"
        if kind == 3:
            return f"{self.phrase(b)} with {self.phrase(a)} {self.rel(a, b)} it"
        if kind == 4:
            return f"a picture of {self.phrase(a)} and {self.phrase(b)}"
        return f"{self.phrase(a)} and {self.phrase(b)} {self.setting()}"

    def tail(self, head: int, rest: Sequence[int]) -> str:
        """Attach the remaining mentions to a caption whose first object is `head`."""
        phrases = [self.phrase(i) for i in rest]
        listed = phrases[-1]
        if len(phrases) > 1:
            listed = ", ".join(phrases[:-1]) + f" and {listed}"
        kind = int(self.rng.integers(4))
        if kind == 0:
            return f", with {listed} nearby"
        if kind == 1:
            return f". there is also {listed}"
        if kind == 2 and len(rest) == 1:
            c = rest[0]
            return f", and {self.phrase(c)} is {self.rel(c, head)} the {self.noun(head)}"
        return f" and {listed}"


def _choose_mentions(
    rng: np.random.Generator, objects: Sequence[SceneObject], n_captions: int
) -> list[list[int]]:
    """Which objects each caption names: salient almost always, minor sometimes, background
    never; every minor object at least once."""
    salient = [i for i, o in enumerate(objects) if o.role == "salient"]
    minor = [i for i, o in enumerate(objects) if o.role == "minor"]
    chosen: list[list[int]] = []
    for _ in range(n_captions):
        m = [i for k, i in enumerate(salient) if rng.random() < (0.95 if k == 0 else 0.8)]
        m += [i for i in minor if rng.random() < 0.3]
        if not m:
            m = [salient[0]]
        chosen.append(m)
    for i in minor:
        if not any(i in m for m in chosen):
            chosen[int(rng.integers(n_captions))].append(i)
    out = []
    for m in chosen:
        m = [m[j] for j in rng.permutation(len(m))]
        if salient[0] in m and rng.random() < 0.6:  # usually lead with the main object
            m.remove(salient[0])
            m.insert(0, salient[0])
        out.append(m)
    return out


def _finish(text: str, rng: np.random.Generator) -> str:
    text = text.strip()
    if rng.random() < 0.7:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.6:
        text += "."
    return text


def write_captions(
    rng: np.random.Generator,
    objects: Sequence[SceneObject],
    width: int,
    height: int,
    background: str,
    n_captions: int = 5,
) -> list[Caption]:
    """Write `n_captions` distinct grounded captions for one scene.

    Args:
        rng: the scene's generator (captions are part of the scene's deterministic output).
        objects: the scene's objects; at least one has role "salient".
        width, height: image size in pixels (for position and relation thresholds).
        background: the scene's setting, a key of SETTING_WORDS.
        n_captions: how many captions to write.
    """
    if not any(o.role == "salient" for o in objects):
        raise ValueError("a scene needs at least one salient object to caption")
    captions: list[Caption] = []
    seen: set[str] = set()
    for mention in _choose_mentions(rng, objects, n_captions):
        for _attempt in range(20):  # redraw the wording until it differs from earlier ones
            w = _Writer(rng, objects, width, height, background)
            if len(mention) == 1:
                text = w.single(mention[0])
            else:
                text = w.pair(mention[0], mention[1])
                if len(mention) > 2:
                    text += w.tail(mention[0], mention[2:])
            text = _finish(text, rng)
            if text.lower().rstrip(".") not in seen:
                break
        seen.add(text.lower().rstrip("."))
        captions.append(Caption(text, tuple(mention), tuple(w.relations)))
    return captions
