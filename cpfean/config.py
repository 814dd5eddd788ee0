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
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cpfean.fields import bounded, bounds_of
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
    val_limit: int = bounded(
        0, low=0
    )  # validate on the first N images of val_split (0 = all; SCAN: 1000 on COCO)
    num_workers: int = bounded(
        0, low=0
    )  # DataLoader worker processes (0 = load in the main process)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = bounded(12, low=1)  # passes over the training captions
    batch_size: int = bounded(64, low=2)  # captions per step (each with its image)
    lr: float = bounded(2e-4, above=0)  # AdamW learning rate for everything but the text encoder
    text_lr: float = bounded(2e-5, low=0)  # AdamW learning rate for the pretrained text encoder
    weight_decay: float = bounded(1e-4, low=0)  # AdamW weight decay
    lr_decay_epochs: tuple[int, ...] = (8,)  # epochs at which lr *= 0.1
    lr_warmup_steps: int = bounded(
        0, low=0
    )  # steps of linear learning-rate warm-up from lr/100 (0 = none)
    grad_clip: float = bounded(2.0, low=0)  # max global gradient norm (0 = no clipping)
    margin: float = bounded(0.2, low=0)  # triplet ranking margin
    all_negatives_epochs: int = bounded(
        1, low=0
    )  # epochs that sum over all negatives before the hardest one
    recurrence_weight: float = bounded(
        1.0, low=0
    )  # weight of the word-recurrence supervision (0 = off)
    # give "a", "the", "of", "left", ... no recurrence target: captions of one image share their
    # phrasing, so these recur by template, not because they name what is shown
    recurrence_skip_function_words: bool = False
    # bf16 autocast where the device computes it natively; CUDA cards without it get fp16
    amp: bool = True
    seed: int = 0  # seeds Python, NumPy and torch
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    eval_batch_size: int = bounded(
        128, low=1
    )  # images/captions per encoding batch during validation
    log_every: int = bounded(20, low=1)  # steps between metrics-log rows
    ddp_timeout_minutes: int = bounded(
        60, low=1
    )  # collective timeout under torchrun; covers rank 0's validation


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
    elif origin is tuple:  # tuple[X, ...]: frozen sequences (YAML gives lists)
        item_tp = (typing.get_args(tp) or (Any,))[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
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
    """The config as plain nested data (JSON/YAML-safe: tuples become lists)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


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


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _leaves(cfg: Any, prefix: str = ""):
    """(dotted key, value, field) of every non-section field of a config, depth first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f


def check_values(cfg: Config) -> None:
    """Raise ConfigError naming the first value out of its range (sizes positive, rates
    finite and non-negative, splits named, a known device), before any data or model loads."""
    for key, value, f in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        low, above, below = bounds_of(f)
        for bound, ok, word in (
            (low, operator.ge, ">="),
            (above, operator.gt, ">"),
            (below, operator.lt, "<"),
        ):
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"{key}: must be {word} {bound}, got {value!r}")
    if cfg.model.embed_dim % cfg.model.region_heads:
        raise ConfigError(
            f"model.region_heads: {cfg.model.region_heads} does not divide "
            f"model.embed_dim {cfg.model.embed_dim}"
        )
    if cfg.model.text_frozen_layers:
        from cpfean.model.text_encoder import text_layer_count

        layers = text_layer_count(cfg.model.text_encoder)
        if layers is not None and cfg.model.text_frozen_layers > layers:
            raise ConfigError(
                f"model.text_frozen_layers: {cfg.model.text_frozen_layers} is more than "
                f"the {layers} layers of text encoder {cfg.model.text_encoder!r}"
            )
    if any(e < 1 for e in cfg.train.lr_decay_epochs):
        raise ConfigError(
            f"train.lr_decay_epochs: epochs are >= 1, got {list(cfg.train.lr_decay_epochs)}"
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
