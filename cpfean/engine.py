"""The training loop: one plain loop that reads top to bottom.

``setup_run`` builds a ``Run``; ``train_one_epoch`` applies the schedule at the top of each
step, then forward (bfloat16 autocast where the device has it) -> backward -> clip -> step;
``validate_and_save`` runs after every epoch: validation rSum, ``last.pt`` (everything needed
to resume exactly) and ``best.pt`` (best validation rSum so far). Runs under ``torchrun`` with
DistributedDataParallel (nccl on CUDA, gloo on CPU); in-batch negatives are per rank.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import random
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from cpfean.checkpoint import (
    load_checkpoint,
    model_payload,
    resolve_device,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cpfean.config import Config, save_config
from cpfean.data.captions import CaptionSet, check_ids, load_captions
from cpfean.data.dataset import CaptionPairDataset, PairCollator
from cpfean.data.region_store import RegionStore
from cpfean.evaluation import evaluate_split
from cpfean.fileio import WriterLock, atomic_output, atomic_write_json
from cpfean.model import ContrastiveLoss, build_model
from cpfean.model.loss import prominence_loss
from cpfean.precision import training_precision
from cpfean.progress import progress as progress_of
from cpfean.recurrence import function_word_ids, sibling_targets
from cpfean.schedule import Phase, schedule

log = logging.getLogger("cpfean.train")
TEXT_BACKBONE_PREFIX = "word_encoder.backbone."  # parameters trained at train.text_lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment, else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _launched_distributed() -> bool:
    """Whether torchrun started this process: then training joins a process group even
    when it is alone in it (one GPU runs the same DDP code as eight)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def load_split(cfg: Config, store: RegionStore, split: str):
    """The image ids and captions of ``split``, checked against the store."""
    captions = load_captions(cfg.data.captions, split=split)
    check_ids(captions, store.ids())
    return captions


def fit_to_store(cfg: Config, store_meta: dict, logger: logging.Logger | None) -> Config:
    """Switch off the priors a store cannot feed (precomputed features have no boxes or
    labels), saying so in one line; the returned config is the one saved with the run.
    Raises ValueError when the store's features are not of ``model.feature_dim``."""
    dim = store_meta.get("feature_dim")
    if dim != cfg.model.feature_dim:
        raise ValueError(
            f"model.feature_dim is {cfg.model.feature_dim} but the region store "
            f"{cfg.data.regions} holds {dim}-d features; set "
            f"model.feature_dim={dim}"
        )
    missing, off = [], []
    if cfg.model.use_spatial and store_meta.get("has_boxes") is False:
        missing.append("boxes")
        off.append("use_spatial")
    if cfg.model.use_label_prior and (
        store_meta.get("has_labels") is False or not store_meta.get("label_names")
    ):
        missing.append("labels")
        off.append("use_label_prior")
    if not off:
        return cfg
    if logger is not None:
        logger.info(
            "the region store has no %s: %s off for this run",
            " and no ".join(missing),
            " and ".join(f"model.{k}" for k in off),
        )
    model = dataclasses.replace(cfg.model, **dict.fromkeys(off, False))
    return dataclasses.replace(cfg, model=model)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with a lower learning rate (``train.text_lr``) for the pretrained text backbone."""
    text, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (text if name.startswith(TEXT_BACKBONE_PREFIX) else rest).append(param)
    groups = [{"params": rest, "lr": cfg.train.lr}]
    if text:
        groups.append({"params": text, "lr": cfg.train.text_lr})
    # the fused kernel (CPU and CUDA) does the same update in one pass over each tensor
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay, fused=True)


class MetricsLog:
    """Appends rows to ``metrics.csv`` in the run folder (header written once).

    A row with a column the file lacks (a log from an older version, resumed) rewrites the file
    once with the wider header, earlier rows blank there, so columns never shift."""

    def __init__(self, path: Path):
        self.path = path
        self._fields: list[str] | None = None  # the file's header, once read or written

    def _read(self) -> tuple[list[str], list[dict]]:
        """Header and whole rows; a last row cut short by a kill (no newline) is left out."""
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return list(reader.fieldnames or []), list(reader)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a crash mid-epoch logged steps a resume redoes)."""
        if not self.path.exists():
            return
        fields, rows = self._read()
        self._rewrite(fields, [r for r in rows if int(r["step"]) <= step])
        self._fields = fields

    def _rewrite(self, fields: list[str], rows: list[dict]) -> None:
        with atomic_output(self.path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row) -> None:
        if self._fields is None:
            fields, rows = self._read() if self.path.exists() else ([], [])
            self._fields = fields or list(row)
            self._rewrite(self._fields, rows)  # drops a row a kill cut short
        if not set(row) <= set(self._fields):
            fields, rows = self._read()
            self._fields = fields + [k for k in row if k not in fields]
            self._rewrite(self._fields, rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._fields, restval="").writerow(row)


