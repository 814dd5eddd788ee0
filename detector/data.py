"""Image folders for extraction: a Dataset that decodes in DataLoader workers, and sharding.

The decoding policy itself (formats, EXIF, modes, what is refused) is `cpfean.images`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from cpfean.images import IMAGE_EXTENSIONS, BadImage, decode_image, list_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImage",
    "DecodedImage",
    "ImageFolder",
    "decode_image",
    "file_source",
    "list_images",
    "shard",
]


def shard(ids: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The disjoint share of rank `rank`: every `world_size`-th id of the sorted list."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return list(ids[rank::world_size])


@dataclass
class DecodedImage:
    """One item of `ImageFolder`: the RGB pixels [H, W, 3] uint8, or the skip reason; the
    file's size and mtime_ns as read (how a later run knows the file changed)."""

    image_id: str
    image: np.ndarray | None
    error: str | None = None
    source: dict | None = None


def file_source(path: str | os.PathLike) -> dict:
    """What a re-run compares to know a file changed: its size and modification time (ns)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ImageFolder(Dataset):
    """Decodes the given ids under `root` (in DataLoader workers); never raises on bad files.

    Use with ``DataLoader(..., collate_fn=list)``.
    """

    def __init__(self, root: str | os.PathLike, ids: Sequence[str], max_pixels: int = 50_000_000):
        self.root = Path(root)
        self.ids = list(ids)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> DecodedImage:
        image_id = self.ids[index]
        try:
            source = file_source(self.root / image_id)  # before reading: a later write is seen
            pixels = decode_image(self.root / image_id, self.max_pixels)
            return DecodedImage(image_id, pixels, source=source)
        except BadImage as e:
            return DecodedImage(image_id, None, str(e))
        except Exception as e:  # one odd file must not stop a long run
            return DecodedImage(image_id, None, f"decode failed: {type(e).__name__}: {e}")
