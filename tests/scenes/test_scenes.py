"""The captioned-scene generator: determinism, formats, geometry, grounding, prominence."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cpfean.data.captions import load_captions
from cpfean.scenes import generate as scenes_mod
from cpfean.scenes.generate import generate_dataset, make_scene, split_sizes
from cpfean.scenes.shapes import CATEGORIES, COLOURS, draw_shape
from cpfean.scenes.templates import (
    CATEGORY_WORDS,
    COLOUR_WORDS,
    SceneObject,
    overlap,
    relation,
    tokenize,
    write_captions,
)

N = 30
WORD_TO_CATEGORY = {w: c for c, words in CATEGORY_WORDS.items() for w in words}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    generate_dataset(out, N, seed=7, workers=1)
    return out


@pytest.fixture(scope="module")
def karpathy(dataset: Path) -> dict:
    return json.loads((dataset / "captions.json").read_text())


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_vocabulary_is_rich_enough() -> None:
    assert len(CATEGORIES) >= 10 and len(COLOURS) == 8
    from cpfean.scenes.photos import CATEGORIES as PHOTO_CATEGORIES

    assert set(CATEGORY_WORDS) == set(CATEGORIES) | set(PHOTO_CATEGORIES)
    assert set(COLOURS) == set(COLOUR_WORDS)
    all_words = [w for ws in CATEGORY_WORDS.values() for w in ws]
    assert len(all_words) == len(set(all_words)), "category nouns must not be shared"


def test_same_seed_same_bytes_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, N, seed=7, workers=2)
    assert _tree_bytes(again) == _tree_bytes(dataset)


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_dataset(other, N, seed=8, workers=1)
    a, b = _tree_bytes(dataset), _tree_bytes(other)
    assert a.keys() == b.keys()
    assert a["captions.json"] != b["captions.json"]
    assert sum(a[k] != b[k] for k in a if k.startswith("images/")) == N


def test_smaller_run_is_a_prefix(dataset: Path) -> None:
    for i in (0, 5, N - 1):
        scene, _ = make_scene(7, i)
        assert (dataset / "images" / scene.file_name).is_file()
    first, _ = make_scene(7, 3)
    again, _ = make_scene(7, 3)
    assert first == again


def test_captions_json_loads_and_ids_resolve(dataset: Path, karpathy: dict) -> None:
    caps = load_captions(dataset / "captions.json")
    assert len(caps) == N and all(len(c) == 5 for c in caps.captions)
    for image_id in caps.image_ids:
        assert (dataset / "images" / image_id).is_file()
    sizes = split_sizes(N)
    for split, n in sizes.items():
        assert len(caps.select(split)) == n
    flat, owner = caps.select("test").flatten(5)
    assert len(flat) == 5 * sizes["test"] and owner[:6] == [0, 0, 0, 0, 0, 1]
    entry = karpathy["images"][0]
    assert entry["filepath"] == "" and entry["sentids"] == [0, 1, 2, 3, 4]
    assert entry["sentences"][0]["tokens"] == tokenize(entry["sentences"][0]["raw"])


def test_instances_load_with_pycocotools(dataset: Path, karpathy: dict) -> None:
    by_name = {im["filename"]: im for im in karpathy["images"]}
    ann_ids: list[int] = []
    for split in ("train", "val", "test"):
        coco = COCO(str(dataset / f"instances_{split}.json"))
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(CATEGORIES)
        for img in coco.loadImgs(coco.getImgIds()):
            entry = by_name[img["file_name"]]
            assert entry["split"] == split and img["id"] == entry["imgid"]
            with Image.open(dataset / "images" / img["file_name"]) as pil:
                assert pil.size == (img["width"], img["height"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert [a["bbox"] for a in anns] == [o["bbox"] for o in entry["objects"]]
            for a, o in zip(anns, entry["objects"], strict=True):
                assert coco.loadCats(a["category_id"])[0]["name"] == o["category"]
                assert a["iscrowd"] == 0 and 0 < a["area"] <= a["bbox"][2] * a["bbox"][3]
            ann_ids += [a["id"] for a in anns]
    assert len(ann_ids) == len(set(ann_ids)), "annotation ids must be unique across splits"


def test_boxes_inside_images_and_barely_overlapping(karpathy: dict) -> None:
    for im in karpathy["images"]:
        boxes = [o["bbox"] for o in im["objects"]]
        assert 3 <= len(boxes) <= 6
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= im["width"] and y + h <= im["height"]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert overlap(tuple(a), tuple(b)) <= scenes_mod._MAX_OVERLAP


@pytest.mark.parametrize("category", CATEGORIES)
def test_shapes_are_cropped_tight(category: str) -> None:
    rng = np.random.default_rng(0)
    for side in (24.0, 80.0):
        for colour in ("white", "black", "red"):
            alpha = np.asarray(draw_shape(category, side, colour, rng).getchannel("A")) > 0
            assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()
            assert alpha.mean() > 0.2, "a shape must fill a fair part of its box"


def test_objects_are_drawn_where_their_boxes_are(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[str, Image.Image]] = []

    def recording(category, side, colour, rng):
        layer = draw_shape(category, side, colour, rng)
        drawn.append((category, layer))
        return layer

    monkeypatch.setattr(scenes_mod, "draw_shape", recording)
    for index in range(4):  # coloured shapes and drawings of things, in several settings
        drawn.clear()
        scene, image = make_scene(3, index)
        pixels = np.asarray(image).astype(int)
        for k, obj in enumerate(scene.objects):
            x, y, w, h = obj.bbox
            (layer,) = [lay for c, lay in drawn if c == obj.category and lay.size == (w, h)][-1:]
            rgba = np.asarray(layer).astype(int)
            opaque = rgba[..., 3] == 255
            for later in scene.objects[k + 1 :]:  # drawn on top: not this object's pixels
                lx, ly, lw, lh = later.bbox
                opaque[
                    max(ly - y, 0) : max(ly + lh - y, 0), max(lx - x, 0) : max(lx + lw - x, 0)
                ] = 0
            shown = pixels[y : y + h, x : x + w][opaque]
            assert opaque.sum() >= 0.2 * obj.area, f"{obj.category} hidden"
            assert np.array_equal(shown, rgba[..., :3][opaque]), f"{obj.category} not in its box"
            if obj.colour:
                fill = np.abs(rgba[..., :3] - np.array(COLOURS[obj.colour])).sum(-1) < 40
                assert (fill & opaque).sum() >= 0.2 * obj.area, f"{obj.category} not {obj.colour}"


def test_exactly_five_distinct_captions(karpathy: dict) -> None:
    for im in karpathy["images"]:
        raws = [s["raw"].lower().rstrip(".") for s in im["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5


def test_every_mention_is_grounded(karpathy: dict) -> None:
    for im in karpathy["images"]:
        objs = im["objects"]
        for s in im["sentences"]:
            assert s["mentions"], s["raw"]
            assert all(0 <= i < len(objs) for i in s["mentions"])
            named = {WORD_TO_CATEGORY[t] for t in s["tokens"] if t in WORD_TO_CATEGORY}
            assert named == {objs[i]["category"] for i in s["mentions"]}, s["raw"]
            for i in s["mentions"]:  # its colour is named too ("snow-white" -> "white")
                if not objs[i]["colour"]:  # a drawing of a real thing: no colour
                    continue
                colour_tokens = {tokenize(w)[-1] for w in COLOUR_WORDS[objs[i]["colour"]]}
                assert colour_tokens & set(s["tokens"]), s["raw"]


def test_relations_follow_the_boxes(karpathy: dict) -> None:
    count = 0
    for im in karpathy["images"]:
        boxes = [o["bbox"] for o in im["objects"]]
        for s in im["sentences"]:
            for a, rel, b in s["relations"]:
                assert a in s["mentions"] and b in s["mentions"]
                (ax, ay, aw, ah), (bx, by, bw, bh) = boxes[a], boxes[b]
                acx, acy, bcx, bcy = ax + aw / 2, ay + ah / 2, bx + bw / 2, by + bh / 2
                assert rel == relation(tuple(boxes[a]), tuple(boxes[b]), im["width"])
                assert {
                    "left of": acx < bcx,
                    "right of": acx > bcx,
                    "above": acy < bcy,
                    "below": acy > bcy,
                    "next to": True,
                }[rel], (s["raw"], boxes[a], boxes[b])
                count += 1
    assert count > 0


def test_relation_geometry() -> None:
    assert relation((0, 0, 10, 10), (100, 0, 10, 10), 320) == "left of"
    assert relation((100, 0, 10, 10), (0, 0, 10, 10), 320) == "right of"
    assert relation((0, 0, 10, 10), (5, 100, 10, 10), 320) == "above"
    assert relation((5, 100, 10, 10), (0, 0, 10, 10), 320) == "below"
    assert relation((0, 0, 10, 10), (14, 2, 10, 10), 320) == "next to"


def test_salient_objects_recur_and_some_objects_go_unmentioned(karpathy: dict) -> None:
    counts: dict[str, list[int]] = {"salient": [], "minor": [], "background": []}
    for im in karpathy["images"]:
        per_object = Counter(i for s in im["sentences"] for i in s["mentions"])
        sizes = [o["bbox"][2] * o["bbox"][3] for o in im["objects"]]
        unmentioned = [k for k in range(len(im["objects"])) if per_object[k] == 0]
        assert unmentioned, "every scene needs a non-significant (unmentioned) object"
        for k, o in enumerate(im["objects"]):
            counts[o["role"]].append(per_object[k])
            if o["role"] == "salient":  # salient = large, larger than every small object
                assert o["size"] == "large"
        big = max(range(len(sizes)), key=sizes.__getitem__)
        assert im["objects"][big]["role"] == "salient"
    mean = {r: sum(v) / len(v) for r, v in counts.items()}
    assert mean["salient"] >= 4.0 and mean["background"] == 0.0
    assert mean["salient"] > 2 * mean["minor"] > 0


def test_scenes_are_distinguishable(karpathy: dict) -> None:
    sets = Counter(
        frozenset((o["category"], o["colour"]) for o in im["objects"]) for im in karpathy["images"]
    )
    assert max(sets.values()) == 1
    mentioned = Counter(
        frozenset(
            (im["objects"][i]["category"], im["objects"][i]["colour"])
            for s in im["sentences"]
            for i in s["mentions"]
        )
        for im in karpathy["images"]
    )
    assert sum(v for v in mentioned.values() if v > 1) <= 2


def test_captions_vary_in_wording(karpathy: dict) -> None:
    openings = Counter(
        " ".join(s["tokens"][:2]) for im in karpathy["images"] for s in im["sentences"]
    )
    assert len(openings) >= 10
    assert max(openings.values()) < 0.3 * 5 * N


def test_write_captions_needs_a_salient_object() -> None:
    obj = SceneObject("ball", "red", "small", (0, 0, 10, 10), "minor", 50)
    with pytest.raises(ValueError, match="salient"):
        write_captions(np.random.default_rng(0), [obj], 320, 240, "striped")


def test_split_sizes() -> None:
    assert split_sizes(3) == {"train": 1, "val": 1, "test": 1}
    assert split_sizes(1000) == {"train": 800, "val": 100, "test": 100}
    with pytest.raises(ValueError, match="at least 3"):
        split_sizes(2)


def test_interrupted_run_leaves_no_captions_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_dataset(tmp_path, 4, seed=0)
    assert (tmp_path / "captions.json").is_file()
    real = scenes_mod.render_scene

    def failing(task: tuple) -> scenes_mod.Scene:
        if task[1] == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(scenes_mod, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, 4, seed=1)
    assert not (tmp_path / "captions.json").exists()
    assert not list(tmp_path.glob("instances_*.json"))
    assert not list(tmp_path.rglob("*.tmp"))
