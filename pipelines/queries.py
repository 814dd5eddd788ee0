"""Precision@5 of a search index on the bundled plain-English queries.

    python -m pipelines.queries --index runs/demo/index --captions runs/demo/data/captions.json
        [--top-k 5] [--json OUT]

Each query of `cpfean.scenes.queries.QUERIES` is searched with the index's model (the code
path of `pipelines.retrieve`); a result is relevant when the generator's ground truth (the
scenes' objects and settings in ``--captions``) answers the query. Prints a table: per query
the precision@k, whether the first result is relevant, and how many images of the gallery
are; then the mean precision@k.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cpfean.fileio import atomic_write_json
from cpfean.scenes.queries import QUERIES, relevant
from pipelines import cli


def scenes_by_id(captions: Path) -> dict[str, dict]:
    """The generator's image entries keyed by image id (filepath/filename)."""
    data = json.loads(captions.read_text(encoding="utf-8"))
    if data.get("dataset") != "cpfean_scenes":
        raise ValueError(f"{captions} is not a captions file of the bundled scene generator")
    return {str(Path(im.get("filepath", "")) / im["filename"]): im for im in data["images"]}


def evaluate_queries(searcher, scenes: dict[str, dict], top_k: int = 5) -> list[dict]:
    """One row per query: precision@k, first result relevant, relevant images in the gallery."""
    gallery = [scenes[i] for i in searcher.index.image_ids if i in scenes]
    rows = []
    for q in QUERIES:
        answer = searcher.text_to_images(q.text, top_k, explain=0)
        hits = [relevant(q, scenes[r["image_id"]]) for r in answer["results"]]
        rows.append(
            {
                "query": q.text,
                f"precision@{top_k}": sum(hits) / top_k,
                "first_relevant": bool(hits and hits[0]),
                "relevant_in_gallery": sum(relevant(q, s) for s in gallery),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.queries", __doc__)
    p.add_argument("--index", type=Path, default=Path("runs/demo/index"), help="index folder")
    p.add_argument(
        "--captions", type=Path, required=True, help="the generator's captions.json of the gallery"
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if not 1 <= args.top_k <= 100:
        p.error(f"--top-k must be in 1..100, got {args.top_k}")
    from cpfean.index import IndexFormatError
    from cpfean.search import Searcher

    try:
        scenes = scenes_by_id(args.captions)
        searcher = Searcher.open(args.index, device=args.device)
        missing = [i for i in searcher.index.image_ids if i not in scenes]
        if missing:
            raise ValueError(f"{args.captions} does not describe gallery image {missing[0]!r}")
    except (OSError, ValueError, KeyError, IndexFormatError) as e:
        return cli.fail(e)
    rows = evaluate_queries(searcher, scenes, args.top_k)
    key = f"precision@{args.top_k}"
    print(f"| query | {key} | first relevant | relevant in gallery |")
    print("|---|---:|:---:|---:|")
    for r in rows:
        first = "yes" if r["first_relevant"] else "no"
        print(f"| {r['query']} | {r[key]:.2f} | {first} | {r['relevant_in_gallery']} |")
    mean = sum(r[key] for r in rows) / len(rows)
    firsts = sum(r["first_relevant"] for r in rows)
    print(
        f"\nmean {key} {mean:.3f} over {len(rows)} queries; first result relevant for "
        f"{firsts}; gallery {searcher.index.count} images"
    )
    if args.json:
        atomic_write_json(args.json, {"rows": rows, f"mean_{key}": mean}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
