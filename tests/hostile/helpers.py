"""What the hostile-input tests share: running a command as a user would, the one-line error
check, the arguments of the commands on the quick demo's output."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.slow, pytest.mark.detector]

REPO = Path(__file__).resolve().parents[2]
KILL_SEED = int(os.environ.get("CPFEAN_KILL_SEED", "0"))


def digest(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``roots`` (and the roots themselves)."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for p in paths:
            if p.is_file() and p.name not in ("lock.mdb", "writer.lock", "train.lock"):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(capsys, module: str, *argv: str) -> tuple[int, str, str]:
    """``python -m pipelines.MODULE ARGV`` in this process: (exit status, stdout, stderr)."""
    import importlib

    main = importlib.import_module(f"pipelines.{module}").main
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


def run_process(module: str, *argv: str, timeout: float = 300) -> tuple[int, str, str]:
    """The same in a new process (for failures that would kill the test process)."""
    done = subprocess.run(
        [sys.executable, "-m", f"pipelines.{module}", *map(str, argv)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr


def one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _link_checkpoints(src: str, dst: str) -> None:
    if src.endswith((".pt", ".pth")):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def extract_args(d: dict, store: Path, *extra: str) -> list[str]:
    return [
        str(d["images"]),
        "--out",
        str(store),
        "--config",
        str(d["det"] / "config.yaml"),
        "--weights",
        str(d["det"] / "model_final.pth"),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


def train_argv(d: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"run_dir={run_dir}",
        f"data.regions={d['regions']}",
        f"data.captions={d['captions']}",
        "train.device=cpu",
        "--quiet",
        *extra,
    ]
