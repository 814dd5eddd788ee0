"""A gallery that changes: how long after adding, changing and deleting photos a search sees it.

    python -m pipelines.benchmark sync [--images runs/scaling/heldout/data/images]
        [--donors runs/scaling/n800/data/images] [--add 10 --change 10 --delete 10]
        [--checkpoint runs/demo/cpfean/best.pt] [--detector runs/demo/detector] [--json F]

A copy of the ``--images`` folder is extracted and indexed from scratch (each command timed as
a user runs it, a process of its own), and served as ``pipelines.serve`` serves it. Then
``--add`` photos of ``--donors`` are added, ``--change`` photos overwritten with other donors
and ``--delete`` photos deleted, and the same two commands are run again: the times of that
update, and how long the running server takes to answer from the new index, are the figures.
The updated index is checked against a full rebuild of the changed folder (the same top-10
for every benchmark query).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines import cli
from pipelines.bench.gallery import QUERIES


def _run(*argv: str) -> tuple[float, str]:
    """Run ``python -m`` argv as a user would; (seconds, last line of its output)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", *argv], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: extraction skipped an unusable image
        raise RuntimeError(f"{' '.join(argv[:1])} failed ({done.returncode}): {done.stderr}")
    return seconds, (done.stdout.strip().splitlines() or [""])[-1]


def _change(photos: Path, donors: list[Path], add: int, change: int, delete: int) -> None:
    """Add, overwrite and delete photos (the first ones of the sorted folder are kept)."""
    present = sorted(p for p in photos.iterdir() if p.is_file())
    if add + change > len(donors) or change + delete > len(present):
        raise ValueError("not enough photos or donors for these changes")
    (photos / "added").mkdir(exist_ok=True)
    for k, donor in enumerate(donors[:add]):
        shutil.copyfile(donor, photos / "added" / f"{k:04d}{donor.suffix}")
    last = len(present)
    changed = present[last - change :] if change else []
    for target, donor in zip(changed, donors[add : add + change], strict=True):
        target.write_bytes(donor.read_bytes())
    for target in present[last - change - delete : last - change]:
        target.unlink()


def _top10(index: str, device: str = "cpu") -> list[list[str]]:
    from pipelines.cli import open_searcher

    searcher = open_searcher(index, None, device)
    return [
        [r["image_id"] for r in searcher.text_to_images(q, 10, explain=0)["results"]]
        for q in QUERIES
    ]


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m pipelines.benchmark sync", __doc__)
    p.add_argument("--images", default="runs/scaling/heldout/data/images")
    p.add_argument("--donors", default="runs/scaling/n800/data/images")
    p.add_argument("--checkpoint", default="runs/demo/cpfean/best.pt")
    p.add_argument("--detector", default="runs/demo/detector", help="folder of the detector")
    p.add_argument("--add", type=int, default=10)
    p.add_argument("--change", type=int, default=10)
    p.add_argument("--delete", type=int, default=10)
    p.add_argument("--workdir", default=None, help="where the copies go (a temporary folder)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    detector = Path(args.detector)
    for path in (args.checkpoint, detector / "config.yaml", detector / "model_final.pth"):
        if not Path(path).is_file():
            return cli.fail(f"not found: {path} (make demo writes it)")
    for folder in (args.images, args.donors):
        if not Path(folder).is_dir():
            return cli.fail(f"no folder {folder} (scripts/scaling_study.sh writes it)")
    if min(args.add, args.change, args.delete) < 0:
        return cli.fail("--add, --change and --delete must be >= 0")
    work = Path(tempfile.mkdtemp(prefix="bench_sync_", dir=args.workdir))
    photos, store, index = work / "photos", work / "regions", work / "index"
    extract = [
        "pipelines.extract",
        str(photos),
        "--out",
        str(store),
        "--config",
        str(detector / "config.yaml"),
        "--weights",
        str(detector / "model_final.pth"),
        "--no-progress",
    ]
    build = ["pipelines.index", "--checkpoint", args.checkpoint, "--regions", str(store)]
    build += ["--no-captions", "--quiet", "--device", "cpu", "--out", str(index)]
    try:
        shutil.copytree(args.images, photos)
        images = sum(1 for _ in photos.rglob("*") if _.is_file())
        figures: dict = {"images": images, "add": args.add, "change": args.change}
        figures["delete"] = args.delete
        figures["full_extract_s"], _ = _run(*extract)
        figures["full_index_s"], _ = _run(*build)
        donors = sorted(p for p in Path(args.donors).iterdir() if p.is_file())
        with _Server(str(index)) as server:
            _change(photos, donors, args.add, args.change, args.delete)
            figures["extract_s"], line = _run(*extract)
            figures["extract"] = {k: json.loads(line)[k] for k in ("written", "removed", "changed")}
            figures["index_s"], line = _run(*build)
            figures["index"] = json.loads(line)
            figures["served_after_s"] = server.wait_for_change()
        figures["same_top10_as_rebuild"] = _top10(str(index)) == _rebuilt(build, index)
    except (OSError, ValueError, RuntimeError) as exc:
        return cli.fail(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = figures["extract_s"] + figures["index_s"] + figures["served_after_s"]
    print(f"\n{images} photos; +{args.add} added, {args.change} changed, -{args.delete} deleted\n")
    print("| step | from scratch | after the change |")
    print("|---|---:|---:|")
    print(
        f"| pipelines.extract | {figures['full_extract_s']:.1f} s | {figures['extract_s']:.1f} s |"
    )
    print(f"| pipelines.index | {figures['full_index_s']:.1f} s | {figures['index_s']:.1f} s |")
    print(f"| running server answers from it | - | {figures['served_after_s']:.1f} s |")
    print(f"| change to search, in all | - | {seconds:.1f} s |")
    print(
        f"\nindex: {figures['index']}; top-10 as a full rebuild: {figures['same_top10_as_rebuild']}"
    )
    if args.json:
        from cpfean.fileio import atomic_write_json

        atomic_write_json(args.json, figures, indent=1)
    return 0


def _rebuilt(build: list[str], index: Path) -> list[list[str]]:
    fresh = index.with_name("rebuilt")
    _run(*build[:-1], str(fresh), "--force")
    return _top10(str(fresh))


class _Server:
    """The index served as pipelines.serve serves it (in this process, on 127.0.0.1)."""

    def __init__(self, index: str):
        self.index = index

    def __enter__(self) -> _Server:
        from pipelines.bench.serve import _serve
        from pipelines.web.app import open_server

        app, _ = open_server(lambda: cli.open_searcher(self.index, None, "cpu"), reload_every=0.1)
        self.server, self.thread, self.base = _serve(app)
        self.generation = self._health()["generation"]
        return self

    def _health(self) -> dict:
        import httpx

        return httpx.get(f"{self.base}/healthz", timeout=30).json()

    def wait_for_change(self, limit: float = 120.0) -> float:
        """Seconds until the server answers a query from a new generation of the index."""
        import httpx

        start = time.perf_counter()
        while self._health()["generation"] == self.generation:
            httpx.get(f"{self.base}/api/search", params={"q": QUERIES[0]}, timeout=30)
            if time.perf_counter() - start > limit:
                raise RuntimeError(f"the server did not pick up the new index in {limit:.0f} s")
            time.sleep(0.05)
        httpx.get(f"{self.base}/api/search", params={"q": QUERIES[0]}, timeout=30)
        return time.perf_counter() - start

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
