"""The training step `predict_step_memory` runs on meta tensors and `measure_step_memory` on real ones.

forward + loss, backward (× micro-batches), optimiser step and ``zero_grad(set_to_none=True)``, with phases
reported to a tracker; the default loss and optimiser; and what a CUDA step does differently from the CPU
dispatch the meta tensors follow (CUDA autocast's fp32 ops, the models' GPU attention path).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Batch", "Step", "default_loss", "default_optimizer", "CudaAutocast", "gpu_code_paths"]


def default_loss(output: Any, *targets: Tensor) -> Tensor:
    """The loss used when none is given: cross-entropy of the logits against ``targets[0]`` (random int64
    labels when no target is given). For a `dcal.DCALOutput`, the sum of `dcal.loss.branch_losses` over the
    branches present (what `dcal.UncertaintyLoss` weighs, its scalars aside); for a (B, C) tensor, its own;
    for a tuple, its first element's."""
    dcal_output = hasattr(output, "sa_logits")
    first = output.sa_logits if dcal_output else output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(first, Tensor) or first.dim() != 2:
        raise TypeError(f"predict_step_memory: the default loss needs (B, C) logits or a DCALOutput, got "
                        f"{type(output).__name__}; pass loss_fn")
    y = targets[0] if targets else torch.randint(0, first.shape[1], (first.shape[0],), device=first.device)
    if dcal_output:
        from dcal.loss import branch_losses

        return sum(branch_losses(output, y))
    return F.cross_entropy(first.float(), y)


def default_optimizer(model: nn.Module, loss_fn: Any) -> torch.optim.Optimizer:
    """AdamW over the model's (and an `nn.Module` loss's) trainable parameters."""
    params = list(model.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else [])
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)


def _autocast(amp_dtype: torch.dtype | None, device_type: str):
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device_type, dtype=amp_dtype)


class Batch:
    """One batch of the step: the forward's positional and keyword inputs and the loss's targets."""

    def __init__(self, args: tuple, kwargs: dict, targets: tuple):
        self.args, self.kwargs, self.targets = args, kwargs, targets

    def tensors(self) -> list[Tensor]:
        from torch.utils._pytree import tree_leaves

        return [t for t in tree_leaves((self.args, self.kwargs, self.targets)) if isinstance(t, Tensor)]


class Step:
    """forward + loss, backward (× micro-batches), optimiser step and zero_grad(set_to_none=True), with
    phases reported to `tracker` (``begin_phase(name)``, ``end_phase() -> (peak, snapshot)``, ``ident(t)``);
    the same code predicts and measures."""

    def __init__(self, model, loss_fn, optimizer, amp_dtype, grad_accum_steps, device_type, tracker):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.amp_dtype, self.accum, self.device_type, self.tracker = amp_dtype, grad_accum_steps, device_type, tracker
        self.peaks: dict[str, tuple[int, list]] = {}
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grad_ids: set = set()  # (storage, serial) of every tensor that was a .grad at a backward's end

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.tracker.begin_phase(name)
        yield
        peak, snap = self.tracker.end_phase()
        if peak >= self.peaks.get(name, (-1, None))[0]:
            self.peaks[name] = (peak, snap)

    def train(self, batch: Batch, first: bool = False) -> None:
        self.model.train()
        # With accumulation, micro-batch 2 onwards runs its forward with the gradients alive; later ones repeat
        # it. The first step only has to create the optimiser state: one micro-batch (its peaks are lower).
        for _ in range(1 if first else min(self.accum, 2)):
            with self.phase("forward"):
                with _autocast(self.amp_dtype, self.device_type):
                    out = self.model(*batch.args, **batch.kwargs)
                loss = self.loss_fn(out, *batch.targets)
                del out
            with self.phase("backward"):
                (loss / self.accum if self.accum > 1 else loss).backward()
                del loss
            ids = (self.tracker.ident(p.grad) for p in self.params if p.grad is not None)
            self.grad_ids |= {i for i in ids if i is not None}
        with self.phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, batch: Batch) -> None:
        self.model.eval()
        with self.phase("eval"), torch.no_grad(), _autocast(self.amp_dtype, self.device_type):
            out = self.model(*batch.args, **batch.kwargs)
            del out


# ============================================================================ CUDA semantics on CPU-dispatched meta tensors
_FP32_OUT = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax}
_FP32_IN = {F.layer_norm, F.group_norm}


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's fp32 ops that CPU autocast leaves in low precision (predict's module docstring, (2))."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if torch.is_autocast_enabled("cpu") and args and isinstance(args[0], Tensor) and args[0].is_floating_point():
            if func in _FP32_OUT and kwargs.get("dtype") is None and args[0].dtype != torch.float32:
                kwargs["dtype"] = torch.float32  # CUDA's fp32_set_opt_dtype: fp32 output, no input copy
            elif func in _FP32_IN:
                args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
                kwargs = {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v
                          for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def gpu_code_paths(model: nn.Module) -> Iterator[None]:
    """A model that computes differently on CPU says so with an ``attention_tiling`` attribute (`dcal.DCAL`:
    True lets CPU attention be tiled into row blocks, False runs the single untiled pass a GPU runs). It is
    set False while predicting for CUDA and restored after; a model without it is left alone."""
    tiling = getattr(model, "attention_tiling", None)
    if tiling is None:
        yield
        return
    model.attention_tiling = False
    try:
        yield
    finally:
        model.attention_tiling = tiling
