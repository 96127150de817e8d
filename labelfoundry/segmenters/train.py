"""Train a downstream network on (synthetic) labeled data (HandsOff §4.1, App. B.3).

One plain loop: Adam (lr 1e-3), bf16 autocast where it pays (CUDA, CPUs with native bf16), checkpoints to ``out_dir`` every
``checkpoint_every`` steps and at the end, exact resume from the newest checkpoint.

Fine-tuning on a second dataset (the paper's Cityscapes step) is a second call with the
already-trained model, the second dataset and a *different* ``out_dir`` (e.g.
``out_dir / "finetune"``): calling again with the same ``out_dir`` resumes the first run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset

from labelfoundry.precision import bf16_autocast_ok
from labelfoundry.segmenters.augment import augment_batch
from labelfoundry.segmenters.batch import prepare_batch
from labelfoundry.segmenters.checkpoint import (
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from labelfoundry.segmenters.losses import task_loss
from labelfoundry.segmenters.metrics import evaluate_segmenter
from labelfoundry.segmenters.models import Task

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Optimisation settings (defaults follow HandsOff App. B.3: Adam, lr 1e-3, batch 64)."""

    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(20, ge=1, description="used when max_steps is None")
    max_steps: int | None = Field(None, ge=1, description="total optimiser steps; overrides epochs")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "bf16", description="autocast dtype: bf16 on CUDA and on CPUs with native bf16 (else fp32); fp16 on CUDA only"
    )
    channels_last: bool = Field(
        True, description="train in channels-last memory format (oneDNN's preferred conv layout on CPU: the tiny "
        "U-Net's fp32 step 0.82x the time, bench/segmenter_step.py --layouts); same numbers run to run either way"
    )
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    keep_last: int = Field(2, description="checkpoints kept in out_dir (<=0 keeps all)")
    ignore_index: int = 255
    hflip: bool = Field(False, description="random horizontal flip; unsafe for left/right labels")
    flip_permutation: list[int] | None = Field(
        None, description="class-id / heatmap-channel mirror map applied when flipping"
    )
    color_jitter: float = Field(0.0, ge=0)
    blur_sigma: float = Field(0.0, ge=0, description="half the samples blurred with sigma in "
                              "[min(0.2, this), this] px (0: off)")
    pixel_noise: float = Field(0.0, ge=0, description="additive Gaussian noise, std in [0, this] per sample (0: off)")
    num_workers: int = Field(0, ge=0)
    seed: int = Field(0, description="seeds data order and augmentation")
    log_every: int = Field(50, ge=1)
    val_every: int | None = Field(None, ge=1, description="steps between validations")
    num_classes: int | None = Field(
        None, description="for validation mIoU; default: the Segmenter's cfg.num_classes"
    )


class TrainResult(BaseModel):
    """What a (possibly resumed) training run did. ``losses`` covers all steps 1..step."""

    step: int
    steps_per_epoch: int
    losses: list[float]
    resumed_from: int = 0
    last_checkpoint: Path | None = None
    val_metrics: list[dict] = []


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch: distinct runs' seeds never share an epoch's order
    (with seed + epoch, seed 1's first epoch would be seed 0's second). Seed 0 gives 0, 1, 2, ..."""
    return seed * 1_000_003 + epoch


def _batch_stream(
    data: Dataset | DataLoader, cfg: TrainConfig, start_step: int, sample_weights: torch.Tensor | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches starting at ``start_step``.

    For a Dataset the order is a seeded permutation per epoch (``epoch_seed``), so resuming
    is exact; the last partial batch is dropped. With ``sample_weights`` each epoch instead
    draws as many indices as a permutation would use, with replacement, in proportion to the
    weights (same seeding, so resuming stays exact). A DataLoader is iterated as given and the
    first ``start_step % len(loader)`` batches are skipped on resume (exact only if the
    loader's order is deterministic).
    """
    if isinstance(data, DataLoader):
        skip = start_step % len(data)
        while True:
            for i, batch in enumerate(data):
                if i >= skip:
                    yield batch
            skip = 0
    n = len(data)
    bs = min(cfg.batch_size, n)
    per_epoch = n // bs
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
        if sample_weights is None:
            perm = torch.randperm(n, generator=gen)
        else:
            perm = torch.multinomial(sample_weights, per_epoch * bs, replacement=True, generator=gen)
        batches = [perm[i * bs : (i + 1) * bs].tolist() for i in range(skip, per_epoch)]
        # its own generator: worker seeds come from (seed, epoch), not from the global RNG
        yield from DataLoader(data, batch_sampler=batches, num_workers=cfg.num_workers,
                              generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
        epoch, skip = epoch + 1, 0


def _check_weights(data: Dataset | DataLoader, weights: Sequence[float] | None) -> torch.Tensor | None:
    """Weights as a float64 tensor, checked up front (a DataLoader brings its own sampler)."""
    if weights is None:
        return None
    if isinstance(data, DataLoader):
        raise ValueError("sample_weights needs a Dataset; a DataLoader already has its own sampler")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (len(data),):
        raise ValueError(f"sample_weights has shape {tuple(w.shape)}; expected ({len(data)},), one per item")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("sample_weights must be finite, non-negative and not all zero")
    return w


def _steps_per_epoch(data: Dataset | DataLoader, batch_size: int) -> int:
    if isinstance(data, DataLoader):
        return len(data)
    return len(data) // min(batch_size, len(data))


class _Amp(NamedTuple):
    """Autocast settings of one run: whether on, its dtype, and the fp16 loss scaler."""

    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler


def autocast_settings(amp: str, device: torch.device) -> _Amp:
    """bf16 where ``bf16_autocast_ok`` says it pays (CUDA, or a CPU with native bf16); fp16 on
    CUDA only (with a loss scaler); otherwise fp32. Checked at run time, so one config runs anywhere."""
    if amp == "fp16":
        on = device.type == "cuda"
        return _Amp(on, torch.float16, torch.amp.GradScaler("cuda", enabled=on))
    on = amp == "bf16" and bf16_autocast_ok(device)
    return _Amp(on, torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False))


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    amp: _Amp,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    task: Task,
    device: torch.device,
    aug_gen: torch.Generator,
) -> float:
    """One optimiser step on one collated batch (augmented with ``aug_gen``); returns the loss."""
    x, targets = prepare_batch(batch, task, device)
    x = augment_batch(
        x, targets, task, aug_gen, hflip=cfg.hflip,
        flip_permutation=cfg.flip_permutation, color_jitter=cfg.color_jitter,
        blur_sigma=cfg.blur_sigma, pixel_noise=cfg.pixel_noise,
    )
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
        out = model(x)
    loss = task_loss(out, targets, task, cfg.ignore_index)  # in float32 (task_loss upcasts)
    opt.zero_grad(set_to_none=True)
    amp.scaler.scale(loss).backward()
    amp.scaler.step(opt)
    amp.scaler.update()
    return float(loss.detach())


