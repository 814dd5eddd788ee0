"""Build the retrieval index: encode a region store's gallery (and a caption split) once.

    python -m pipelines.index [--checkpoint runs/demo/cpfean/best.pt] [--regions STORE]
                              [--captions FILE --split test | --no-captions] [--out DIR]

The region store, caption file and split default to the ones the checkpoint trained on. The
build is resumable: re-running after an interrupt skips the gallery shards already written;
re-running on a whole index built with the same checkpoint and images does nothing (--force
rebuilds). Re-running after the store changed (``pipelines.extract`` on a folder where photos
were added, changed or deleted) updates the index: only new and changed images are encoded,
gone ones dropped, and the new index replaces the old in one step, so a search, or a kill,
at any moment sees one or the other whole. The last line printed (and ``--json F``) says
``{"encoded": n, "removed": m, "kept": k}``. Exit status: 0 done, 2 bad input (missing files,
mismatched data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpfean.fileio import LockedError
from pipelines import cli

DEFAULT_CHECKPOINT = "runs/demo/cpfean/best.pt"
DEFAULT_INDEX = "runs/demo/index"


def _images_root(given: str | None, store_meta: dict, captions: str | None) -> str | None:
    """Images root: --images-root, else the store's meta, else ``images/`` beside the captions
    file (the layout of the bundled generated scenes)."""
    from cpfean.index import images_root_of

    root = images_root_of(store_meta, given)
    if root is None and captions and (Path(captions).parent / "images").is_dir():
        root = str(Path(captions).parent / "images")
    return root


def _captions(args: argparse.Namespace, cfg, image_ids: list[str]):
    """(captions, the image of each, the caption file) to index for image queries: the
    checkpoint's caption file and test split unless told otherwise; none with --no-captions
    or when the default file is missing (a note says so)."""
    from cpfean.data.captions import check_ids, load_captions

    captions, owners, caption_file = [], [], None
    if not args.no_captions:
        caption_file = args.captions or cfg.data.captions
        if args.captions or Path(caption_file).is_file():
            split = args.split or cfg.data.test_split
            caps = load_captions(caption_file, split=None if split == "all" else split)
            check_ids(caps, image_ids)
            for image_id, group in zip(caps.image_ids, caps.captions, strict=True):
                captions += group
                owners += [image_id] * len(group)
        else:
            print(
                f"note: caption file {caption_file} not found; indexing images only",
                file=sys.stderr,
            )
            caption_file = None

    return captions, owners, caption_file


def run(args: argparse.Namespace) -> int:
    from cpfean.checkpoint import checkpoint_fingerprint, load_model, resolve_device
    from cpfean.config import to_dict
    from cpfean.data.region_store import RegionStore
    from cpfean.fileio import atomic_write_json
    from cpfean.index import build_index, check_replaceable
    from cpfean.index.codec import RegionCodec

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    check_replaceable(Path(args.out))  # before the model loads
    engine = cli.engine_of(args, args.out)
    device = resolve_device(args.device)
    model, cfg, _ = load_model(checkpoint, device)
    store = RegionStore(args.regions or cfg.data.regions)
    image_ids = store.ids()
    codec = cli.index_codec(args.codec, len(image_ids))
    if codec:
        RegionCodec.build(codec, cfg.model.embed_dim)  # a bad name stops here, before encoding
    elif args.exact_copy:
        raise ValueError("--exact-copy needs a codec (without one the index is exact already)")

    captions, owners, caption_file = _captions(args, cfg, image_ids)
    out = Path(args.out)
    sha256 = checkpoint_fingerprint(checkpoint)
    images_root = _images_root(args.images_root, store.meta, caption_file)
    built = build_index(
        model,
        store,
        out,
        checkpoint={"path": str(checkpoint), "sha256": sha256},
        config=to_dict(cfg),
        image_ids=image_ids,
        images_root=images_root,
        captions=captions,
        caption_image_ids=owners,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=device,
        progress=not args.quiet,
        force=args.force,
        codec=codec,
        exact_copy=args.exact_copy,
        log=lambda s: print(s, file=sys.stderr),
    )
    if built.up_to_date:
        print(
            f"index {out} is up to date ({len(image_ids)} images, {len(captions)} captions); "
            "--force rebuilds it"
        )
        counts = {"encoded": 0, "removed": 0, "kept": len(image_ids)}
    else:
        print(
            f"index {out}: {len(image_ids)} images, {len(captions)} captions, "
            f"checkpoint {checkpoint} (sha256 {sha256[:12]})"
        )
        counts = {"encoded": built.encoded, "removed": built.removed, "kept": built.kept}
    if engine is not None:
        from cpfean.index import RetrievalIndex

        mirrored = engine.write(RetrievalIndex(out), log=lambda s: None if args.quiet else print(s))
        print(
            f"qdrant collection {engine.collection!r} at {engine.url}: "
            f"{mirrored['upserted']} points written, {mirrored['deleted']} deleted, "
            f"{mirrored['kept']} kept"
        )
    print(json.dumps(counts))
    if args.json:
        atomic_write_json(args.json, counts)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.index", __doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="model checkpoint")
    parser.add_argument("--regions", help="region store (default: the checkpoint's)")
    parser.add_argument(
        "--captions", help="caption source to index for image queries (default: the checkpoint's)"
    )
    parser.add_argument(
        "--split", help="caption split to index (default: the config's test; 'all' = every caption)"
    )
    parser.add_argument("--no-captions", action="store_true", help="index images only")
    parser.add_argument("--out", default=DEFAULT_INDEX, help="index directory")
    parser.add_argument(
        "--images-root",
        help="folder the image ids are relative to (default: from the store's meta)",
    )
    parser.add_argument("--shard-size", type=int, default=1024, help="images per resumable shard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="on-disk dtype of the embeddings",
    )
    parser.add_argument(
        "--codec",
        default="auto",
        help="keep region embeddings compressed by this faiss codec (SQ4, SQ8, PQ64, ...); "
        "'none' keeps them exact; auto: SQ8 above 20,000 images, else none",
    )
    parser.add_argument(
        "--exact-copy",
        action="store_true",
        help="with a codec, also keep the exact regions (float16) to re-score the best 50",
    )
    parser.add_argument("--device", default="auto")
    cli.add_engine_args(parser)
    parser.add_argument("--force", action="store_true", help="rebuild an up-to-date index")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--json", type=Path, help='also write {"encoded", "removed", "kept"} to this file'
    )
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.batch_size < 1:
        parser.error("--shard-size and --batch-size must be >= 1")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, LockedError) as exc:
        return cli.fail(exc)


if __name__ == "__main__":
    sys.exit(main())