@dataclasses.dataclass
class Run:
    """Everything one training run holds between steps (``setup_run`` builds it)."""

    cfg: Config
    device: torch.device
    is_main: bool
    world: int
    store: RegionStore
    label_names: list[str]
    val_caps: CaptionSet
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    loss_fn: ContrastiveLoss
    loader: DataLoader
    metrics_log: MetricsLog
    ignore_ids: torch.Tensor | None  # token ids that get no recurrence target
    use_prominence_loss: bool
    start_epoch: int = 0
    step: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"rsum": -1.0})

    def phase(self, epoch: int, step: int) -> Phase:
        """The schedule at (epoch, step), applied to the optimizer and the loss."""
        train = self.cfg.train
        now = schedule(
            epoch,
            step,
            decay_epochs=train.lr_decay_epochs,
            warmup_steps=train.lr_warmup_steps,
            all_negatives_epochs=train.all_negatives_epochs,
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * now.lr_factor
        self.loss_fn.max_violation = now.hardest_negative
        return now

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def load_run_data(cfg: Config) -> tuple[Config, RegionStore, CaptionSet, CaptionSet]:
    """The store and the train / validation captions, checked before anything is written;
    the config comes back fitted to the store (``fit_to_store``)."""
    store = RegionStore(cfg.data.regions)
    train_caps = load_split(cfg, store, cfg.data.train_split)
    val_caps = load_split(cfg, store, cfg.data.val_split).head(cfg.data.val_limit)
    is_main = _dist_info()[0] == 0
    return fit_to_store(cfg, store.meta, log if is_main else None), store, train_caps, val_caps


def setup_run(
    cfg: Config,
    store: RegionStore,
    train_caps: CaptionSet,
    val_caps: CaptionSet,
    *,
    device: torch.device,
    resume: bool,
) -> Run:
    """Seed, build the model, optimizer and loader, and load ``last.pt`` when resuming."""
    rank, world, _ = _dist_info()
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed + rank)
    label_names = list(store.meta.get("label_names", []))
    model = build_model(cfg.model, label_names=label_names).to(device)
    optimizer = build_optimizer(model, cfg)
    # the schedule scales these; read before a resumed state overwrites them with a scaled rate
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    amp_dtype = training_precision(cfg.train.amp, device)
    # float16 overflows where bfloat16 does not: only float16 needs its loss scaled
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, step, best = 0, 0, {"rsum": -1.0}
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        if cfg.train.lr_warmup_steps > 0 and not ckpt["config"]["train"].get("lr_warmup_steps"):
            raise ValueError(
                f"{run_dir / 'last.pt'} was trained without "
                "train.lr_warmup_steps: resume with the run's own config"
            )
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]
        set_rng_state(ckpt["rng"])
        if rank == 0:
            log.info("resumed from %s at epoch %d", run_dir / "last.pt", start_epoch)

    use_prominence_loss = cfg.train.recurrence_weight > 0 and cfg.model.use_prominence
    ignore_ids = None
    if use_prominence_loss and cfg.train.recurrence_skip_function_words:
        ignore_ids = function_word_ids(model.tokenize).to(device)
    dataset = CaptionPairDataset(store, train_caps.image_ids, train_caps.captions)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=(
            DistributedSampler(dataset, world, rank, seed=cfg.train.seed)
            if dist.is_initialized()
            else RandomSampler(dataset)
        ),
        drop_last=len(dataset) > cfg.train.batch_size * world,
        num_workers=cfg.data.num_workers,
        # workers only read the store and tokenize on the CPU; batches move to the device in
        # the loop, so a worker never touches CUDA (a forked CUDA context would fail)
        collate_fn=PairCollator(model.tokenize, with_siblings=use_prominence_loss),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    net = DistributedDataParallel(model) if dist.is_initialized() else model
    metrics_log = MetricsLog(run_dir / "metrics.csv")
    if rank == 0:  # rows a crash logged past the checkpoint (or a fresh run's: all) go
        metrics_log.truncate_after(step)
    return Run(
        cfg=cfg,
        device=device,
        is_main=rank == 0,
        world=world,
        store=store,
        label_names=label_names,
        val_caps=val_caps,
        model=model,
        net=net,
        optimizer=optimizer,
        base_lrs=base_lrs,
        scaler=scaler,
        amp_dtype=amp_dtype,
        loss_fn=ContrastiveLoss(margin=cfg.train.margin),
        loader=loader,
        metrics_log=metrics_log,
        ignore_ids=ignore_ids,
        use_prominence_loss=use_prominence_loss,
        start_epoch=start_epoch,
        step=step,
        best=best,
    )


