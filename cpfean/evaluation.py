"""Encode a split once, score it in chunks, and apply the evaluation protocol."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cpfean.data.captions import CaptionSet
from cpfean.data.region_store import RegionStore
from cpfean.encode import encode_captions, encode_store
from cpfean.metrics import evaluate_protocol


@torch.no_grad()
def similarity_matrix(
    model,
    store: RegionStore,
    image_ids: Sequence[str],
    captions: Sequence[str],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """sims [n_images, n_captions] of ``model`` over a split."""
    with _evaluating(model):
        img, txt = _encode_split(model, store, image_ids, captions, batch_size, device, progress)
        return model.score(img, txt).float().cpu().numpy()


@contextlib.contextmanager
def _evaluating(model) -> Iterator[None]:
    """Eval mode for the block, the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _encode_split(model, store, image_ids, captions, batch_size, device, progress):
    img = encode_store(
        model, store, image_ids, batch_size=batch_size, device=device, progress=progress
    )
    txt = encode_captions(model, captions, batch_size=batch_size, device=device, progress=progress)
    return img, txt


@torch.no_grad()
def similarity_blocks(
    model,
    store: RegionStore,
    image_ids: Sequence[str],
    captions: Sequence[str],
    *,
    fold_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[np.ndarray]:
    """The diagonal blocks ``[fold_size, 5 * fold_size]`` of the similarity matrix (COCO
    5-fold 1K): every item is encoded once, and only pairs inside a fold are scored."""
    n = len(image_ids)
    if fold_size < 1 or n % fold_size or len(captions) != 5 * n:
        raise ValueError(
            f"{n} images and {len(captions)} captions do not split into folds of "
            f"{fold_size} images with 5 captions each"
        )
    with _evaluating(model):
        img, txt = _encode_split(model, store, image_ids, captions, batch_size, device, progress)
        blocks = []
        for k in range(n // fold_size):
            rows = slice(k * fold_size, (k + 1) * fold_size)
            cols = slice(5 * k * fold_size, 5 * (k + 1) * fold_size)
            blocks.append(model.score(img[rows], txt[cols]).float().cpu().numpy())
    return blocks


def evaluate_split(
    model,
    store: RegionStore,
    captions: CaptionSet,
    *,
    protocol: str = "all",
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on one split under ``protocol``; also returns the sims matrix.

    The protocol needs exactly 5 captions per image (captions 5i..5i+4 belong to image i).
    """
    flat, _ = captions.flatten(5)
    sims = similarity_matrix(
        model,
        store,
        captions.image_ids,
        flat,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    return evaluate_protocol(sims, protocol), sims
