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

from cpfean.checkpoint import checkpoint_fingerprint, load_model, resolve_device
from cpfean.data.dataset import collate_regions, record_arrays
from cpfean.evaluation import encode_texts
from cpfean.fileio import atomic_path, atomic_write
from cpfean.index import IndexError_, RetrievalIndex, search
from pipelines import cli

DEFAULT_INDEXES = ("runs/demo/index", "runs/demo-quick/index")
DETAILED = 3  # results explained (prominent words, regions)
REGIONS_DRAWN = 3
MAX_TOP_K = 1000  # a ranked list longer than this is an export, not a search
MAX_FIRST_STAGE = 100_000  # candidates re-ranked by the full model (bounds one query's work)


class UsageError(Exception):
    """Bad input: reported as one ``error:`` line, exit status 2."""


# ------------------------------------------------------------------------------- inputs
def check_query(query: str) -> str:
    """The query, stripped; UsageError when empty or not valid UTF-8."""
    bad = [ch for ch in query if "\udc80" <= ch <= "\udcff"]  # argv's surrogateescape
    if bad:
        raise UsageError(f"the query is not valid UTF-8 (undecodable byte "
                         f"0x{ord(bad[0]) - 0xDC00:02x}); pass UTF-8 text")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"the query is not valid UTF-8 text ({e.reason})") from None
    if not query.strip():
        raise UsageError("the query is empty; pass some words, e.g. --query \"a red ball\"")
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


def _detector_files(args: argparse.Namespace, index: RetrievalIndex) -> tuple[str, str, dict]:
    """Detector config and weights: given, else recorded in the region store's meta, else the
    demo layout (``detector/`` beside the store). Also returns the store's detector meta."""
    det: dict = {}
    store = Path(index.regions_path or "")
    try:
        from cpfean.data.region_store import RegionStore

        det = RegionStore(store).meta.get("detector", {}) or {}
    except (OSError, ValueError):
        pass
    config = args.detector_config or next(
        (c for c in (det.get("config_file"), det.get("config_path"),
                     str(store.parent / "detector" / "config.yaml")) if c and Path(c).is_file()),
        det.get("config"))
    if not config:
        raise UsageError("cannot tell which detector made the index's regions; pass "
                         "--detector-config and --detector-weights")
    weights = args.detector_weights or det.get("weights") or ""
    if not weights and Path(config).is_file():
        candidate = Path(config).parent / "model_final.pth"
        weights = str(candidate) if candidate.is_file() else ""
    return str(config), weights, det


def extract_regions(args: argparse.Namespace, index: RetrievalIndex, image: np.ndarray):
    """The image's RegionRecord from the detector stage that built the index's region store."""
    config, weights, det = _detector_files(args, index)
    device = "cuda" if resolve_device(args.device).type == "cuda" else "cpu"
    for name in ("torch.fx._symbolic_trace", "fvcore", "detectron2", "detector"):
        logging.getLogger(name).setLevel(logging.ERROR)  # errors are reported as one line
    with warnings.catch_warnings():  # library deprecation chatter is not for query users
        warnings.simplefilter("ignore")
        try:
            from detector.config import get_region_cfg
            from detector.extractor import RegionExtractor
        except ImportError as e:
            raise UsageError(f"image queries need the detector stage (detectron2): {e}") from None
        try:
            opts = [f"MODEL.DEVICE={device}"] + ([f"MODEL.WEIGHTS={weights}"] if weights else [])
            cfg = get_region_cfg(config, opts)  # no weights given: the config's own
            want = det.get("weights_sha256")
            known = want if want and want != "random-init" else None
            extractor = RegionExtractor(cfg, expected_sha256=known)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as e:
            raise UsageError(f"cannot build the detector from {config} with weights "
                             f"{weights or '(none)'}: {e}") from None
        if want and extractor.weights_sha256 != want:
            raise UsageError(f"detector weights {weights or '(random init)'} (sha256 "
                             f"{extractor.weights_sha256[:12]}) are not the ones that made the "
                             f"index's regions (sha256 {want[:12]}); pass --detector-weights")
        return extractor([image])[0]


