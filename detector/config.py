"""Region-stage configuration: Detectron2's config plus our `REGIONS` keys.

Config flows one way: Detectron2 defaults -> `add_region_config` -> YAML file -> command-line
overrides -> resolved (device, weights path) -> frozen. Unknown keys and wrong types fail at
start-up in `merge_from_other_cfg`/`merge_from_list`, naming the key.

Config files travel with region stores, so they are read as plain data: `yaml.safe_load` (a
Python tag is an error, where Detectron2's `merge_from_file` falls back to `yaml.unsafe_load`),
and `_BASE_` names a local file beside the config or a bundled config, never a URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

import detector.butd  # noqa: F401  (registers the Caffe-BUTD backbone and ROI heads)
from cpfean.config import merge_trees
from cpfean.data.region_record import MAX_NUM_REGIONS
from detector.efficientnet import add_efficientnet_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The bundled detector (ImageNet-pretrained EfficientNet-Lite0 + FPN), and where
# `pipelines.train_detector` writes it trained by default.
DEFAULT_DETECTOR = "scenes_effl0_fpn"
TRAINED_DEFAULT = Path("weights") / DEFAULT_DETECTOR / "config.yaml"

FEATURE_SOURCES = ("box_head", "pooler")
BOX_SOURCES = ("proposal", "regressed")


def add_region_config(cfg: CN) -> None:
    """Add the region-extraction keys under `cfg.REGIONS` (in place).

    Mirrors detectron2 projects' `add_*_config`: call it on a fresh `get_cfg()` before merging
    a YAML file that sets any of these keys.
    """
    cfg.REGIONS = CN()
    # Slots per image in the region store; at most this many regions are kept. BUTD's two
    # published settings: MIN_REGIONS = MAX_REGIONS = 36 (fixed), or 10-100 (adaptive).
    cfg.REGIONS.MAX_REGIONS = 36
    # At least this many regions are kept (best first) even when fewer pass SCORE_THRESH.
    cfg.REGIONS.MIN_REGIONS = 10
    # The former name of MAX_REGIONS, read so that configs written before still load (0: unset).
    cfg.REGIONS.NUM_REGIONS = 0
    # A proposal is kept when its best per-class score surviving NMS is >= this.
    cfg.REGIONS.SCORE_THRESH = 0.2
    # IoU threshold of the per-class NMS over proposals (bottom-up attention uses 0.3).
    cfg.REGIONS.NMS_THRESH = 0.3
    # Region feature: "box_head" = the box predictor's input (fc7 for FPN heads, mean-pooled
    # res5 for C4 heads); "pooler" = the ROI pooler output mean-pooled over space.
    cfg.REGIONS.FEATURE_SOURCE = "box_head"
    # Stored box: "proposal" = the box the feature was pooled from (Caffe BUTD generate_tsv);
    # "regressed" = that proposal refined by the box regressor for its label class.
    cfg.REGIONS.BOX_SOURCE = "proposal"
    # Class names, index = label id. Filled by training from the COCO categories.
    cfg.REGIONS.LABEL_NAMES = []
    # Text file with one class name per line (e.g. VG `objects_vocab.txt`); used when
    # LABEL_NAMES is empty. Relative paths resolve against the config file's folder.
    cfg.REGIONS.LABEL_NAMES_FILE = ""
    # Images with more pixels than this are skipped (reported), never decoded.
    cfg.REGIONS.MAX_IMAGE_PIXELS = 50_000_000
    # Name recorded in the store's meta; set from the config file name when empty.
    cfg.REGIONS.CONFIG_NAME = ""
    # Images per forward pass of `pipelines.extract` (its --batch-size overrides it). Images of
    # a batch are zero-padded to one size, which changes features near the borders; 1 is what
    # the Caffe bottom-up-attention extractor did.
    cfg.REGIONS.IMAGES_PER_BATCH = 4
    # Run the backbone (most of an image's extraction time) under bfloat16 autocast where the
    # device computes it natively; the proposals, box head and region choice stay float32.
    # Off by default: published features were computed in float32.
    cfg.REGIONS.BACKBONE_BF16 = False
    add_efficientnet_config(cfg)  # MODEL.EFFICIENTNET: the bundled detector's backbone


def resolve_config_file(config_file: str | Path, bundled_only: bool = False) -> Path:
    """Map a bare name (`scenes_r18_fpn`) or a path to an existing YAML file."""
    path = Path(config_file)
    if path.is_file() and not bundled_only:
        return path.resolve()
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {config_file!r} not found (bundled: {known})")


def load_yaml_safely(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A detector config file as plain data, its `_BASE_` chain merged in (base first).

    Raises ValueError naming the file on a Python tag or any other non-plain YAML, a `_BASE_`
    that is a URL or is missing, and a loop of bases.
    """
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config {path}: its _BASE_ chain loops back to itself")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config {path}: cannot read it: {e}") from None
    except yaml.YAMLError as e:
        what = "a Python tag, refused" if "python/" in str(e) else "not valid YAML"
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"config {path}: {what} (configs are plain YAML: {first})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level")
    base = tree.pop("_BASE_", None)
    if base is None:
        return tree
    if not isinstance(base, str) or "://" in base or base.startswith("~"):
        raise ValueError(
            f"config {path}: _BASE_ {base!r} must be a file beside the config or "
            "a bundled config name, not a URL"
        )
    local = path.parent / base
    if local.is_file():
        base_path = local
    else:
        try:
            base_path = resolve_config_file(
                Path(base).name if base.endswith(".yaml") else base, bundled_only=True
            )
        except FileNotFoundError:
            raise ValueError(
                f"config {path}: _BASE_ {base!r} is neither a file beside it nor a bundled config"
            ) from None
    return merge_trees(load_yaml_safely(base_path, seen + (path,)), tree)


