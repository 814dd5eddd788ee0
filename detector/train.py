"""Training a region detector on COCO-format instances with Detectron2's own machinery.

`DefaultTrainer` (data loader, SGD + warm-up/steps, checkpointing, evaluation hook),
`register_coco_instances` (DatasetCatalog/MetadataCatalog) and `COCOEvaluator` (box AP). The
run folder receives Detectron2's own outputs under `train/`; `export_run` then writes the
portable artefacts: `model_final.pth` (``{"model": state_dict}``, loadable with
``torch.load(weights_only=True)``), `config.yaml` (the resolved config, MODEL.WEIGHTS pointing at
the sibling checkpoint) and `metrics.json`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from cpfean.fileio import atomic_path, atomic_write
from cpfean.precision import training_precision

__all__ = [
    "RegionTrainer",
    "coco_category_names",
    "export_run",
    "register_coco_split",
    "register_scenes",
    "scale_schedule",
]


def coco_category_names(json_file: str | os.PathLike) -> list[str]:
    """Category names in Detectron2's contiguous-id order (sorted COCO category ids)."""
    cats = json.loads(Path(json_file).read_text(encoding="utf-8"))["categories"]
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def register_coco_split(
    name: str, json_file: str | os.PathLike, image_root: str | os.PathLike
) -> list[str]:
    """(Re-)register one COCO instances split; returns its category names."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    classes = coco_category_names(json_file)
    register_coco_instances(name, {"thing_classes": classes}, str(json_file), str(image_root))
    return classes


def register_scenes(
    data_dir: str | os.PathLike, splits: tuple[str, ...] = ("train", "val"), prefix: str = "scenes"
) -> tuple[dict[str, str], list[str]]:
    """Register `{prefix}_{split}` from `data_dir/instances_{split}.json`.

    Images are looked up under `data_dir/images` when it exists, else `data_dir`.

    Returns:
        split -> dataset name, and the category names (identical across splits).
    """
    data_dir = Path(data_dir)
    image_root = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    names, classes = {}, None
    for split in splits:
        json_file = data_dir / f"instances_{split}.json"
        if not json_file.is_file():
            raise FileNotFoundError(f"{json_file} not found (expected COCO instances json)")
        split_classes = register_coco_split(f"{prefix}_{split}", json_file, image_root)
        if classes is not None and split_classes != classes:
            raise ValueError(f"categories of {json_file} differ from the other splits")
        classes = split_classes
        names[split] = f"{prefix}_{split}"
    return names, classes or []


def scale_schedule(cfg: CfgNode, max_iter: int) -> None:
    """Set SOLVER.MAX_ITER and move the LR steps and warm-up proportionally (in place)."""
    old = max(1, cfg.SOLVER.MAX_ITER)
    cfg.SOLVER.MAX_ITER = max_iter
    steps = sorted({int(s * max_iter / old) for s in cfg.SOLVER.STEPS if s < old})
    steps = [s for s in steps if 0 < s < max_iter]
    # fvcore's multi-step schedule needs more updates than LR segments
    cfg.SOLVER.STEPS = tuple(steps) if max_iter > len(steps) + 1 else ()
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(1, max_iter // 5))


class CPUAutocastTrainer(SimpleTrainer):
    """`SimpleTrainer` with its step under CPU bfloat16 autocast (Detectron2's `AMPTrainer`
    is CUDA-only). bfloat16 keeps float32's range, so no gradient scaler is needed."""

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


class RegionTrainer(DefaultTrainer):
    """`DefaultTrainer` with a box-AP `COCOEvaluator`, writers that need no tensorboard, and
    ``SOLVER.AMP.ENABLED`` meaning mixed precision where the device computes it natively:
    bfloat16 on CUDA cards that have it (float16 with loss scaling on older ones) and on CPUs
    with AVX512-BF16 or AMX; float32 elsewhere."""

    def __init__(self, cfg: CfgNode):
        with warnings.catch_warnings():
            # Detectron2 first builds its CUDA-only AMPTrainer, whose scaler warns on a CPU;
            # it is replaced below by the trainer this device takes
            warnings.filterwarnings("ignore", message=".*GradScaler.*")
            super().__init__(cfg)
        if not cfg.SOLVER.AMP.ENABLED:
            return
        device = next(self.model.parameters()).device
        dtype = training_precision(True, device)
        parts = (self._trainer.model, self._trainer.data_loader, self._trainer.optimizer)
        if device.type == "cuda":
            self._trainer = AMPTrainer(*parts, precision=dtype)
        elif dtype == torch.bfloat16:
            self._trainer = CPUAutocastTrainer(*parts)
        else:
            self._trainer = SimpleTrainer(*parts)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        # the fast COCOeval needs detectron2's compiled _C, absent in the pure-Python install
        return COCOEvaluator(
            dataset_name, tasks=("bbox",), output_dir=output_folder, use_fast_impl=False
        )

    def build_writers(self):
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
        ]

    @property
    def last_eval_results(self) -> dict[str, Any]:
        """Results of the evaluation run at the end of training ({} when none ran)."""
        return dict(getattr(self, "_last_eval_results", OrderedDict()))


def export_run(
    cfg: CfgNode, model: torch.nn.Module, out_dir: str | os.PathLike, metrics: dict[str, Any]
) -> Path:
    """Write `model_final.pth`, `config.yaml` and `metrics.json` into `out_dir`.

    Every file goes to a temporary name first and is renamed into place when whole.
    Returns the checkpoint path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = out / "model_final.pth"
    with atomic_path(ckpt) as tmp:
        torch.save({"model": state}, tmp)
    saved = cfg.clone()
    saved.defrost()
    saved.MODEL.WEIGHTS = "model_final.pth"  # resolved against the config's folder on load
    saved.MODEL.DEVICE = "auto"
    saved.MODEL.EFFICIENTNET.PRETRAINED = False  # model_final.pth holds every trained weight
    for name, text in (
        ("config.yaml", saved.dump()),
        ("metrics.json", json.dumps(metrics, indent=2) + "\n"),
    ):
        atomic_write(out / name, text)
    return ckpt
