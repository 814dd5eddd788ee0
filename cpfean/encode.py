"""Store records and captions -> the model's cacheable embeddings, batch by batch.

The one place that turns regions and text into ``ImageEmbeddings`` / ``TextEmbeddings``:
evaluation, the index build, search, the diagnostics and the benchmarks all encode through it.
``Matcher`` is the interface they need of a model (``CPFEAN`` has it; so does the stand-in the
index tests use).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from cpfean.data.dataset import ImageDataset, RegionBatch, collate_regions
from cpfean.data.region_record import RegionRecord
from cpfean.data.region_store import RegionStore
from cpfean.progress import progress as progress_of

__all__ = ["Matcher", "encode_captions", "encode_records", "encode_store"]


class Matcher(Protocol):
    """What encoding, indexing and search need of a matching model."""

    max_words: int

    def tokenize(
        self, texts: list[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]: ...

    def encode_images(self, regions: RegionBatch): ...

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor): ...

    def score(
        self, img, txt, image_chunk: int = 32, text_chunk: int = 128, return_details: bool = False
    ): ...


class RecordSource(Protocol):
    """What indexing reads of a region store (`cpfean.data.region_store.RegionStore`, or a
    synthetic gallery): its records by id. A store may also offer ``fingerprint()`` (its
    content's digest, for the build key) and ``digests(ids)`` (each record's, for updates)."""

    path: Any
    meta: dict

    def ids(self) -> list[str]: ...

    def __getitem__(self, image_id: str) -> RegionRecord: ...


def _cat(parts: list):
    return parts[0] if len(parts) == 1 else type(parts[0]).cat(parts)


@torch.no_grad()
def encode_records(
    model: Matcher,
    records: Sequence[RegionRecord],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
):
    """The ImageEmbeddings of ``records`` (in order), ``batch_size`` images at a time."""
    if not records:
        raise ValueError("no records to encode")
    return _cat(
        [
            model.encode_images(
                RegionBatch.from_records(records[start : start + batch_size]).to(device)
            )
            for start in range(0, len(records), batch_size)
        ]
    )


@torch.no_grad()
def encode_store(
    model: Matcher,
    store: RegionStore,
    image_ids: Sequence[str],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
):
    """The ImageEmbeddings of ``image_ids`` of a region store (in order)."""
    loader = DataLoader(
        ImageDataset(store, image_ids),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_regions,
    )
    batches: Iterator[RegionBatch] = progress_of(
        loader, desc="encode images", unit="batch", enabled=progress, leave=False
    )
    return _cat([model.encode_images(batch.to(device)) for batch in batches])


@torch.no_grad()
def encode_captions(
    model: Matcher,
    captions: Sequence[str],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = False,
):
    """The TextEmbeddings of ``captions`` (in order)."""
    parts = []
    steps = range(0, len(captions), batch_size)
    for start in progress_of(
        steps, desc="encode captions", unit="batch", enabled=progress, leave=False
    ):
        tokens = model.tokenize(list(captions[start : start + batch_size]))
        parts.append(
            model.encode_texts(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        )
    return _cat(parts)
