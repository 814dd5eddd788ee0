"""The training loop: one plain loop that reads top to bottom.

forward -> finite-loss check -> backward (AMP scaler on CUDA) -> clip -> step -> schedule;
after every epoch: validation rSum, ``last.pt`` (everything needed to resume exactly) and
``best.pt`` (best validation rSum so far). Runs under ``torchrun`` with
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


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` and return the best validation metrics. ``resume`` continues ``last.pt``."""
    rank, world, local_rank = _dist_info()
    device = resolve_device(cfg.train.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=cfg.train.ddp_timeout_minutes),
        )
    is_main = rank == 0
    run_dir = Path(cfg.run_dir)
    # the data are checked before the run folder is made or touched
    store = RegionStore(cfg.data.regions)
    label_names = list(store.meta.get("label_names", []))
    train_caps = load_split(cfg, store, cfg.data.train_split)
    val_caps = load_split(cfg, store, cfg.data.val_split)
    if cfg.data.val_limit and len(val_caps) > cfg.data.val_limit:
        keep = slice(0, cfg.data.val_limit)
        val_caps = CaptionSet(
            val_caps.image_ids[keep],
            val_caps.captions[keep],
            val_caps.splits[keep],
            val_caps.source,
        )
    cfg = fit_to_store(cfg, store.meta, log if is_main else None)
    lock = WriterLock(run_dir / "train.lock", f"run folder {run_dir}")
    if is_main:
        lock.acquire()  # two runs in one folder would overwrite each other's checkpoints
        save_config(cfg, run_dir / "config.yaml")
    try:
        seed_everything(cfg.train.seed + rank)

        model = build_model(cfg.model, label_names=label_names).to(device)
        loss_fn = ContrastiveLoss(margin=cfg.train.margin)  # max_violation is set per epoch
        optimizer = build_optimizer(model, cfg)
        base_lrs = [group["lr"] for group in optimizer.param_groups]

        def phase(epoch: int, step: int) -> Phase:
            """The schedule at (epoch, step), applied to the optimizer's learning rates."""
            now = schedule(
                epoch,
                step,
                decay_epochs=cfg.train.lr_decay_epochs,
                warmup_steps=cfg.train.lr_warmup_steps,
                all_negatives_epochs=cfg.train.all_negatives_epochs,
            )
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * now.lr_factor
            return now

        use_amp = cfg.train.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

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
            if is_main:
                log.info("resumed from %s at epoch %d", run_dir / "last.pt", start_epoch)

        use_prominence_loss = cfg.train.recurrence_weight > 0 and cfg.model.use_prominence
        ignore_ids = None
        if use_prominence_loss and cfg.train.recurrence_skip_function_words:
            ignore_ids = function_word_ids(model.tokenize).to(device)
        dataset = CaptionPairDataset(store, train_caps.image_ids, train_caps.captions)
        sampler = (
            DistributedSampler(dataset, world, rank, seed=cfg.train.seed)
            if world > 1
            else RandomSampler(dataset)
        )
        loader = DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            sampler=sampler,
            drop_last=len(dataset) > cfg.train.batch_size * world,
            num_workers=cfg.data.num_workers,
            collate_fn=PairCollator(model.tokenize, with_siblings=use_prominence_loss),
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        net = DistributedDataParallel(model, find_unused_parameters=False) if world > 1 else model
        metrics_log = MetricsLog(run_dir / "metrics.csv")
        if is_main:  # rows a crash logged past the checkpoint (or a fresh run's: all) go
            metrics_log.truncate_after(step)
        autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.float16)) if use_amp else nullcontext
        )

        for epoch in range(start_epoch, cfg.train.epochs):
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            loss_fn.max_violation = phase(epoch, step).hardest_negative
            model.train()
            started = time.time()
            bar = progress_of(
                loader,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                unit="step",
                enabled=progress and is_main,
                leave=False,
            )
            for batch in bar:
                regions = batch["regions"].to(device, non_blocking=True)
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                image_index = batch["image_index"].to(device)
                with autocast():
                    sims, txt = net(
                        *regions.as_tuple(), input_ids, attention_mask, return_text=True
                    )
                    triplet = loss_fn(sims.float(), image_ids=image_index)
                    loss = triplet
                    if use_prominence_loss:
                        targets = sibling_targets(
                            txt.token_ids,
                            txt.mask,
                            batch["sibling_ids"].to(device),
                            image_index,
                            ignore_ids,
                        )
                        prominence = cfg.train.recurrence_weight * prominence_loss(
                            txt.log_prominence.float(), targets
                        )
                        loss = triplet + prominence
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step}: "
                        "lower train.lr, check the region features for inf/NaN, or set "
                        "train.amp=false"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.train.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                phase(epoch, step)  # the rate of the next step
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if is_main and step % cfg.train.log_every == 0:
                    # loss = triplet + prominence (the weighted recurrence term; blank when off)
                    metrics_log.write(
                        epoch=epoch + 1,
                        step=step,
                        loss=round(loss.item(), 5),
                        lr=optimizer.param_groups[0]["lr"],
                        rsum="",
                        triplet=round(triplet.item(), 5),
                        prominence=round(prominence.item(), 5) if use_prominence_loss else "",
                    )
            phase(epoch + 1, step)  # the next epoch's rate

            if not is_main:
                dist.barrier()
                continue
            val, _ = evaluate_split(
                model, store, val_caps, batch_size=cfg.train.eval_batch_size, device=device
            )
            metrics_log.write(
                epoch=epoch + 1,
                step=step,
                loss=round(loss.item(), 5),
                lr=optimizer.param_groups[0]["lr"],
                rsum=round(val["rsum"], 3),
                triplet="",
                prominence="",
            )
            payload = model_payload(model, cfg, label_names)
            if val["rsum"] > best["rsum"]:
                best = {"rsum": val["rsum"], "epoch": epoch + 1, "metrics": val}
                save_checkpoint(run_dir / "best.pt", **payload, epoch=epoch, best=best)
            save_checkpoint(
                run_dir / "last.pt",
                **payload,
                optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(),
                epoch=epoch,
                step=step,
                best=best,
                rng=rng_state(),
            )
            if progress:
                print(
                    f"epoch {epoch + 1}: loss {loss.item():.4f}  val rSum {val['rsum']:.1f}  "
                    f"best {best['rsum']:.1f}  ({time.time() - started:.0f} s)",
                    flush=True,
                )
            if world > 1:
                dist.barrier()

        if is_main:
            atomic_write_json(run_dir / "best.json", best, indent=2)
    finally:
        lock.release()
    if world > 1:
        dist.destroy_process_group()
    return best