# ------------------------------------------------------------------------------ explaining
def words_of(model: Any, txt: Any, weights: torch.Tensor) -> list[tuple[str, float]]:
    """(word, weight) of one caption's valid word slots, word pieces merged.

    Args:
        txt: TextEmbeddings of one caption; weights: [L] per-slot prominence.
    """
    mask = txt.mask[0].cpu()
    ids = txt.token_ids[0].cpu()[mask].tolist()
    tokens = model.tokenizer.convert_ids_to_tokens(ids)
    out: list[tuple[str, float]] = []
    for token, w in zip(tokens, weights.cpu()[mask].tolist(), strict=True):
        if token.startswith("##") and out:
            out[-1] = (out[-1][0] + token[2:], out[-1][1] + w)
        else:
            out.append((token, w))
    return out


def region_weights(details: dict[str, torch.Tensor], b: int, c: int) -> torch.Tensor:
    """[R] importance of each region for pair (b, c): the prominence of the words aligned to
    it (from ``alignment``), plus its fusion gate as a tie-break."""
    gates = details["region_gates"][b, c].float()
    if "alignment" not in details or "word_weights" not in details:
        return gates
    align, ww = details["alignment"][b, c], details["word_weights"][b, c].float()  # [L, k], [L]
    weight = torch.zeros_like(gates)
    valid = align >= 0
    weight.index_add_(0, align[valid].long(),
                      ww[:, None].expand_as(align)[valid].nan_to_num(0.0))
    return weight + 1e-3 * gates


def explain(model: Any, index: RetrievalIndex, query: Any, rows: np.ndarray, direction: str,
            device: torch.device) -> list[dict]:
    """Per result (the first `DETAILED`): its prominent words and its most important regions."""
    rows = rows[:DETAILED]
    if len(rows) == 0:
        return []
    if direction == "text2image":
        _, details = model.score(index.images(rows, device), query, return_details=True)
    else:
        _, details = model.score(query, index.caption_embeddings(rows, device),
                                 return_details=True)
    out = []
    for k, row in enumerate(rows):
        b, c = (k, 0) if direction == "text2image" else (0, k)
        txt = query if direction == "text2image" else index.caption_embeddings(
            np.array([row]), device)
        words = words_of(model, txt, details["word_weights"][b, c])
        weights = region_weights(details, b, c)
        out.append({"words": words, "region_order": weights.argsort(descending=True).tolist(),
                    "region_weights": weights.tolist()})
    return out


# ------------------------------------------------------------------------------- output
def top_words(words: list[tuple[str, float]], n: int = 3) -> list[str]:
    """The ``n`` most prominent distinct words."""
    out: list[str] = []
    for w, _ in sorted(words, key=lambda x: -x[1]):
        if w not in out:
            out.append(w)
    return out[:n]


def print_table(payload: dict) -> None:
    text2image = payload["mode"] == "text2image"
    what = "image" if text2image else "caption"
    query = payload["query"] if len(payload["query"]) <= 80 else payload["query"][:77] + "..."
    print(f"{payload['mode']}: {query!r} ({payload['search']['path']} search over "
          f"{payload['search']['gallery']} items)")
    print(f"{'rank':>4}  {'score':>8}  {what}")
    for r in payload["results"]:
        extra = f"   [{', '.join(r['prominent_words'])}]" if r.get("prominent_words") else ""
        print(f"{r['rank']:>4}  {r['score']:>8.4f}  {r['path'] if text2image else r['caption']}"
              f"{extra}")


