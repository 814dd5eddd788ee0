"""Drawing retrieval results (PIL only): a PNG grid or a self-contained HTML page.

A result is a `Tile`: an image (or None when the file is missing), a few text lines (rank,
score, path or caption) and the regions to box (pixels of the original image, a label, a
weight). The query is a list of (word, prominence) pairs; the most prominent words are marked
in the title (red, bold, underlined in the PNG; ``<mark><b>`` in the HTML).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)
THUMB = 256
PAD = 8


@dataclass
class Tile:
    """One result to draw.

    image: the original image (RGB) or None; lines: text under the thumbnail; boxes: (x1, y1,
    x2, y2) in pixels of ``image`` with a label and a weight each (drawn best first).
    """

    image: Image.Image | None
    lines: list[str]
    boxes: list[tuple[tuple[float, float, float, float], str, float]] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def prominent(words: list[tuple[str, float]], top: int = 3) -> set[int]:
    """Indices of the (at most ``top``) most prominent words, among those above the mean."""
    if not words:
        return set()
    mean = sum(w for _, w in words) / len(words)
    order = sorted(range(len(words)), key=lambda i: -words[i][1])
    return {i for i in order[:top] if words[i][1] > mean + 1e-9}


def _thumbnail(tile: Tile, font: ImageFont.ImageFont) -> Image.Image:
    """[THUMB, THUMB] RGB thumbnail with the tile's boxes drawn, scaled from image pixels."""
    canvas = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)
    if tile.image is None:
        draw.text((PAD, THUMB // 2 - 8), "(image not found)", fill=(90, 90, 90), font=font)
        return canvas
    img = tile.image.convert("RGB")
    scale = min(THUMB / img.width, THUMB / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    ox, oy = (THUMB - size[0]) // 2, (THUMB - size[1]) // 2
    canvas.paste(img.resize(size, Image.BILINEAR), (ox, oy))
    for k, ((x1, y1, x2, y2), label, weight) in enumerate(tile.boxes):
        colour = PALETTE[k % len(PALETTE)]
        box = [ox + x1 * scale, oy + y1 * scale, ox + x2 * scale, oy + y2 * scale]
        draw.rectangle(box, outline=colour, width=3)
        text = f"{label} {weight:.2f}"
        tx, ty = box[0] + 2, max(0, box[1] - 14)
        bbox = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(bbox, fill=colour)
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return canvas


def _title(
    draw: ImageDraw.ImageDraw,
    words: list[tuple[str, float]],
    prefix: str,
    width: int,
    font: ImageFont.ImageFont,
) -> int:
    """Draw ``prefix`` + the query words, marking the prominent ones; returns the height."""
    marked = prominent(words)
    x, y, line_h = PAD, PAD, 22
    draw.text((x, y), prefix, fill=(0, 0, 0), font=font)
    x += draw.textlength(prefix + " ", font=font)
    for i, (word, _) in enumerate(words):
        w = draw.textlength(word + " ", font=font)
        if x + w > width - PAD:
            x, y = PAD, y + line_h
        if i in marked:
            red = (200, 0, 0)
            draw.text((x, y), word, fill=red, font=font)
            draw.text((x + 1, y), word, fill=red, font=font)  # poor man's bold
            wl = draw.textlength(word, font=font)
            draw.line([(x, y + line_h - 4), (x + wl, y + line_h - 4)], fill=red, width=2)
        else:
            draw.text((x, y), word, fill=(0, 0, 0), font=font)
        x += w
    return y + line_h + PAD


def render_png(
    words: list[tuple[str, float]],
    tiles: list[Tile],
    *,
    prefix: str = "query:",
    footer: list[str] | None = None,
    cols: int = 5,
) -> Image.Image:
    """The results as one image: a title with the query, a grid of boxed thumbnails with
    their text lines, then optional ``footer`` lines (e.g. ranked captions)."""
    font, title_font = _font(12), _font(16)
    cols = max(1, min(cols, len(tiles) or 1))
    cell_w, line_h = THUMB + 2 * PAD, 15
    n_lines = max((len(t.lines) for t in tiles), default=0)
    cell_h = THUMB + PAD + n_lines * line_h + PAD
    width = max(cols * cell_w, 640)
    scratch = ImageDraw.Draw(Image.new("RGB", (width, 400)))
    title_h = _title(scratch, words, prefix, width, title_font)
    rows = -(-len(tiles) // cols)
    footer = footer or []
    height = title_h + rows * cell_h + len(footer) * (line_h + 3) + PAD
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    _title(draw, words, prefix, width, title_font)
    for k, tile in enumerate(tiles):
        x, y = (k % cols) * cell_w + PAD, title_h + (k // cols) * cell_h
        out.paste(_thumbnail(tile, font), (x, y))
        for j, line in enumerate(tile.lines):
            draw.text((x, y + THUMB + 4 + j * line_h), line[:44], fill=(0, 0, 0), font=font)
    y = title_h + rows * cell_h
    for line in footer:
        draw.text((PAD, y), line[:160], fill=(0, 0, 0), font=font)
        y += line_h + 3
    return out


def render_html(
    words: list[tuple[str, float]],
    tiles: list[Tile],
    *,
    prefix: str = "query:",
    footer: list[str] | None = None,
) -> str:
    """The results as one self-contained HTML page (thumbnails embedded as base64 PNG)."""
    marked = prominent(words)
    title = " ".join(
        f"<mark><b>{html.escape(w)}</b></mark>" if i in marked else html.escape(w)
        for i, (w, _) in enumerate(words)
    )
    font = _font(12)
    cells = []
    for tile in tiles:
        buf = io.BytesIO()
        _thumbnail(tile, font).save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        text = "<br>".join(html.escape(line) for line in tile.lines)
        cells.append(
            f'<figure><img src="data:image/png;base64,{data}" width="{THUMB}">'
            f"<figcaption>{text}</figcaption></figure>"
        )
    items = "".join(f"<li>{html.escape(line)}</li>" for line in footer or [])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>cpfean retrieval</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px;"
        "vertical-align:top}mark{background:#fdd;color:#c00}</style></head><body>"
        f"<h2>{html.escape(prefix)} {title}</h2>{''.join(cells)}"
        f"{'<ol>' + items + '</ol>' if items else ''}</body></html>"
    )