def _resume(
    out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, amp: _Amp, aug_gen: torch.Generator,
    result: TrainResult,
) -> list[float]:
    """Load the newest checkpoint in ``out_dir`` (if any) into the run; returns the loss history."""
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return []
    state = load_checkpoint(ckpt)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    amp.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], aug_gen)
    result.resumed_from, result.last_checkpoint = int(state["step"]), ckpt
    log.info("resumed from %s (step %d)", ckpt, result.resumed_from)
    return state["losses"].tolist()


def _save(
    out_dir: Path, keep_last: int, model: nn.Module, opt: torch.optim.Optimizer, amp: _Amp,
    aug_gen: torch.Generator, losses: list[float],
) -> Path:
    """Checkpoint everything a resume needs (weights, optimiser, scaler, RNG, loss history)."""
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": amp.scaler.state_dict(),
        "step": len(losses),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "rng": capture_rng(aug_gen),
    }
    path = save_checkpoint(checkpoint_path(out_dir, len(losses)), state)
    prune_checkpoints(out_dir, keep_last)
    return path


def _validate(
    model: nn.Module, val_data: Dataset | DataLoader, cfg: TrainConfig, task: Task, device: torch.device,
    step: int,
) -> dict:
    """Validation metrics at ``step`` (mIoU needs the class count: cfg's, else the model's)."""
    num_classes = cfg.num_classes or getattr(getattr(model, "cfg", None), "num_classes", 0)
    metrics = evaluate_segmenter(
        model, val_data, task, num_classes, device, batch_size=cfg.batch_size, ignore_index=cfg.ignore_index,
    )
    log.info("step %d validation: %s", step, metrics)
    return {"step": step, **metrics}


def _log_progress(d: dict) -> None:
    log.info("step %d/%d loss %.4f (%.1f s)", d["step"], d["steps"], d["loss"], d["seconds"])


def train_segmenter(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    cfg: TrainConfig,
    *,
    task: Task,
    out_dir: str | Path,
    val_data: Dataset | DataLoader | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    sample_weights: Sequence[float] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_data`` (items: see ``segmenters.batch``).

    Runs ``cfg.max_steps`` steps (or ``cfg.epochs`` epochs) in total, counting steps done by
    a resumed checkpoint. Returns the full per-step loss history. ``sample_weights`` (one
    non-negative weight per item of a Dataset, e.g. from ``labelfoundry.sampling``) draws
    training items in proportion to them instead of one permutation per epoch. ``progress``
    receives {"step", "steps", "loss", "seconds"} every ``cfg.log_every`` steps and at the last
    step (default: a line on this module's logger).
    """
    weights = _check_weights(train_data, sample_weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    amp = autocast_settings(cfg.amp, device)
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = _steps_per_epoch(train_data, cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    result = TrainResult(step=0, steps_per_epoch=per_epoch, losses=[])
    losses = _resume(out_dir, model, opt, amp, aug_gen, result) if resume else []

    batches = _batch_stream(train_data, cfg, len(losses), weights)
    report = progress or _log_progress
    t0 = time.monotonic()
    while len(losses) < total:
        losses.append(train_step(model, opt, amp, next(batches), cfg, task, device, aug_gen))
        step = len(losses)
        if step % cfg.log_every == 0 or step == total:
            report({"step": step, "steps": total, "loss": losses[-1], "seconds": time.monotonic() - t0})
        if step % cfg.checkpoint_every == 0 or step == total:
            result.last_checkpoint = _save(out_dir, cfg.keep_last, model, opt, amp, aug_gen, losses)
        if val_data is not None and cfg.val_every and step % cfg.val_every == 0:
            result.val_metrics.append(_validate(model, val_data, cfg, task, device, step))

    step = len(losses)
    if val_data is not None and (not result.val_metrics or result.val_metrics[-1]["step"] != step):
        result.val_metrics.append(_validate(model, val_data, cfg, task, device, step))
    result.step, result.losses = step, losses
    return result
