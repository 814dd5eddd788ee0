"""Query a retrieval index: text -> images, or image -> captions.

    python -m pipelines.retrieve --query "a red ball left of a blue box" [--top-k 10]
    python -m pipelines.retrieve --image photo.jpg [--detector-config C --detector-weights W]
        [--index DIR] [--checkpoint C] [--json] [--show OUT.png|OUT.html]
        [--exhaustive | --first-stage N]

The index defaults to the newest of the bundled demo's (runs/demo/index, runs/demo-quick/index)
and the checkpoint to the one recorded in its index.json; an index built with another
checkpoint is refused. Galleries above 20K items are searched in two stages (faiss over pooled
embeddings, then CPFEAN re-ranks --first-stage candidates, default 500); --exhaustive scores
every item. Bad input (empty or undecodable query, unreadable image, missing or mismatched
index/checkpoint) gives one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cpfean.fileio import atomic_path, atomic_write
from cpfean.index import IndexFormatError
from cpfean.search import QueryError
from pipelines import cli
from pipelines.cli import DEFAULT_INDEXES, UsageError, image_detector, open_searcher

MAX_TOP_K = 1000  # a ranked list longer than this is an export, not a search
MAX_FIRST_STAGE = 100_000  # candidates re-ranked by the full model (bounds one query's work)


# ------------------------------------------------------------------------------- inputs
def check_query(query: str) -> str:
    """The query, stripped; UsageError when empty or not valid UTF-8."""
    bad = [ch for ch in query if "\udc80" <= ch <= "\udcff"]  # argv's surrogateescape
    if bad:
        raise UsageError(
            f"the query is not valid UTF-8 (undecodable byte "
            f"0x{ord(bad[0]) - 0xDC00:02x}); pass UTF-8 text"
        )
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"the query is not valid UTF-8 text ({e.reason})") from None
    if not query.strip():
        raise UsageError('the query is empty; pass some words, e.g. --query "a red ball"')
    return " ".join(query.split())


def read_image(path: str) -> np.ndarray:
    """HxWx3 uint8 BGR array of an image file, upright (EXIF orientation applied), decoded by
    the same policy as extraction; UsageError when missing, unreadable or refused."""
    from cpfean.images import BadImage, decode_image

    if not Path(path).is_file():
        raise UsageError(f"image not found: {path}")
    try:
        rgb = decode_image(path)
    except BadImage as e:
        raise UsageError(f"cannot read image {path}: {e}") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


# ------------------------------------------------------------------------------- output
def print_table(payload: dict) -> None:
    text2image = payload["mode"] == "text2image"
    what = "image" if text2image else "caption"
    query = payload["query"] if len(payload["query"]) <= 80 else payload["query"][:77] + "..."
    print(
        f"{payload['mode']}: {query!r} ({payload['search']['path']} search over "
        f"{payload['search']['gallery']} items)"
    )
    print(f"{'rank':>4}  {'score':>8}  {what}")
    for r in payload["results"]:
        extra = f"   [{', '.join(r['prominent_words'])}]" if r.get("prominent_words") else ""
        print(
            f"{r['rank']:>4}  {r['score']:>8.4f}  {r['path'] if text2image else r['caption']}"
            f"{extra}"
        )


def show(out: str, payload: dict, query_image: np.ndarray | None) -> None:
    """Draw the results (with their explaining regions) into a .png or .html file."""
    from PIL import Image

    from cpfean.images import BadImage, decode_image
    from cpfean.viz import Tile, render_html, render_png

    def boxes(r: dict) -> list:
        return [(tuple(g["box"]), g["label"], g["weight"]) for g in r.get("regions", [])]

    results = payload["results"]
    words = [tuple(w) for w in results[0].get("words", [])] if results else []
    tiles, footer = [], []
    if payload["mode"] == "text2image":
        words = words or [(w, 0.0) for w in payload["query"].split()]
        for r in results:
            try:  # upright, as extraction saw it, so that the boxes land on their objects
                image = Image.fromarray(decode_image(r["path"]))
            except BadImage:
                image = None
            tiles.append(Tile(image, [f"#{r['rank']}  {r['score']:.3f}", r["image_id"]], boxes(r)))
        prefix = "query:"
    else:
        image = Image.fromarray(np.ascontiguousarray(query_image[:, :, ::-1]))
        tiles.append(
            Tile(image, [Path(payload["query"]).name], boxes(results[0]) if results else [])
        )
        footer = [f"#{r['rank']}  {r['score']:.3f}  {r['caption']}" for r in results]
        prefix = "best caption:"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".html", ".htm"):
        atomic_write(path, render_html(words, tiles, prefix=prefix, footer=footer))
    else:
        with atomic_path(path) as tmp:
            render_png(words, tiles, prefix=prefix, footer=footer).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise UsageError(f"--top-k must be in 1..{MAX_TOP_K}, got {args.top_k}")
    if args.first_stage is not None and not 1 <= args.first_stage <= MAX_FIRST_STAGE:
        raise UsageError(f"--first-stage must be in 1..{MAX_FIRST_STAGE}, got {args.first_stage}")
    if args.show and Path(args.show).suffix.lower() not in (".png", ".html", ".htm"):
        raise UsageError(f"--show writes a .png or .html file, got {args.show}")
    if args.image is not None and (args.label or args.under):
        raise UsageError("--label and --under filter images: they go with --query, not --image")
    query = check_query(args.query) if args.query is not None else None
    image = read_image(args.image) if args.image is not None else None
    searcher = open_searcher(args.index, args.checkpoint, args.device)
    options = dict(top_k=args.top_k, rerank=args.first_stage, exhaustive=args.exhaustive)
    if query is not None:
        payload = searcher.text_to_images(query, label=args.label, under=args.under, **options)
    else:
        extractor = image_detector(
            searcher.index, args.detector_config, args.detector_weights, args.device
        )
        payload = searcher.image_to_captions(
            extractor.extract_one(image), query=str(args.image), **options
        )
    payload = {
        **payload,
        "notes": [f"note: {n}" for n in payload["notes"]],
        "index": str(searcher.index.path),
        "checkpoint": searcher.checkpoint,
    }
    for note in payload["notes"]:
        print(note, file=sys.stderr)
    if args.show:
        show(args.show, payload, image)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.retrieve", __doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", help="text query -> ranked images")
    what.add_argument("--image", help="image file -> ranked captions of the index")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--index", help=f"index directory (default: newest of {DEFAULT_INDEXES})")
    parser.add_argument("--checkpoint", help="checkpoint (default: the index's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--show", help="draw the results into OUT.png or OUT.html")
    parser.add_argument(
        "--exhaustive", action="store_true", help="score every item with CPFEAN (no first stage)"
    )
    parser.add_argument(
        "--first-stage",
        type=int,
        help="re-rank this many first-stage candidates (two-stage search even on small galleries)",
    )
    parser.add_argument(
        "--label", help="only images with a region of this detected label (e.g. dog)"
    )
    parser.add_argument(
        "--under", help="only images under this folder of the gallery (relative to its root)"
    )
    parser.add_argument("--detector-config", help="detector config for --image")
    parser.add_argument("--detector-weights", help="detector weights for --image")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch and "
        "faiss (0 = library default; 1 is fastest on a CPU shared with other "
        "jobs, where spinning thread pools oversubscribe the cores)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    try:
        payload = run(args)
    except (
        UsageError,
        IndexFormatError,
        QueryError,
        FileNotFoundError,
        ValueError,
        KeyError,
    ) as exc:
        return cli.fail(exc)
    except Exception as exc:  # one line, never a traceback, for the unexpected too
        cli.fail(f"unexpected {type(exc).__name__}: {exc}")
        return 1
    if args.json:  # the index row is the library's business, not the user's
        results = [{k: v for k, v in r.items() if k != "row"} for r in payload["results"]]
        print(json.dumps({**payload, "results": results}, ensure_ascii=False, indent=1))
    else:
        print_table(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
