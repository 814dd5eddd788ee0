"""Image walking and decoding: every bad-input kind is converted or skipped with a reason."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from detector.data import BadImage, ImageFolder, decode_image, list_images, shard


def _rgb(h: int = 40, w: int = 60) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 30
    img[:10, :10] = (10, 220, 90)
    return img


def test_list_images_recursive_case_insensitive_sorted_posix(tmp_path):
    for rel in [
        "b.JPG",
        "a/c.png",
        "a/d/e.JpEg",
        "x.webp",
        "y.bmp",
        "notes.txt",
        "z.gif",
        ".hidden.jpg",
        ".cache/f.jpg",
    ]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    ids = list_images(tmp_path)
    assert ids == ["a/c.png", "a/d/e.JpEg", "b.JPG", "x.webp", "y.bmp"]
    assert shard(ids, 0, 2) == ["a/c.png", "b.JPG", "y.bmp"]
    assert sorted(shard(ids, 0, 2) + shard(ids, 1, 2)) == ids
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "b.JPG")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_plain_formats_decode_to_rgb8(tmp_path, fmt):
    path = tmp_path / f"i.{fmt.lower()}"
    Image.fromarray(_rgb()).save(path, format=fmt, **({"quality": 95} if fmt != "BMP" else {}))
    out = decode_image(path)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert np.abs(out[20:, 20:].astype(int) - (200, 100, 30)).max() <= 6


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_converted_kinds(tmp_path):
    base = Image.fromarray(_rgb())
    # grayscale
    out = decode_image(_save(base.convert("L"), tmp_path / "g.png"))
    assert out.shape == (40, 60, 3) and (out[..., 0] == out[..., 1]).all()
    # CMYK JPEG
    out = decode_image(_save(base.convert("CMYK"), tmp_path / "c.jpg", quality=95))
    assert out.shape == (40, 60, 3)
    assert np.abs(out[20:, 20:].astype(int) - (200, 100, 30)).max() <= 12
    # palette, and palette with a transparent index
    out = decode_image(_save(base.convert("P"), tmp_path / "p.png"))
    assert out.shape == (40, 60, 3)
    pal = base.convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    assert decode_image(_save(pal, tmp_path / "pt.png")).shape == (40, 60, 3)
    # RGBA: transparent pixels become white, opaque ones keep their colour
    rgba = np.dstack([_rgb(), np.full((40, 60), 255, np.uint8)])
    rgba[:, 30:, 3] = 0
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert (out[:, 30:] == 255).all() and (out[20:, 20:30] == (200, 100, 30)).all()
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    assert decode_image(_save(la, tmp_path / "la.png")).shape == (40, 60, 3)
    # 16-bit grayscale and 16-bit colour PNG: the high byte is kept
    g16 = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 27).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    out = decode_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and (out[..., 0] == (g16 >> 8)).all()
    c16 = (_rgb().astype(np.uint16) * 257)[:, :, ::-1]  # BGR for cv2
    cv2.imwrite(str(tmp_path / "c16.png"), c16)
    out = decode_image(tmp_path / "c16.png")
    assert (out == _rgb()).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(_rgb(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    assert decode_image(tmp_path / "r.jpg").shape == (60, 40, 3)


def test_bad_kinds_raise_with_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="empty file"):
        decode_image(tmp_path / "empty.jpg")
    (tmp_path / "text.png").write_text("this is not an image\n")
    with pytest.raises(BadImage, match="not an image"):
        decode_image(tmp_path / "text.png")
    buf = io.BytesIO()
    Image.fromarray(_rgb(200, 300)).save(buf, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="truncated"):
        decode_image(tmp_path / "trunc.jpg")
    buf2 = io.BytesIO()
    Image.fromarray(_rgb(200, 300)).save(buf2, format="PNG")
    png = bytearray(buf2.getvalue())
    png[60:80] = b"\xff" * 20  # corrupt IDAT: the CRC/zlib check fails
    (tmp_path / "corrupt.png").write_bytes(bytes(png))
    with pytest.raises(BadImage, match="corrupt"):
        decode_image(tmp_path / "corrupt.png")
    Image.fromarray(_rgb()).save(tmp_path / "big.png")
    with pytest.raises(BadImage, match="too large"):
        decode_image(tmp_path / "big.png", max_pixels=1000)
    with pytest.raises(BadImage, match="unreadable"):
        decode_image(tmp_path / "missing.png")


def test_image_folder_never_raises(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolder(tmp_path, ["ok.png", "bad.jpg"])
    ok, bad = ds[0], ds[1]
    assert ok.error is None and ok.image.shape == (40, 60, 3)
    assert bad.image is None and bad.error
