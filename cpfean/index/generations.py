"""An index's generations: each build writes a new folder ``gen-NNNNNN`` that a replaced
``index.json`` then names, and an update carries the rows of unchanged images over from the
generation it replaces (layout and guarantees: ``cpfean.index``)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cpfean.fileio import atomic_path

GENERATION = "gen-{:06d}"
DIGESTS_FILE = "digests.npy"  # [N] the region store's digest of each image's record
CODEC_FILE = "codec.npy"
# written afresh by every build, never carried over row by row
_NOT_ROWS = (CODEC_FILE, "offsets.npy", DIGESTS_FILE)
# what a build may find in (and so replace) an index folder: index.json, the arrays of an index
# from before generations, generation folders, and the temporary files of a killed build
_INDEX_ENTRIES = {"index.json", "images", "captions"}


def is_index_entry(name: str) -> bool:
    """Whether a name in an index folder is one an index build writes."""
    return (
        name in _INDEX_ENTRIES
        or (name.startswith("gen-") and name[4:].isdigit())
        or (name.startswith(".index.json.") and name.endswith(".tmp"))
    )


@dataclasses.dataclass(frozen=True)
class PreviousIndex:
    """The index a build replaces: its generation folder, meta, ids and record digests."""

    data: Path
    generation: str | None
    meta: dict
    ids: list[str]
    digests: np.ndarray | None

    @property
    def number(self) -> int:
        name = self.generation or ""
        return int(name[4:]) if name.startswith("gen-") and name[4:].isdigit() else 0

    @classmethod
    def read(cls, out: Path) -> PreviousIndex | None:
        """The index at ``out`` (None when there is none, or it cannot be read)."""
        try:
            meta = json.loads((out / "index.json").read_text(encoding="utf-8"))
            generation = meta.get("generation")
            data = out / generation if generation else out
            ids = json.loads((data / "images" / "ids.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        digests_path = data / "images" / DIGESTS_FILE
        digests = np.load(digests_path, allow_pickle=False) if digests_path.is_file() else None
        return cls(data, generation, meta, ids, digests)

    def updatable_by(
        self,
        checkpoint_sha256: str,
        dtype: str,
        codec: str | None,
        exact_copy: bool,
        images_root: str | None,
    ) -> bool:
        """Whether a build with these settings may keep this index's rows: the same model,
        dtype, codec and images root, and digests to tell unchanged records by."""
        meta, spec = self.meta, self.meta.get("image_embeddings") or {}
        kept_codec = spec.get("codec") or {}
        return (
            self.digests is not None
            and len(self.digests) == len(self.ids) == meta.get("count")
            and meta.get("checkpoint", {}).get("sha256") == checkpoint_sha256
            and meta.get("dtype") == dtype
            and kept_codec.get("factory") == codec
            and bool(kept_codec.get("exact_copy")) == exact_copy
            and meta.get("images_root") == images_root
        )

    def captions_for(
        self,
        captions: Sequence[str],
        image_ids: Sequence[str] | None,
        checkpoint_sha256: str,
        dtype: str,
    ) -> dict | None:
        """This index's caption entry when it encoded exactly these captions with this model."""
        spec = self.meta.get("captions")
        if (
            not spec
            or self.meta.get("checkpoint", {}).get("sha256") != checkpoint_sha256
            or self.meta.get("dtype") != dtype
        ):
            return None
        try:
            texts = json.loads((self.data / "captions" / "texts.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        owners = list(image_ids) if image_ids is not None else [""] * len(captions)
        same = texts.get("captions") == list(captions) and texts.get("image_ids") == owners
        return spec if same else None


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    """Where each image of the new gallery comes from: ``old_row[i]`` of the previous index
    (its record unchanged), else row ``new_row[i]`` of the images encoded now (``todo``)."""

    old_row: np.ndarray
    new_row: np.ndarray
    todo: list[str]
    removed: int

    @property
    def kept(self) -> np.ndarray:
        return self.old_row >= 0

    @property
    def counts(self) -> dict[str, int]:
        return {"encoded": len(self.todo), "removed": self.removed, "kept": int(self.kept.sum())}

    @classmethod
    def of(cls, previous: PreviousIndex, ids: Sequence[str], digests: Sequence[str]) -> UpdatePlan:
        assert previous.digests is not None
        position = {image_id: k for k, image_id in enumerate(previous.ids)}
        old_row = np.full(len(ids), -1, dtype=np.int64)
        for k, (image_id, digest) in enumerate(zip(ids, digests, strict=True)):
            j = position.get(image_id, -1)
            if j >= 0 and previous.digests[j].decode() == digest:
                old_row[k] = j
        kept = old_row >= 0
        todo = [image_id for image_id, keep in zip(ids, kept, strict=True) if not keep]
        new_row = np.where(kept, -1, np.cumsum(~kept) - 1)
        return cls(old_row, new_row, todo, len(set(previous.ids) - set(ids)))


def carry_rows(before: Path, delta: Path, dest: Path, plan: UpdatePlan) -> None:
    """Write the new gallery's arrays into ``dest``: each row from the previous generation's
    arrays (``before``) or from those of the images encoded now (``delta``); the ragged ones
    (codes, per-region fields) image by image through both indexes' offsets."""
    kept, old_row, new_row = plan.kept, plan.old_row, plan.new_row
    names = [p.name[:-4] for p in before.glob("*.npy") if p.name not in _NOT_ROWS]
    ragged = [n for n in names if n.startswith("ragged.") or n == "codes"]
    for name in (n for n in names if n not in ragged):
        merge_rows(
            dest / f"{name}.npy",
            before / f"{name}.npy",
            delta / f"{name}.npy",
            kept,
            np.where(kept, old_row, new_row),
        )
    if not ragged:
        return
    old_offsets = np.load(before / "offsets.npy", allow_pickle=False)
    new_offsets = offsets(delta / "emb.mask.npy") if plan.todo else np.zeros(2, np.int64)
    from_old, from_new = np.maximum(old_row, 0), np.maximum(new_row, 0)
    counts = np.where(kept, np.diff(old_offsets)[from_old], np.diff(new_offsets)[from_new])
    starts = np.where(kept, old_offsets[:-1][from_old], new_offsets[:-1][from_new])
    out_offsets = np.concatenate([[0], np.cumsum(counts)])
    row_from_old = np.repeat(kept, counts)
    rows = np.repeat(starts - out_offsets[:-1], counts) + np.arange(out_offsets[-1])
    for name in ragged:
        merge_rows(
            dest / f"{name}.npy", before / f"{name}.npy", delta / f"{name}.npy", row_from_old, rows
        )


def offsets(mask_path: Path) -> np.ndarray:
    """[N + 1] start of each image's regions in the ragged arrays, from the padded mask."""
    mask = np.load(mask_path, mmap_mode="r")
    counts = [mask[s : s + 65536].sum(1) for s in range(0, len(mask), 65536)]
    return np.cumsum(np.concatenate([[0], *counts]), dtype=np.int64)


def merge_rows(
    dest: Path, old: Path, new: Path, from_old: np.ndarray, rows: np.ndarray, chunk: int = 65536
) -> None:
    """``dest[r] = (old if from_old[r] else new)[rows[r]]``, written in chunks."""
    a = np.load(old, mmap_mode="r")
    b = np.load(new, mmap_mode="r") if new.is_file() else a[:0]
    with atomic_path(dest) as tmp:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=a.dtype, shape=(len(rows), *a.shape[1:])
        )
        for s in range(0, len(rows), chunk):
            take, at = from_old[s : s + chunk], rows[s : s + chunk]
            block = np.empty((len(at), *a.shape[1:]), dtype=a.dtype)
            block[take] = a[at[take]]
            block[~take] = b[at[~take]]
            out[s : s + len(at)] = block
        out.flush()
        del out


def link_tree(src: Path, dest: Path) -> None:
    """``dest`` holding the files of ``src``: hard links where the disk allows, else copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        try:
            os.link(path, dest / path.name)
        except OSError:
            shutil.copyfile(path, dest / path.name)


def drop_generations(out: Path, keep: set[str | None]) -> None:
    """Remove the generations a build left behind, but the new one and the one it replaced
    (a server may still be answering from that one); arrays from before generations count
    as the generation None."""
    for path in out.iterdir():
        name = path.name
        if name.startswith("gen-") and name not in keep:
            shutil.rmtree(path, ignore_errors=True)
        elif name in ("images", "captions") and None not in keep:
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".index.json.") and name.endswith(".tmp"):
            path.unlink(missing_ok=True)
