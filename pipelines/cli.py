"""What every command line shares: bad input is one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``), not the usage block too."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parser(prog: str, description: str | None) -> ArgumentParser:
    """A command's parser: ``description`` (its module docstring) shown as written."""
    return ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def image_size(text: str) -> tuple[int, int]:
    """An argparse type: ``WIDTHxHEIGHT`` (each >= 64) -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 320x240, got {text!r}") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"size must be at least 64x64, got {text!r}")
    return w, h


def fail(message: object) -> int:
    """Print one ``error:`` line (whitespace folded) and return the usage exit status. A
    KeyError's message is its argument (``str(KeyError)`` would quote it)."""
    if isinstance(message, KeyError) and message.args:
        message = message.args[0]
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


class UsageError(ValueError):
    """Bad input: reported as one ``error:`` line, exit status 2."""


# what the query commands (retrieve, serve, the serving benchmark) open by default
DEFAULT_INDEXES = ("runs/demo/index", "runs/demo-quick/index")


def default_index() -> Path:
    """The newest whole default index (or the first default path, for the error message)."""
    found = [Path(p) for p in DEFAULT_INDEXES if (Path(p) / "index.json").is_file()]
    if not found:
        return Path(DEFAULT_INDEXES[0])
    return max(found, key=lambda p: (p / "index.json").stat().st_mtime)


def open_searcher(index_dir: str | None, checkpoint: str | None, device: str, engine: Any = None):
    """The index (default: the newest demo one) with its checkpoint loaded; ``engine`` (see
    `add_engine_args`) picks the candidates of text queries."""
    from cpfean.search import Searcher

    try:
        return Searcher.open(index_dir or default_index(), checkpoint, device, engine)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def add_engine_args(p: ArgumentParser) -> None:
    """--engine, --url and --collection: where the first stage lives (``cpfean.index.qdrant``)."""
    p.add_argument(
        "--engine",
        choices=["local", "qdrant"],
        default="local",
        help="first stage in the index itself (local) or in a Qdrant collection",
    )
    p.add_argument(
        "--url", help="with --engine qdrant: http(s)://host:port, or a folder for local mode"
    )
    p.add_argument("--collection", help="Qdrant collection (default: the index folder's name)")


def engine_of(args: Any, index_dir: str | os.PathLike) -> Any:
    """The QdrantStage the arguments name, or None for --engine local."""
    if args.engine == "local":
        if args.url or args.collection:
            raise UsageError("--url and --collection go with --engine qdrant")
        return None
    if not args.url:
        raise UsageError("--engine qdrant needs --url (http://host:6333, or a folder)")
    from cpfean.index.qdrant import QdrantStage

    return QdrantStage(args.url, args.collection or Path(index_dir).resolve().name)


def image_detector(index, config: str | None, weights: str | None, device: str):
    """The RegionExtractor that made ``index``'s regions, for image queries (quiet: its
    libraries' log lines are not for a query's user; errors come back as UsageError)."""
    from cpfean.checkpoint import resolve_device

    device = "cuda" if resolve_device(device).type == "cuda" else "cpu"
    for name in ("torch.fx._symbolic_trace", "fvcore", "detectron2", "detector"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():  # library deprecation chatter at import
        warnings.simplefilter("ignore")
        try:
            from detector.extractor import RegionExtractor
        except ImportError as e:
            raise UsageError(f"image queries need the detector stage (detectron2): {e}") from None
        try:
            return RegionExtractor.for_store(
                index.regions_path or "", config=config, weights=weights, device=device
            )
        except ValueError as e:
            raise UsageError(str(e)) from None


def index_codec(given: str, images: int) -> str | None:
    """``--codec``: none, a faiss codec, or auto (the default codec above TWO_STAGE_MIN images,
    where a gallery is searched in two stages and its size starts to matter)."""
    from cpfean.first_stage import TWO_STAGE_MIN
    from cpfean.index.codec import DEFAULT_CODEC

    if given == "auto":
        return DEFAULT_CODEC if images > TWO_STAGE_MIN else None
    return None if given == "none" else given
