"""``python -m pipelines.import_precomp DIR --split test [--out STORE] [--captions-out FILE]``

SCAN-style precomputed features -> region store + JSONL captions.

- Reads ``DIR/{split}_ims.npy`` ([N, 36, D] float, memory-mapped) and ``DIR/{split}_caps.txt``
  (one caption per line). As in SCAN's ``PrecompDataset``: 5N caption lines -> lines
  5i..5i+4 belong to image row i; N lines -> one caption per row (rows may then repeat an
  image); any other count is an error.
- Store ids are ``{split}/{i:06d}`` (row i). Every region is valid (num_valid 36); there are no
  boxes (zeros), labels (-1), scores (1.0) or image size ((0, 0)); the meta says
  ``label_names=[]``, ``has_boxes=False``, ``has_labels=False`` and names the source files.
- Captions go to ``STORE.captions.jsonl`` (``{"image", "caption", "split"}`` per line, ids
  matching the store), rewritten whole by each run.
- Resumable: ids already in the store are skipped, so a re-run after a crash (even ``kill -9``)
  finishes the job. A store imported from other files is refused.

Default STORE: ``DIR/{split}_regions.lmdb``. Exit status: 0 = done; 2 = missing or malformed
input, or an incompatible existing store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cpfean.data.region_store import NUM_REGIONS, RegionRecord, RegionStoreError, RegionWriter
from cpfean.fileio import atomic_output
from pipelines import cli

EXIT_OK, EXIT_USAGE = 0, 2


def read_scan_split(src: Path, split: str) -> tuple[np.ndarray, list[str], int]:
    """The memory-mapped features, the captions and SCAN's `im_div` of one precomp split.

    Returns:
        ims: [N, 36, D] (read-only memory map); captions: C lines, stripped;
        im_div: 5 when C == 5N (caption j -> row j // 5), 1 when C == N (caption j -> row j).
    """
    ims_path, caps_path = src / f"{split}_ims.npy", src / f"{split}_caps.txt"
    for path in (ims_path, caps_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (SCAN precomp layout: "
                                    f"{{split}}_ims.npy and {{split}}_caps.txt)")
    ims = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    if ims.ndim != 3 or ims.shape[1] != NUM_REGIONS or ims.shape[2] < 1:
        raise ValueError(f"{ims_path}: expected shape [N, {NUM_REGIONS}, D], got {ims.shape}")
    if not np.issubdtype(ims.dtype, np.floating):
        raise ValueError(f"{ims_path}: expected float features, got {ims.dtype}")
    with caps_path.open(encoding="utf-8") as f:
        captions = [line.strip() for line in f]
    n, c = ims.shape[0], len(captions)
    if c == 5 * n:
        im_div = 5
    elif c == n:
        im_div = 1
    else:
        raise ValueError(f"{caps_path}: {c} caption lines for {n} image rows in {ims_path}; "
                         f"expected 5 per image ({5 * n}) or one per row ({n})")
    return ims, captions, im_div


def import_precomp(src: Path, split: str, out: Path, captions_out: Path, *,
                   commit_every: int = 64, progress: bool = True) -> dict[str, int]:
    """Import one SCAN precomp split into the region store `out` and JSONL `captions_out`.

    Returns:
        counts: images, captions, written (this run), present (already in the store).
    """
    ims, captions, im_div = read_scan_split(src, split)
    n = ims.shape[0]
    ids = [f"{split}/{i:06d}" for i in range(n)]
    source = {"source": str((src / f"{split}_ims.npy").resolve()),
              "source_captions": str((src / f"{split}_caps.txt").resolve())}
    meta = {"feature_dim": int(ims.shape[2]), "label_names": [], "has_boxes": False,
            "has_labels": False, "detector": {"config": "precomputed", "weights_sha256": None},
            "split": split, "im_div": im_div, **source}
    boxes = np.zeros((NUM_REGIONS, 4), np.float32)
    labels = np.full(NUM_REGIONS, -1, np.int64)
    scores = np.ones(NUM_REGIONS, np.float32)
    with RegionWriter(out, meta, commit_every=commit_every) as writer:
        stored = writer.meta
        for key, value in source.items():
            if stored.get(key) != value:
                raise RegionStoreError(f"{out} was imported from {stored.get(key)!r}, not "
                                       f"{value!r}; choose another --out")
        todo = [i for i in range(n) if ids[i] not in writer]
        for i in tqdm(todo, unit="img", desc=f"import {split}", disable=not progress,
                      dynamic_ncols=True):
            features = np.asarray(ims[i], dtype=np.float32)  # [36, D], copied off the mmap
            writer.put(ids[i], RegionRecord(features, boxes, labels, scores, (0, 0), NUM_REGIONS))
    with atomic_output(captions_out) as f:
        for j, caption in enumerate(captions):
            row = {"image": ids[j // im_div], "caption": caption, "split": split}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"images": n, "captions": len(captions), "written": len(todo),
            "present": n - len(todo)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m pipelines.import_precomp",
        description="Import SCAN-style precomputed features ({split}_ims.npy, {split}_caps.txt) "
                    "into a region store plus a JSONL caption file.")
    p.add_argument("dir", type=Path, help="folder holding {split}_ims.npy and {split}_caps.txt")
    p.add_argument("--split", required=True, help="split name, e.g. train, dev, test, testall")
    p.add_argument("--out", type=Path, help="region store (default DIR/{split}_regions.lmdb)")
    p.add_argument("--captions-out", type=Path,
                   help="JSONL caption file (default STORE.captions.jsonl)")
    p.add_argument("--commit-every", type=int, default=64, help="records per transaction")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.commit_every < 1:
        return cli.fail(f"--commit-every must be >= 1, got {args.commit_every}")
    out = args.out or args.dir / f"{args.split}_regions.lmdb"
    captions_out = args.captions_out or out.with_name(out.name + ".captions.jsonl")
    try:
        counts = import_precomp(args.dir, args.split, out, captions_out,
                                commit_every=args.commit_every, progress=not args.no_progress)
    except (OSError, ValueError) as e:  # RegionStoreError is a ValueError
        return cli.fail(e)
    print(f"regions:  {out} ({counts['images']} images, {counts['written']} written now, "
          f"{counts['present']} already there)")
    print(f"captions: {captions_out} ({counts['captions']} captions)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
