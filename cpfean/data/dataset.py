"""Datasets that pair a region store with a caption source, and their batch collation.

A training item is one caption with its image's regions; the image's index rides along so
the loss does not treat two captions of the same image as negatives of each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cpfean.data.region_store import RegionRecord, RegionStore
from cpfean.recurrence import sibling_token_ids


@dataclass
class RegionBatch:
    """Model-ready image inputs for B images with R region slots.

    features [B, R, D] float32; boxes [B, R, 4] xyxy normalised to [0, 1] by image size
    (zeros where the store has no boxes); labels [B, R] long (-1 = padding or unknown);
    scores [B, R] float32; mask [B, R] bool (valid regions).
    """

    features: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RegionBatch:
        return RegionBatch(*(t.to(device, non_blocking=non_blocking) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.features, self.boxes, self.labels, self.scores, self.mask)

    def pin_memory(self) -> RegionBatch:
        return RegionBatch(*(t.pin_memory() for t in self.as_tuple()))

    @classmethod
    def from_records(cls, records: Sequence[RegionRecord]) -> RegionBatch:
        """Stack store records (boxes normalised by each image's size) into one batch."""
        return collate_regions([record_arrays(r) for r in records])

    def trimmed(self) -> RegionBatch:
        """The slots up to the batch's last valid region (at least one): the rest are padding
        that every layer masks, so dropping them changes no output and saves their compute."""
        valid = self.mask.any(dim=0).nonzero()
        span = int(valid[-1]) + 1 if len(valid) else min(1, self.mask.shape[1])
        return RegionBatch(*(t[:, :span] for t in self.as_tuple()))


def record_arrays(record: RegionRecord) -> dict[str, np.ndarray]:
    """One record as model-ready arrays (boxes normalised by the original image size)."""
    h, w = record.image_hw
    boxes = record.boxes.astype(np.float32)
    if h > 0 and w > 0:
        boxes = boxes / np.array([w, h, w, h], dtype=np.float32)
    else:  # imported precomputed features carry no geometry
        boxes = np.zeros_like(boxes)
    return {  # a record's arrays already have these dtypes: no copies (the loader's hot path)
        "features": np.asarray(record.features, dtype=np.float32),
        "boxes": np.clip(boxes, 0.0, 1.0),
        "labels": np.asarray(record.labels, dtype=np.int64),
        "scores": np.asarray(record.scores, dtype=np.float32),
        "mask": record.mask,
    }


def collate_regions(items: Sequence[dict[str, np.ndarray]]) -> RegionBatch:
    return RegionBatch(
        *(
            torch.from_numpy(np.stack([it[k] for it in items]))
            for k in ("features", "boxes", "labels", "scores", "mask")
        )
    )


class ImageDataset(Dataset):
    """The regions of ``image_ids`` in order (for encoding a gallery)."""

    def __init__(self, store: RegionStore, image_ids: Sequence[str]):
        self.store = store
        self.image_ids = list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return record_arrays(self.store[self.image_ids[i]])


class CaptionPairDataset(Dataset):
    """Every caption of every image, each paired with its image's regions.

    Args:
        store: the region store holding every id in ``image_ids``.
        image_ids: images of this split, in order.
        captions: ``captions[i]`` are the captions of ``image_ids[i]``.
    """

    def __init__(
        self, store: RegionStore, image_ids: Sequence[str], captions: Sequence[Sequence[str]]
    ):
        if len(image_ids) != len(captions):
            raise ValueError(f"{len(image_ids)} images but {len(captions)} caption lists")
        self.store = store
        self.image_ids = list(image_ids)
        self.pairs = [(i, c) for i, caps in enumerate(captions) for c in caps]
        # Per image, its captions: the prominence target counts words recurring across them.
        self.captions = [list(caps) for caps in captions]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        image_index, caption = self.pairs[k]
        item = record_arrays(self.store[self.image_ids[image_index]])
        item["caption"] = caption
        item["image_index"] = image_index
        item["siblings"] = self.captions[image_index]
        return item


class PairCollator:
    """Collates caption pairs: regions stacked, captions tokenised by ``tokenize``.

    ``tokenize(list[str]) -> {"input_ids": [C, L], "attention_mask": [C, L]}``. With
    ``with_siblings``, also the token ids of each caption's sibling captions
    (``sibling_ids [C, S, T]``, for the word-prominence targets).
    """

    def __init__(
        self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]], with_siblings: bool = False
    ):
        self.tokenize = tokenize
        self.with_siblings = with_siblings

    def __call__(self, items: Sequence[dict]) -> dict:
        captions = [it["caption"] for it in items]
        tokens = self.tokenize(captions)
        batch = {
            # most images fill far fewer than R slots; trimmed here, on the host, the device
            # never waits to learn the batch's width
            "regions": collate_regions(items).trimmed(),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_index": torch.tensor([it["image_index"] for it in items]),
        }
        if self.with_siblings:
            batch["sibling_ids"] = sibling_token_ids(
                self.tokenize, [it["siblings"] for it in items], captions
            )
        return batch
