"""How well a region store covers the annotated objects of its images.

    python -m pipelines.region_quality --regions STORE --captions captions.json [--split test]

For every annotated object (the generator records each scene's objects and their role in
``captions.json``), find the stored region of highest IoU: the object is *found* when that
IoU >= 0.5, and *labelled* when such a region also carries the object's category. Reported
per role (salient, minor, background) and overall; ``--json`` writes the numbers.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cpfean.data.region_store import RegionStore
from cpfean.fileio import atomic_write_json
from pipelines import cli


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] and b [M, 4] (xyxy) -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def region_quality(store: RegionStore, images: list[dict], iou: float = 0.5) -> dict:
    """``images``: Karpathy entries with ``objects`` [{category, role, bbox [x, y, w, h]}]."""
    names = list(store.meta.get("label_names", []))
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # objects, found, labelled
    for entry in images:
        image_id = "/".join(p for p in (entry.get("filepath", ""), entry["filename"]) if p)
        record = store[image_id]
        valid = record.mask
        boxes, labels = record.boxes[valid], record.labels[valid]
        for obj in entry.get("objects", []):
            x, y, w, h = obj["bbox"]
            overlaps = box_iou(np.array([[x, y, x + w, y + h]], dtype=np.float32), boxes)[0]
            hit = overlaps >= iou
            right = any(names[k] == obj["category"] for k in labels[hit] if 0 <= k < len(names))
            for key in (obj.get("role", "object"), "all"):
                counts[key][0] += 1
                counts[key][1] += int(hit.any())
                counts[key][2] += int(right)
    return {
        role: {"objects": n, "found": found / max(n, 1), "labelled": lab / max(n, 1)}
        for role, (n, found, lab) in counts.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.region_quality", __doc__)
    parser.add_argument("--regions", required=True)
    parser.add_argument("--captions", required=True, help="the generator's captions.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    if not 0 < args.iou <= 1:
        parser.error(f"--iou must be in (0, 1], got {args.iou}")
    try:
        data = json.loads(Path(args.captions).read_text(encoding="utf-8"))
        images = [im for im in data["images"] if args.split in ("all", im.get("split"))]
        if not images or not any(im.get("objects") for im in images):
            raise ValueError(f"{args.captions} has no annotated objects in split {args.split!r}")
        result = region_quality(RegionStore(args.regions), images, args.iou)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        what = (
            f"{args.captions}: not the generator's captions.json (no {e})"
            if isinstance(e, (KeyError, TypeError, AttributeError))
            else e
        )
        return cli.fail(what)
    print(f"{'role':<12}{'objects':>9}{'found':>9}{'labelled':>10}   (IoU >= {args.iou})")
    for role, r in sorted(result.items()):
        print(f"{role:<12}{r['objects']:>9}{100 * r['found']:>8.1f}%{100 * r['labelled']:>9.1f}%")
    if args.json:
        atomic_write_json(args.json, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
