"""Caption sources: read captions from the usual file formats and key them by image id.

An image id is the image's path relative to the images root, with POSIX separators; it is the
key of the region store. Supported formats (`load_captions` detects them):

- Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`, the bundled scenes'
  `captions.json`): `{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}`.
  Image id = `filepath + "/" + filename`, or `filename` when `filepath` is absent or empty
  (Flickr30K, the bundled scenes). With `fold_restval=True` (the default, as SCAN/VSE++ train
  on COCO) the `restval` images count as `train`.
- COCO caption annotations (`captions_train2014.json`): `images[{id, file_name}]`,
  `annotations[{image_id, caption}]`. Image id = `file_name`; no split information.
- JSONL, one `{"image": ..., "caption": ...}` per line (optional `"split"`).
- CSV with header `image,caption` (optional `split` column).

An image may belong to several splits (COCO's published `test` is a part of `testall`): it is
then listed once per split, each time with the captions given for that split.

`image_prefix` is joined in front of every id (e.g. `"train2014"` so that COCO caption files
agree with Karpathy ids). Captions are stripped of surrounding whitespace. An empty or
whitespace-only caption is an error naming the file and the line or image, unless
`skip_empty=True`, which drops it with a warning.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CaptionSet", "MissingImagesError", "check_ids", "load_captions"]

FORMATS = ("karpathy", "coco", "jsonl", "csv")


class MissingImagesError(KeyError):
    """Caption image ids that the region store (or images folder) does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class CaptionSet:
    """Captions grouped by image, in file order.

    `captions[i]` are the captions of `image_ids[i]`; `splits[i]` its split ("train", "val",
    "test", ...) or None when the source has no split information.
    """

    image_ids: list[str]  # image path relative to the images root, POSIX separators
    captions: list[list[str]]  # per image, at least one caption each
    splits: list[str | None]  # per image
    source: str = ""  # the file the captions came from, for error messages

    def __post_init__(self) -> None:
        if not len(self.image_ids) == len(self.captions) == len(self.splits):
            raise ValueError(
                f"{self.source}: image_ids, captions and splits differ in length "
                f"({len(self.image_ids)}, {len(self.captions)}, {len(self.splits)})"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    def head(self, n: int) -> CaptionSet:
        """The first ``n`` images (all when ``n`` is 0 or at least their number)."""
        if n <= 0 or n >= len(self):
            return self
        keep = slice(0, n)
        return CaptionSet(self.image_ids[keep], self.captions[keep], self.splits[keep], self.source)

    def select(self, split: str) -> CaptionSet:
        """The images of one split, in file order. Fails if the split is absent or unknown."""
        if all(s is None for s in self.splits):
            raise ValueError(
                f"{self.source}: has no split information, cannot select "
                f"split {split!r}; load it without a split"
            )
        keep = [i for i, s in enumerate(self.splits) if s == split]
        if not keep:
            present = sorted({s for s in self.splits if s is not None})
            raise ValueError(
                f"{self.source}: no images in split {split!r}; splits present: {present}"
            )
        return CaptionSet(
            [self.image_ids[i] for i in keep],
            [self.captions[i] for i in keep],
            [self.splits[i] for i in keep],
            self.source,
        )

    def flatten(self, per_image: int | None = 5) -> tuple[list[str], list[int]]:
        """All captions in one list, with the index of each caption's image.

        Args:
            per_image: exactly this many captions per image, so captions `k*i .. k*i+k-1`
                belong to image i (the evaluation protocol uses 5): extra captions are dropped
                (the first `per_image` are kept, as the field does) and an image with fewer
                is an error naming it. None keeps every caption.

        Returns:
            (captions, owner) where `owner[j]` is the index of caption j's image.
        """
        flat: list[str] = []
        owner: list[int] = []
        for i, (image_id, caps) in enumerate(zip(self.image_ids, self.captions, strict=True)):
            if per_image is not None:
                if len(caps) < per_image:
                    raise ValueError(
                        f"{self.source}: image {image_id!r} has {len(caps)} "
                        f"captions, {per_image} are required"
                    )
                caps = caps[:per_image]
            flat.extend(caps)
            owner.extend([i] * len(caps))
        return flat, owner


def check_ids(caption_set: CaptionSet, available_ids: Iterable[str]) -> None:
    """Raise `MissingImagesError` listing (up to 10 of) the caption image ids not available."""
    available = set(available_ids)
    missing = [i for i in caption_set.image_ids if i not in available]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        more = " (first 10 shown)" if len(missing) > 10 else ""
        source = caption_set.source or "captions"
        raise MissingImagesError(
            f"{len(missing)} of {len(caption_set)} image ids from {source} are missing from the "
            f"{len(available)} available ids{more}: {shown}"
        )


def _norm_id(image: object, prefix: str, where: str) -> str:
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{where}: image must be a non-empty string, got {image!r}")
    path = image.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise ValueError(f"{where}: image {image!r} must be relative to the images root")
    return f"{prefix.strip('/')}/{path}" if prefix.strip("/") else path


class _Builder:
    """Collects (image, caption) pairs in first-seen (image, split) order, checking captions."""

    def __init__(self, source: str, skip_empty: bool) -> None:
        self.source, self.skip_empty = source, skip_empty
        self.index: dict[tuple[str, str | None], int] = {}
        self.ids: list[str] = []
        self.caps: list[list[str]] = []
        self.splits: list[str | None] = []
        self.skipped = 0

    def add_image(self, image_id: str, split: str | None, where: str) -> int:
        if (image_id, split) in self.index:
            return self.index[image_id, split]
        self.index[image_id, split] = len(self.ids)
        self.ids.append(image_id)
        self.caps.append([])
        self.splits.append(split)
        return len(self.ids) - 1

    def add_caption(self, j: int, caption: object, where: str) -> None:
        if not isinstance(caption, str):
            raise ValueError(f"{where}: caption must be a string, got {caption!r}")
        text = caption.strip()
        if not text:
            if not self.skip_empty:
                raise ValueError(
                    f"{where}: empty caption for image {self.ids[j]!r} "
                    f"(pass skip_empty=True to drop empty captions)"
                )
            self.skipped += 1
            return
        self.caps[j].append(text)

    def build(self) -> CaptionSet:
        keep = [j for j, c in enumerate(self.caps) if c]
        if self.skipped:
            warnings.warn(f"{self.source}: skipped {self.skipped} empty captions", stacklevel=3)
        empty = [self.ids[j] for j, c in enumerate(self.caps) if not c]
        if empty:
            warnings.warn(
                f"{self.source}: dropped {len(empty)} images without captions "
                f"(first: {empty[0]!r})",
                stacklevel=3,
            )
        return CaptionSet(
            [self.ids[j] for j in keep],
            [self.caps[j] for j in keep],
            [self.splits[j] for j in keep],
            self.source,
        )


def _read_karpathy(data: dict, b: _Builder, prefix: str, fold_restval: bool) -> None:
    for k, img in enumerate(data["images"]):
        where = f"{b.source}: images[{k}]"
        if not isinstance(img, dict) or "filename" not in img or "sentences" not in img:
            raise ValueError(f"{where}: needs 'filename' and 'sentences'")
        folder = (img.get("filepath") or "").strip("/")
        name = f"{folder}/{img['filename']}" if folder else img["filename"]
        split = img.get("split")
        if fold_restval and split == "restval":
            split = "train"
        j = b.add_image(_norm_id(name, prefix, where), split, where)
        for s, sent in enumerate(img["sentences"]):
            text = sent.get("raw")
            if text is None and "tokens" in sent:
                text = " ".join(sent["tokens"])
            b.add_caption(j, text, f"{where}.sentences[{s}]")


def _read_coco(data: dict, b: _Builder, prefix: str) -> None:
    by_id: dict[object, int] = {}
    for k, img in enumerate(data["images"]):
        where = f"{b.source}: images[{k}]"
        if img["id"] in by_id:
            raise ValueError(f"{where}: duplicate image id {img['id']!r}")
        by_id[img["id"]] = b.add_image(_norm_id(img.get("file_name"), prefix, where), None, where)
    for k, ann in enumerate(data["annotations"]):
        where = f"{b.source}: annotations[{k}] (id {ann.get('id')!r})"
        if ann.get("image_id") not in by_id:
            raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        b.add_caption(by_id[ann["image_id"]], ann.get("caption"), where)


def _read_jsonl(path: Path, b: _Builder, prefix: str) -> None:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            where = f"{b.source}: line {n}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise ValueError(f"{where}: needs keys 'image' and 'caption'")
            j = b.add_image(_norm_id(row["image"], prefix, where), row.get("split"), where)
            b.add_caption(j, row["caption"], where)


def _read_csv(path: Path, b: _Builder, prefix: str) -> None:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in reader.fieldnames or []]
        if "image" not in fields or "caption" not in fields:
            raise ValueError(
                f"{b.source}: the header must name columns 'image' and 'caption', got {fields}"
            )
        reader.fieldnames = fields
        for row in reader:
            where = f"{b.source}: line {reader.line_num}"
            split = (row.get("split") or "").strip() or None
            j = b.add_image(_norm_id(row["image"], prefix, where), split, where)
            b.add_caption(j, row["caption"] or "", where)


