"""Checkpoints that cross machines: atomic writes, no unpickling of code on read.

A checkpoint is a ``torch.save`` dict of tensors and plain data, read back with
``weights_only=True``. It carries the resolved config and the detector's label vocabulary,
so ``load_model`` rebuilds the exact network from the file alone.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpfean.config import Config, from_dict, to_dict
from cpfean.fileio import atomic_path
from cpfean.model import build_model

FORMAT_VERSION = 1


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain data (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    """``torch.save`` through `atomic_path`: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable cpfean checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a cpfean checkpoint (no model/config inside)")
    return ckpt


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of the checkpoint file: indexes record it to refuse a mismatched model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint (strict), in eval mode on ``device``."""
    ckpt = load_checkpoint(path)
    cfg = from_dict(Config, ckpt["config"])
    model = build_model(cfg.model, label_names=list(ckpt.get("label_names", [])))
    model.load_state_dict(ckpt["model"], strict=True)
    model.to(device).eval()
    return model, cfg, ckpt


def model_payload(model: torch.nn.Module, cfg: Config, label_names: list[str]) -> dict[str, Any]:
    """What every checkpoint carries to be usable on its own."""
    return {"model": model.state_dict(), "config": to_dict(cfg), "label_names": list(label_names)}
