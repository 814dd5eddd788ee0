"""Image folders for extraction: walking, robust decoding, a Dataset for DataLoader workers.

Decoding policy (every image reaches the detector as 8-bit RGB, or is skipped with a reason):

- EXIF orientation is applied (as viewers and `cv2.imread` do); boxes and `image_hw` refer to
  the upright image.
- Grayscale, palette, CMYK, 16-bit (the high byte is kept) and alpha images are converted;
  transparent pixels are composited over white.
- Skipped, with the reason: zero-byte files, files that are not images (whatever their
  extension), truncated or corrupt files, and images with more than `max_pixels` pixels (checked
  from the header, before decoding, so a decompression bomb costs nothing).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

__all__ = ["IMAGE_EXTENSIONS", "BadImage", "DecodedImage", "ImageFolder", "decode_image",
           "list_images", "shard"]


class BadImage(Exception):
    """An image that cannot be used; the message is the reason written to the skip report."""


def list_images(root: str | os.PathLike) -> list[str]:
    """Image ids under `root`: relative POSIX paths of files with an image extension
    (case-insensitive), recursively, sorted. Hidden files and folders are left out."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"images root {root} is not a directory")
    ids = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                ids.append((rel / name).as_posix())
    return sorted(ids)


def shard(ids: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The disjoint share of rank `rank`: every `world_size`-th id of the sorted list."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return list(ids[rank::world_size])


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        if arr.dtype != np.uint8:
            top = int(arr.max()) if arr.size else 0
            shift = 8 if mode.startswith("I;16") else 0 if top <= 255 else 8 if top <= 65535 else 24
            arr = (arr.astype(np.int64).clip(0) >> shift).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        top = float(arr.max()) if arr.size and arr.max() > 1.0 else 1.0
        arr = (arr.clip(0) / top * 255.0).round().astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def decode_image(path: str | os.PathLike, max_pixels: int = 50_000_000) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, or raise `BadImage` with the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise BadImage(f"too large: {w}x{h} = {w * h} pixels > {max_pixels} "
                                   "(REGIONS.MAX_IMAGE_PIXELS)")
                if w < 1 or h < 1:
                    raise BadImage(f"empty image: {w}x{h}")
                im.load()  # raises on truncated or corrupt data
                im = ImageOps.exif_transpose(im)
                return _to_rgb8(im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated: {e}") from None


@dataclass
class DecodedImage:
    """One item of `ImageFolder`: the RGB pixels [H, W, 3] uint8, or the skip reason."""

    image_id: str
    image: np.ndarray | None
    error: str | None = None


class ImageFolder(Dataset):
    """Decodes the given ids under `root` (in DataLoader workers); never raises on bad files.

    Use with ``DataLoader(..., collate_fn=list)``.
    """

    def __init__(self, root: str | os.PathLike, ids: Sequence[str],
                 max_pixels: int = 50_000_000):
        self.root = Path(root)
        self.ids = list(ids)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> DecodedImage:
        image_id = self.ids[index]
        try:
            return DecodedImage(image_id, decode_image(self.root / image_id, self.max_pixels))
        except BadImage as e:
            return DecodedImage(image_id, None, str(e))
        except Exception as e:  # noqa: BLE001 - one odd file must not stop a long run
            return DecodedImage(image_id, None, f"decode failed: {type(e).__name__}: {e}")