def detect_format(path: str | os.PathLike) -> str:
    """The caption format of a file: by extension (.jsonl, .csv), by contents for .json."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    with p.open(encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
    if head != "{":
        raise ValueError(
            f"{p}: cannot tell the caption format (expected a .json object, "
            f".jsonl or .csv; supported: {', '.join(FORMATS)})"
        )
    return "json"  # Karpathy or COCO, told apart once parsed


def load_captions(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    fold_restval: bool = True,
    image_prefix: str = "",
    skip_empty: bool = False,
    source_format: str | None = None,
) -> CaptionSet:
    """Load a caption source (formats and id rules in the module docstring).

    Args:
        path: the caption file.
        split: keep only this split ("train", "val", "test", "restval"); None keeps all.
        fold_restval: Karpathy only, count "restval" images as "train".
        image_prefix: folder joined in front of every image id.
        skip_empty: drop empty captions with a warning instead of failing.
        source_format: one of FORMATS, to skip detection.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"caption file not found: {p}")
    fmt = source_format or detect_format(p)
    if fmt not in (*FORMATS, "json"):
        raise ValueError(f"unknown caption format {fmt!r}; supported: {', '.join(FORMATS)}")
    b = _Builder(str(p), skip_empty)
    if fmt == "jsonl":
        _read_jsonl(p, b, image_prefix)
    elif fmt == "csv":
        _read_csv(p, b, image_prefix)
    else:
        with p.open(encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
        images = data.get("images") if isinstance(data, dict) else None
        if fmt == "json":
            if isinstance(images, list) and "annotations" in data:
                fmt = "coco"
            elif isinstance(images, list) and (not images or "sentences" in images[0]):
                fmt = "karpathy"
            else:
                raise ValueError(
                    f"{p}: JSON is neither Karpathy split format ('images' with "
                    f"'sentences') nor COCO captions ('images' and 'annotations')"
                )
        if fmt == "coco":
            _read_coco(data, b, image_prefix)
        else:
            _read_karpathy(data, b, image_prefix, fold_restval)
    captions = b.build()
    return captions.select(split) if split is not None else captions