def show(out: str, payload: dict, index: RetrievalIndex, details: list[dict],
         query_image: np.ndarray | None, record: Any) -> None:
    from PIL import Image

    from cpfean.images import BadImage, decode_image
    from cpfean.viz import Tile, render_html, render_png

    def boxes(boxes_px: np.ndarray, labels: np.ndarray, d: dict) -> list:
        floor = 0.05 * max(d["region_weights"])  # regions no prominent word aligns to: skip
        picked = [r for r in d["region_order"] if (labels[r] != -1 or boxes_px[r].any())
                  and d["region_weights"][r] > floor]
        return [(tuple(boxes_px[r].tolist()), index.label_names[labels[r]]
                 if 0 <= labels[r] < len(index.label_names) else f"region {r}",
                 d["region_weights"][r]) for r in picked[:REGIONS_DRAWN]]

    tiles, footer = [], []
    if payload["mode"] == "text2image":
        words = details[0]["words"] if details else [(w, 0.0) for w in payload["query"].split()]
        for k, r in enumerate(payload["results"]):
            try:  # upright, as extraction saw it, so that the boxes land on their objects
                image = Image.fromarray(decode_image(r["path"]))
            except BadImage:
                image = None
            row = r["row"]
            drawn = boxes(index.boxes[row], index.labels[row], details[k]) \
                if k < len(details) else []
            tiles.append(Tile(image, [f"#{r['rank']}  {r['score']:.3f}", r["image_id"]], drawn))
        prefix = "query:"
    else:
        words = details[0]["words"] if details else []
        image = Image.fromarray(np.ascontiguousarray(query_image[:, :, ::-1]))
        drawn = boxes(record.boxes, record.labels, details[0]) if details else []
        tiles.append(Tile(image, [Path(payload["query"]).name], drawn))
        footer = [f"#{r['rank']}  {r['score']:.3f}  {r['caption']}" for r in payload["results"]]
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
        raise UsageError(f"--first-stage must be in 1..{MAX_FIRST_STAGE}, got "
                         f"{args.first_stage}")
    if args.show and Path(args.show).suffix.lower() not in (".png", ".html", ".htm"):
        raise UsageError(f"--show writes a .png or .html file, got {args.show}")
    query = check_query(args.query) if args.query is not None else None
    image = read_image(args.image) if args.image is not None else None
    index = RetrievalIndex(args.index or default_index())
    checkpoint = args.checkpoint or index.checkpoint_path
    if not Path(checkpoint).is_file():
        where = "" if args.checkpoint else f" (recorded in {index.path / 'index.json'})"
        raise UsageError(f"checkpoint not found: {checkpoint}{where}")
    index.check_checkpoint(checkpoint, checkpoint_fingerprint(checkpoint))
    device = resolve_device(args.device)
    model, cfg, _ = load_model(checkpoint, device)
    notes: list[str] = []
    record = None
    with torch.no_grad():
        if query is not None:
            direction = "text2image"
            max_words = getattr(model, "max_words", cfg.model.max_words)
            full = int(model.tokenize([query], max_length=1 << 20)["attention_mask"].sum())
            cut = int(model.tokenize([query])["attention_mask"].sum())
            if full > cut:
                notes.append(f"note: the query was truncated to its first {max_words} word "
                             f"pieces (the model's limit); {full - cut} tokens were ignored")
            encoded = encode_texts(model, [query], device=device)
            if not bool(encoded.mask.any()):
                raise UsageError("the query has no words the model can read")
        else:
            direction = "image2text"
            record = extract_regions(args, index, image)
            batch = collate_regions([record_arrays(record)]).to(device)
            encoded = model.encode_images(*batch.as_tuple())
        rows, scores, info = search(model, index, encoded, direction=direction,
                                    top_k=args.top_k, first_stage=args.first_stage,
                                    exhaustive=args.exhaustive, device=device)
        details = explain(model, index, encoded, rows, direction, device)
    results = []
    for k, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True)):
        r: dict[str, Any] = {"rank": k + 1, "score": round(float(score), 6), "row": row}
        if direction == "text2image":
            r.update(image_id=index.image_ids[row], path=index.image_path(row))
        else:
            r.update(caption=index.captions[row], image_id=index.caption_image_ids[row])
        if k < len(details):
            r["prominent_words"] = top_words(details[k]["words"])
        results.append(r)
    payload = {"query": query if query is not None else str(args.image), "mode": direction,
               "results": results, "search": info, "notes": notes,
               "index": str(index.path), "checkpoint": str(checkpoint)}
    for note in notes:
        print(note, file=sys.stderr)
    if args.show:
        show(args.show, payload, index, details, image, record)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m pipelines.retrieve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", help="text query -> ranked images")
    what.add_argument("--image", help="image file -> ranked captions of the index")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--index", help=f"index directory (default: newest of {DEFAULT_INDEXES})")
    parser.add_argument("--checkpoint", help="checkpoint (default: the index's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--show", help="draw the results into OUT.png or OUT.html")
    parser.add_argument("--exhaustive", action="store_true",
                        help="score every item with CPFEAN (no first stage)")
    parser.add_argument("--first-stage", type=int, help="re-rank this many first-stage "
                        "candidates (two-stage search even on small galleries)")
    parser.add_argument("--detector-config", help="detector config for --image")
    parser.add_argument("--detector-weights", help="detector weights for --image")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and "
                        "faiss (0 = library default; 1 is fastest on a CPU shared with other "
                        "jobs, where spinning thread pools oversubscribe the cores)")
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
    except (UsageError, IndexError_, FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line, never a traceback, for the unexpected too
        print(f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())}",
              file=sys.stderr)
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