def _losses(run: Run, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, triplet, weighted prominence term or None) of one batch, under autocast."""
    device = run.device
    regions = batch["regions"].to(device, non_blocking=True)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    image_index = batch["image_index"].to(device, non_blocking=True)
    with run.autocast():
        sims, txt = run.net(regions, input_ids, attention_mask, return_text=True)
        triplet = run.loss_fn(sims.float(), image_ids=image_index)
        if not run.use_prominence_loss:
            return triplet, triplet, None
        targets = sibling_targets(
            txt.token_ids,
            txt.mask,
            batch["sibling_ids"].to(device, non_blocking=True),
            image_index,
            run.ignore_ids,
        )
        prominence = run.cfg.train.recurrence_weight * prominence_loss(
            txt.log_prominence.float(), targets
        )
    return triplet + prominence, triplet, prominence


def train_one_epoch(run: Run, epoch: int, progress: bool = True) -> torch.Tensor:
    """One pass over the training loader; returns the last step's loss (a device tensor).

    The host waits for the device only every ``train.log_every`` steps: that is when the
    loss is logged and checked, so a non-finite loss stops the run within that many steps
    (naming the first bad one) and before anything is saved.
    """
    cfg = run.cfg
    run.model.train()
    bar = progress_of(
        run.loader,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        unit="step",
        enabled=progress and run.is_main,
        leave=False,
    )
    first_bad = torch.tensor(-1, device=run.device)  # the first step with a non-finite loss
    bad_loss = torch.zeros((), device=run.device)  # and its value
    loss = torch.zeros((), device=run.device)
    batches = len(run.loader)
    for i, batch in enumerate(bar):
        run.phase(epoch, run.step)  # the one place the schedule is applied
        loss, triplet, prominence = _losses(run, batch)
        newly_bad = (first_bad < 0) & ~torch.isfinite(loss)
        first_bad = torch.where(newly_bad, run.step + 1, first_bad)
        bad_loss = torch.where(newly_bad, loss.detach().float(), bad_loss)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.step += 1
        if run.step % cfg.train.log_every and i + 1 < batches:
            continue
        bad = int(first_bad)  # one host sync per log interval
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss ({bad_loss.item()}) at epoch {epoch + 1}, step {bad}: lower "
                "train.lr, check the region features for inf/NaN, or set train.amp=false"
            )
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if run.is_main and run.step % cfg.train.log_every == 0:
            # loss = triplet + prominence (the weighted recurrence term; blank when off)
            run.metrics_log.write(
                epoch=epoch + 1,
                step=run.step,
                loss=round(loss.item(), 5),
                lr=run.optimizer.param_groups[0]["lr"],  # the rate this step took
                rsum="",
                triplet=round(triplet.item(), 5),
                prominence=round(prominence.item(), 5) if prominence is not None else "",
            )
    return loss


def validate_and_save(run: Run, epoch: int, loss: torch.Tensor) -> dict:
    """Validation rSum on the main rank, a metrics row, ``best.pt`` when it improves and
    ``last.pt`` (everything a resume needs). Returns the validation metrics."""
    cfg, model = run.cfg, run.model
    run_dir = Path(cfg.run_dir)
    val, _ = evaluate_split(
        model, run.store, run.val_caps, batch_size=cfg.train.eval_batch_size, device=run.device
    )
    run.metrics_log.write(
        epoch=epoch + 1,
        step=run.step,
        loss=round(loss.item(), 5),
        lr=run.optimizer.param_groups[0]["lr"],
        rsum=round(val["rsum"], 3),
        triplet="",
        prominence="",
    )
    payload = model_payload(model, cfg, run.label_names)
    if val["rsum"] > run.best["rsum"]:
        run.best = {"rsum": val["rsum"], "epoch": epoch + 1, "metrics": val}
        save_checkpoint(run_dir / "best.pt", **payload, epoch=epoch, best=run.best)
    save_checkpoint(
        run_dir / "last.pt",
        **payload,
        optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict(),
        epoch=epoch,
        step=run.step,
        best=run.best,
        rng=rng_state(),
    )
    return val


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` and return the best validation metrics. ``resume`` continues ``last.pt``."""
    rank, world, local_rank = _dist_info()
    device = resolve_device(cfg.train.device)
    if _launched_distributed():
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.train.ddp_timeout_minutes))
        if rank == 0:
            log.info("distributed training: %d process(es), backend %s", world, backend)
    is_main = rank == 0
    run_dir = Path(cfg.run_dir)
    cfg, store, train_caps, val_caps = load_run_data(cfg)  # before the folder is touched
    lock = WriterLock(run_dir / "train.lock", f"run folder {run_dir}")
    if is_main:
        lock.acquire()  # two runs in one folder would overwrite each other's checkpoints
        save_config(cfg, run_dir / "config.yaml")
    try:
        run = setup_run(cfg, store, train_caps, val_caps, device=device, resume=resume)
        epoch_seconds: dict[int, float] = {}
        for epoch in range(run.start_epoch, cfg.train.epochs):
            if isinstance(run.loader.sampler, DistributedSampler):
                run.loader.sampler.set_epoch(epoch)
            started = time.time()
            loss = train_one_epoch(run, epoch, progress)
            epoch_seconds[epoch + 1] = time.time() - started  # training only, not validation
            if is_main:
                val = validate_and_save(run, epoch, loss)
                if progress:
                    log.info(
                        "epoch %d: loss %.4f  val rSum %.1f  best %.1f  (%.0f s)",
                        epoch + 1,
                        loss.item(),
                        val["rsum"],
                        run.best["rsum"],
                        time.time() - started,
                    )
            if dist.is_initialized():
                dist.barrier()  # the timeout covers rank 0's validation
        if is_main:
            atomic_write_json(run_dir / "best.json", run.best, indent=2)
            # what a cost comparison reads; a resumed run lists the epochs it trained
            timing = {"train_pairs": len(run.loader.dataset), "epoch_seconds": epoch_seconds}
            atomic_write_json(run_dir / "timing.json", timing, indent=2)
    finally:
        lock.release()
    if dist.is_initialized():
        dist.destroy_process_group()
    return run.best
