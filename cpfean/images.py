"""Reading image files: which files are images, and one decoding policy for every stage.

Every image reaches a model as 8-bit RGB, or is refused with a reason:

- Pillow opens only the formats in `PIL_FORMATS` (whatever the file's extension), so a file
  from a stranger never reaches one of Pillow's rarer decoders.
- EXIF orientation is applied (as viewers and `cv2.imread` do); boxes and `image_hw` refer to
  the upright image.
- Grayscale, palette, CMYK, 16-bit (the high byte is kept) and alpha images are converted;
  transparent pixels are composited over white.
- Refused, with the reason: zero-byte files, files that are not images (whatever their
  extension), truncated or corrupt files, and images with more than `max_pixels` pixels (checked
  from the header, before decoding, so a decompression bomb costs nothing).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cpfean.data.region_store import image_id_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # the decoders a file may reach
MAX_IMAGE_PIXELS = 50_000_000

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "PIL_FORMATS",
    "BadImage",
    "decode_image",
    "decode_image_bytes",
    "list_images",
]


class BadImage(Exception):
    """An image that cannot be used; the message is the reason written to the skip report."""


def list_images(
    root: str | os.PathLike, rejected: list[tuple[str, str]] | None = None
) -> list[str]:
    """Image ids under `root`: relative POSIX paths of files with an image extension
    (case-insensitive), recursively, sorted. Hidden files and folders are left out.

    A file whose name cannot be an image id (not UTF-8, a backslash, too long for a key) is
    left out too and, when `rejected` is given, appended to it as (printable path, reason).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"images root {root} is not a directory")
    ids = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                image_id = (rel / name).as_posix()
                problem = image_id_problem(image_id)
                if problem is None:
                    ids.append(image_id)
                elif rejected is not None:
                    printable = image_id.encode("utf-8", "backslashreplace").decode("utf-8")
                    rejected.append((printable, problem))
    return sorted(ids)


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


def decode_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """`decode_image` for the bytes of an image file (an upload)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels)


def decode_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, or raise `BadImage` with the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    return _decode(path, max_pixels)


def _decode(path: Any, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise BadImage(
                        f"too large: {w}x{h} = {w * h} pixels > {max_pixels} "
                        "(REGIONS.MAX_IMAGE_PIXELS)"
                    )
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
