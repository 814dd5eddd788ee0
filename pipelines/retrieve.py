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
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.checkpoint import resolve_device
from cpfean.fileio import atomic_path, atomic_write
from cpfean.index import IndexFormatError, RetrievalIndex
from cpfean.search import QueryError, Searcher
from pipelines import cli

DEFAULT_INDEXES = ("runs/demo/index", "runs/demo-quick/index")
MAX_TOP_K = 1000  # a ranked list longer than this is an export, not a search
MAX_FIRST_STAGE = 100_000  # candidates re-ranked by the full model (bounds one query's work)


class UsageError(Exception):
    """Bad input: reported as one ``error:`` line, exit status 2."""


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


def default_index() -> Path:
    """The newest whole default index (or the first default path, for the error message)."""
    found = [Path(p) for p in DEFAULT_INDEXES if (Path(p) / "index.json").is_file()]
    if not found:
        return Path(DEFAULT_INDEXES[0])
    return max(found, key=lambda p: (p / "index.json").stat().st_mtime)


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


def _detector_files(
    index: RetrievalIndex, config: str | None, weights: str | None
) -> tuple[str, str, dict]:
    """Detector config and weights: given, else recorded in the region store's meta, else the
    demo layout (``detector/`` beside the store). Also returns the store's detector meta."""
    det: dict = {}
    store = Path(index.regions_path or "")
    try:
        from cpfean.data.region_store import RegionStore

        det = RegionStore(store).meta.get("detector", {}) or {}
    except (OSError, ValueError):
        pass
    config = config or next(
        (
            c
            for c in (
                det.get("config_file"),
                det.get("config_path"),
                str(store.parent / "detector" / "config.yaml"),
            )
            if c and Path(c).is_file()
        ),
        det.get("config"),
    )
    if not config:
        raise UsageError(
            "cannot tell which detector made the index's regions; pass "
            "--detector-config and --detector-weights"
        )
    weights = weights or det.get("weights") or ""
    if not weights and Path(config).is_file():
        candidate = Path(config).parent / "model_final.pth"
        weights = str(candidate) if candidate.is_file() else ""
    return str(config), weights, det


def build_detector(
    index: RetrievalIndex,
    config: str | None = None,
    weights: str | None = None,
    device: str = "auto",
) -> Any:
    """The RegionExtractor of the detector stage that built the index's region store (its
    weights checked against the store's checksum before they are read)."""
    config, weights, det = _detector_files(index, config, weights)
    device = "cuda" if resolve_device(device).type == "cuda" else "cpu"
    for name in ("torch.fx._symbolic_trace", "fvcore", "detectron2", "detector"):
        logging.getLogger(name).setLevel(logging.ERROR)  # errors are reported as one line
    with warnings.catch_warnings():  # library deprecation chatter is not for query users
        warnings.simplefilter("ignore")
        try:
            from detector.config import get_region_cfg
            from detector.extractor import RegionExtractor
        except ImportError as e:
            raise UsageError(f"image queries need the detector stage (detectron2): {e}") from None
        want = det.get("weights_sha256")
        try:
            opts = [f"MODEL.DEVICE={device}"] + ([f"MODEL.WEIGHTS={weights}"] if weights else [])
            cfg = get_region_cfg(config, opts)  # no weights given: the config's own
            known = want if want and want != "random-init" else None
            extractor = RegionExtractor(cfg, expected_sha256=known)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as e:
            raise UsageError(
                f"cannot build the detector from {config} with weights {weights or '(none)'}: {e}"
            ) from None
    if want and extractor.weights_sha256 != want:
        raise UsageError(
            f"detector weights {weights or '(random init)'} (sha256 "
            f"{extractor.weights_sha256[:12]}) are not the ones that made the "
            f"index's regions (sha256 {want[:12]}); pass --detector-weights"
        )
    return extractor


def extract_regions(extractor: Any, image: np.ndarray) -> Any:
    """One BGR image's RegionRecord."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return extractor([image])[0]


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
def open_searcher(index_dir: str | None, checkpoint: str | None, device: str) -> Searcher:
    """The index (default: the newest demo one) with its checkpoint loaded."""
    try:
        return Searcher.open(index_dir or default_index(), checkpoint, device)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> dict:
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise UsageError(f"--top-k must be in 1..{MAX_TOP_K}, got {args.top_k}")
    if args.first_stage is not None and not 1 <= args.first_stage <= MAX_FIRST_STAGE:
        raise UsageError(f"--first-stage must be in 1..{MAX_FIRST_STAGE}, got {args.first_stage}")
    if args.show and Path(args.show).suffix.lower() not in (".png", ".html", ".htm"):
        raise UsageError(f"--show writes a .png or .html file, got {args.show}")
    query = check_query(args.query) if args.query is not None else None
    image = read_image(args.image) if args.image is not None else None
    searcher = open_searcher(args.index, args.checkpoint, args.device)
    options = dict(top_k=args.top_k, first_stage=args.first_stage, exhaustive=args.exhaustive)
    if query is not None:
        payload = searcher.text_to_images(query, **options)
    else:
        extractor = build_detector(
            searcher.index, args.detector_config, args.detector_weights, args.device
        )
        payload = searcher.image_to_captions(extract_regions(extractor, image), **options)
        payload["query"] = str(args.image)
    payload["notes"] = [f"note: {n}" for n in payload["notes"]]
    payload.update(index=str(searcher.index.path), checkpoint=searcher.checkpoint)
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
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line, never a traceback, for the unexpected too
        print(
            f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr
        )
        return 1
    if args.json:
        for r in payload["results"]:
            r.pop("row")
        print(json.dumps(payload, ensure_ascii=False, indent=1))
    else:
        print_table(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