def merge_config_file(cfg: CN, path: Path) -> None:
    """Merge a YAML config file into `cfg` (in place), read with `load_yaml_safely`."""
    loaded = CN(load_yaml_safely(path))
    version = loaded.pop("VERSION", cfg.VERSION)
    if version != cfg.VERSION:
        raise ValueError(f"config {path}: VERSION {version}, this Detectron2 reads {cfg.VERSION}")
    try:
        cfg.merge_from_other_cfg(loaded)
    except KeyError as e:
        raise ValueError(f"config {path}: {e.args[0] if e.args else e}") from None


def detectron2_device(device: str) -> str:
    """MODEL.DEVICE as Detectron2 takes it: `"auto"` -> `"cuda"` when available else `"cpu"`;
    anything else is returned as is (`cpfean.checkpoint.resolve_device` checks and returns a
    torch.device for the matching stage)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def split_opts(opts: Sequence[str]) -> list[str]:
    """Accept both `KEY VALUE KEY VALUE` and `KEY=VALUE` forms; return the flat pair list."""
    flat: list[str] = []
    for token in opts:
        if "=" in token and not token.startswith(("[", "(", "'", '"')):
            key, value = token.split("=", 1)
            flat += [key, value]
        else:
            flat.append(token)
    if len(flat) % 2:
        raise ValueError(f"overrides must come in KEY VALUE pairs, got {list(opts)}")
    return flat


def _resolve_relative(value: str, base: Path) -> str:
    """A relative path that exists next to the config file becomes absolute."""
    if not value or "://" in value or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def _read_old_region_count(cfg: CN, given: Sequence[str] | None = None) -> None:
    """Move a REGIONS.NUM_REGIONS (the former name) into MAX_REGIONS. Run after each merge, so
    that an override of either name wins over the file; both names set to different values
    in one place (``given``: the overrides' keys; None: the file) is an error, since which one
    the user meant cannot be told."""
    r = cfg.REGIONS
    if not r.NUM_REGIONS:
        return
    both = r.MAX_REGIONS != 36 if given is None else "REGIONS.MAX_REGIONS" in given
    if both and r.MAX_REGIONS != r.NUM_REGIONS:
        raise ValueError(
            f"REGIONS.NUM_REGIONS (the former name of MAX_REGIONS) is {r.NUM_REGIONS} but "
            f"MAX_REGIONS is {r.MAX_REGIONS}: set MAX_REGIONS only"
        )
    r.MAX_REGIONS, r.NUM_REGIONS = r.NUM_REGIONS, 0


def validate_region_cfg(cfg: CN) -> None:
    """Fail loudly on inconsistent `REGIONS` values."""
    r = cfg.REGIONS
    if r.IMAGES_PER_BATCH < 1:
        raise ValueError(f"REGIONS.IMAGES_PER_BATCH must be >= 1, got {r.IMAGES_PER_BATCH}")
    if not 0 < r.MIN_REGIONS <= r.MAX_REGIONS <= MAX_NUM_REGIONS:
        raise ValueError(
            f"need 0 < REGIONS.MIN_REGIONS <= MAX_REGIONS <= {MAX_NUM_REGIONS}, got "
            f"{r.MIN_REGIONS}, {r.MAX_REGIONS}"
        )
    if not 0.0 <= r.SCORE_THRESH <= 1.0 or not 0.0 < r.NMS_THRESH <= 1.0:
        raise ValueError("REGIONS.SCORE_THRESH must be in [0,1] and NMS_THRESH in (0,1]")
    if r.FEATURE_SOURCE not in FEATURE_SOURCES:
        raise ValueError(f"REGIONS.FEATURE_SOURCE must be one of {FEATURE_SOURCES}")
    if r.BOX_SOURCE not in BOX_SOURCES:
        raise ValueError(f"REGIONS.BOX_SOURCE must be one of {BOX_SOURCES}")
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise ValueError("the region stage needs MODEL.META_ARCHITECTURE GeneralizedRCNN")


def get_region_cfg(config_file: str | Path, opts: Sequence[str] = (), freeze: bool = True) -> CN:
    """Build, merge, resolve and (by default) freeze a region-stage config.

    Args:
        config_file: a YAML path, or the name of a bundled config in `detector/configs/`.
        opts: overrides, `KEY VALUE ...` or `KEY=VALUE ...` (e.g. `MODEL.DEVICE cpu`).
        freeze: freeze the returned config.

    Returns:
        The config, with `MODEL.DEVICE` resolved ("auto" -> cuda/cpu), relative
        `MODEL.WEIGHTS`/`REGIONS.LABEL_NAMES_FILE` resolved against the config's folder, and
        `REGIONS.CONFIG_NAME` set to the file's stem when empty.
    """
    path = resolve_config_file(config_file)
    cfg = get_cfg()
    add_region_config(cfg)
    merge_config_file(cfg, path)
    _read_old_region_count(cfg)
    flat = split_opts(opts)
    cfg.merge_from_list(flat)
    _read_old_region_count(cfg, flat[::2])
    cfg.MODEL.DEVICE = detectron2_device(cfg.MODEL.DEVICE)
    cfg.MODEL.WEIGHTS = _resolve_relative(cfg.MODEL.WEIGHTS, path.parent)
    cfg.REGIONS.LABEL_NAMES_FILE = _resolve_relative(cfg.REGIONS.LABEL_NAMES_FILE, path.parent)
    if not cfg.REGIONS.CONFIG_NAME:
        cfg.REGIONS.CONFIG_NAME = path.stem
    validate_region_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def get_label_names(cfg: CN) -> list[str]:
    """The detector's class vocabulary, index = label id.

    From `REGIONS.LABEL_NAMES`, else `REGIONS.LABEL_NAMES_FILE` (one name per line; for the VG
    vocabulary a line may hold synonyms separated by commas, the first is used), else
    `class_{i}`. The count must equal `MODEL.ROI_HEADS.NUM_CLASSES`.
    """
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    names = list(cfg.REGIONS.LABEL_NAMES)
    if not names and cfg.REGIONS.LABEL_NAMES_FILE:
        lines = Path(cfg.REGIONS.LABEL_NAMES_FILE).read_text(encoding="utf-8").splitlines()
        names = [line.split(",")[0].strip() for line in lines if line.strip()]
    if not names:
        names = [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for MODEL.ROI_HEADS.NUM_CLASSES={num_classes}")
    return names
