"""Typed configuration: defaults -> YAML file -> ``a.b=value`` overrides -> frozen.

Every section is a dataclass whose fields carry a type and a one-line comment. Loading
rejects unknown keys and values of the wrong type with an error that names the key, so a
typo in a YAML file or on the command line fails at start-up, not an hour into training.
The resolved config is plain data (``to_dict``) and is saved into each run folder and
inside each checkpoint, so a model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cpfean.fileio import atomic_write
from cpfean.model.config import ModelConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    regions: str = "runs/demo/regions"  # region store (LMDB directory) written by pipelines.extract
    captions: str = "runs/demo/data/captions.json"  # Karpathy JSON, COCO JSON, JSONL or CSV
    train_split: str = "train"  # split of the caption source used for training
    val_split: str = "val"  # split used to pick the best checkpoint
    test_split: str = "test"  # split reported by pipelines.evaluate
    val_limit: int = 0  # validate on the first N images of val_split (0 = all; SCAN: 1000 on COCO)
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12  # passes over the training captions
    batch_size: int = 64  # captions per step (each with its image)
    lr: float = 2e-4  # AdamW learning rate for everything but the text encoder
    text_lr: float = 2e-5  # AdamW learning rate for the pretrained text encoder
    weight_decay: float = 1e-4  # AdamW weight decay
    lr_decay_epochs: list[int] = field(default_factory=lambda: [8])  # epochs at which lr *= 0.1
    lr_warmup_steps: int = 0  # steps of linear learning-rate warm-up from lr/100 (0 = none)
    grad_clip: float = 2.0  # max global gradient norm (0 = no clipping)
    margin: float = 0.2  # triplet ranking margin
    all_negatives_epochs: int = 1  # epochs that sum over all negatives before the hardest one
    recurrence_weight: float = 1.0  # weight of the word-recurrence supervision (0 = off)
    # give "a", "the", "of", "left", ... no recurrence target: captions of one image share their
    # phrasing, so these recur by template, not because they name what is shown
    recurrence_skip_function_words: bool = False
    # bf16 autocast where the device computes it natively; CUDA cards without it get fp16
    amp: bool = True
    seed: int = 0  # seeds Python, NumPy and torch
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    eval_batch_size: int = 128  # images/captions per encoding batch during validation
    log_every: int = 20  # steps between metrics-log rows
    ddp_timeout_minutes: int = 60  # collective timeout under torchrun; covers rank 0's validation


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the matching network
    data: DataConfig = field(default_factory=DataConfig)  # region store and captions
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation
    run_dir: str = "runs/demo/cpfean"  # where checkpoints, logs and the resolved config go


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int is accepted where float is)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is Any:
        return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown(key: str, prefix: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}; known: {', '.join(known)}")


# Keys that were renamed: still read (from configs and checkpoints), with a one-line note.
RENAMED = {
    "train.warmup_epochs": "train.all_negatives_epochs",
    "train.prominence_weight": "train.recurrence_weight",
}
log = logging.getLogger("cpfean.config")


def _renamed(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        new = RENAMED.get(f"{prefix}{key}")
        if new is not None:
            new_key = new[len(prefix) :]
            if new_key in data:
                raise ConfigError(f"config sets both {prefix}{key} and its new name {new}")
            log.warning("note: config key '%s%s' is now '%s'", prefix, key, new)
            key = new_key
        out[key] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    data = _renamed(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(str(key), prefix, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested data (JSON/YAML-safe)."""
    return dataclasses.asdict(cfg)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.use_gcn=false"]`` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or "not valid YAML"
            raise ConfigError(f"override {item!r}: the value is {problem}") from None
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        _set_path(tree, key.strip(), value)
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into a copy of ``base``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    cls: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Defaults, then the YAML file at ``path`` (and its ``_base_``), then overrides."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    tree = merge_trees(tree, parse_overrides(overrides or []))
    cfg = from_dict(cls, tree)
    if isinstance(cfg, Config):
        check_values(cfg)
    return cfg


# (key, lowest allowed value, whether the lowest is excluded); every float must also be finite
_RANGES = (
    ("train.epochs", 1, False),
    ("train.batch_size", 2, False),
    ("train.lr", 0, True),
    ("train.text_lr", 0, False),
    ("train.weight_decay", 0, False),
    ("train.lr_warmup_steps", 0, False),
    ("train.grad_clip", 0, False),
    ("train.margin", 0, False),
    ("train.all_negatives_epochs", 0, False),
    ("train.recurrence_weight", 0, False),
    ("train.eval_batch_size", 1, False),
    ("train.log_every", 1, False),
    ("data.num_workers", 0, False),
    ("data.val_limit", 0, False),
    ("train.ddp_timeout_minutes", 1, False),
    ("model.feature_dim", 1, False),
    ("model.embed_dim", 1, False),
    ("model.max_words", 1, False),
    ("model.region_layers", 1, False),
    ("model.region_heads", 1, False),
    ("model.region_ff_dim", 1, False),
    ("model.dropout", 0, False),
    ("model.topk", 0, False),
    ("model.lambda_softmax", 0, True),
)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def check_values(cfg: Config) -> None:
    """Raise ConfigError naming the first value out of its range (sizes positive, rates
    finite and non-negative, splits named, a known device), before any data or model loads."""
    for key, low, strict in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        if value < low or (strict and value == low):
            raise ConfigError(f"{key}: must be {'>' if strict else '>='} {low}, got {value!r}")
    for key in ("model.gate_cos_init",):
        if not math.isfinite(cfg.model.gate_cos_init):
            raise ConfigError(f"{key}: must be finite, got {cfg.model.gate_cos_init!r}")
    if cfg.model.dropout >= 1:
        raise ConfigError(f"model.dropout: must be < 1, got {cfg.model.dropout!r}")
    if cfg.model.embed_dim % cfg.model.region_heads:
        raise ConfigError(
            f"model.region_heads: {cfg.model.region_heads} does not divide "
            f"model.embed_dim {cfg.model.embed_dim}"
        )
    if any(e < 1 for e in cfg.train.lr_decay_epochs):
        raise ConfigError(
            f"train.lr_decay_epochs: epochs are >= 1, got {cfg.train.lr_decay_epochs}"
        )
    for key in ("train_split", "val_split", "test_split", "regions", "captions"):
        if not getattr(cfg.data, key).strip():
            raise ConfigError(f"data.{key}: must not be empty")
    if not _DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(
            f"train.device: 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.train.device!r}"
        )
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir: must not be empty")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file; ``_base_: other.yaml`` (relative to it) is loaded first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = tree.pop("_base_", None)
    if base is not None:
        tree = merge_trees(_read_yaml(path.parent / base, seen + (path.resolve(),)), tree)
    return tree


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_json(cfg: Any) -> str:
    """A stable JSON string of the config (stored inside checkpoints and indexes)."""
    return json.dumps(to_dict(cfg), sort_keys=True)
