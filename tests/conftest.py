"""Shared test set-up: CPU, offline, seeded, few threads."""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """The quick demo's outputs (scenes, detector, regions, checkpoint, index), made once per
    session, with what the run printed. Tests that change anything work on copies."""
    import contextlib
    import io

    from pipelines import demo

    out = tmp_path_factory.mktemp("quick_demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = demo.main(["--out", str(out), "--quick", "--device", "cpu"])
    assert status == 0, printed.getvalue()[-2000:]
    return out, printed.getvalue()
