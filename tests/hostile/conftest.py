"""The ``demo`` fixture of the hostile-input tests: a private copy of the quick demo's output."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.hostile.helpers import _link_checkpoints


@pytest.fixture
def demo(quick_demo, tmp_path):
    """A private copy of the quick demo (so cases may change it) and its paths."""
    src, _ = quick_demo
    out = tmp_path / "demo"
    shutil.copytree(
        src,
        out,
        # the detector's training folder is not read by any case; checkpoints are only read
        # or replaced by rename, so a hard link shares them (~600 MB a copy otherwise)
        ignore=shutil.ignore_patterns("lock.mdb", "*.lock", "train"),
        copy_function=_link_checkpoints,
    )
    # as if downloaded: the absolute paths recorded on the maker's machine do not exist here,
    # so the copy finds its store, images and checkpoint by their paths relative to the index
    meta_path = out / "index" / "index.json"
    index = json.loads(meta_path.read_text())
    for key in ("regions", "images_root"):
        index[key] = f"/elsewhere/{key}"
    index["checkpoint"]["path"] = "/elsewhere/best.pt"
    meta_path.write_text(json.dumps(index))
    return {
        "root": out,
        "images": out / "data" / "images",
        "det": out / "detector",
        "regions": out / "regions",
        "captions": out / "data" / "captions.json",
        "ckpt": out / "cpfean" / "best.pt",
        "index": out / "index",
        "tmp": tmp_path,
    }
