"""Learning-rate rules and the warmup + cosine schedule, per optimiser step (DCAL_METHOD.md §6).

The schedule is torch's `LambdaLR` over `warmup_cosine`, a pure function of the step, rather than timm's
`CosineLRScheduler`: the doctor and `dry_run_lr` recompute the LR of any step from it, and resume restores it
exactly from the LambdaLR state."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # torch loads only when a scheduler is built: the LR rules are read by torch-free tools
    import torch

__all__ = ["LR_RULES", "lr_for_rule", "global_batch_size", "warmup_cosine", "build_scheduler"]

LR_RULES = ("linear", "linear_per_gpu", "sqrt", "fixed")


def global_batch_size(batch_size: int, grad_accum_steps: int = 1, world_size: int = 1) -> int:
    """Images per optimiser step: micro-batch × accumulation × processes."""
    return batch_size * grad_accum_steps * world_size


def lr_for_rule(rule: str, *, base_lr: float = 5e-4, batch_size: int, grad_accum_steps: int = 1,
                world_size: int = 1, lr: float | None = None, reference_gpus: int = 4) -> float:
    """The peak LR each rule gives.

    - ``linear``: DeiT's rule on the global batch, base_lr·global/512 (1.5625e-5 at global batch 16).
    - ``linear_per_gpu``: the paper's "batch 16" read as a per-GPU batch on `reference_gpus` GPUs (DeiT's
      `main.py` scales by per-GPU batch × number of GPUs): base_lr·(micro × accumulation × reference_gpus)/512,
      6.25e-5 for batch 16 on 4 GPUs, whatever world size this run has.
    - ``sqrt``: the seed system's base_lr·sqrt(global/16) (5e-4 at global batch 16).
    - ``fixed``: ``lr`` as given.
    """
    if rule not in LR_RULES:
        raise ConfigError(f"train.lr_rule must be one of {LR_RULES}, got {rule!r}")
    g = global_batch_size(batch_size, grad_accum_steps, world_size)
    if rule == "linear":
        return base_lr * g / 512
    if rule == "linear_per_gpu":
        return base_lr * batch_size * grad_accum_steps * reference_gpus / 512
    if rule == "sqrt":
        return base_lr * math.sqrt(g / 16.0)
    if lr is None:
        raise ConfigError("train.lr_rule='fixed' needs train.lr")
    return float(lr)


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """LR at optimiser step `step` (0-based): linear warmup from ~0 to `peak`, then cosine to `floor`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    peak: float, floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that scales every group's lr to `warmup_cosine` (groups keep their own ratio to peak)."""
    if total_steps < 1:
        raise ConfigError(f"the schedule needs at least 1 optimiser step, got total_steps={total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"warmup steps ({warmup_steps}) must lie in 0..total steps ({total_steps})")
    for g in optimizer.param_groups:
        g["lr"] = peak
        g.setdefault("initial_lr", peak)

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup_steps, peak=peak, floor=floor) / peak

    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, factor)
