"""The run folder's config.yaml for a watched loop: what the watch knows of the run, in `dcal train`'s layout
(the doctor reads it), and the run record's default names for a `dcal.DCAL` with a `dcal.UncertaintyLoss`."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..nonfinite import (
    scaler_enabled,
)


def _optimizer_name(opt: torch.optim.Optimizer) -> str:
    """The run record's name: ``adamw``; ``adam_l2`` for Adam with coupled weight decay (the seed's)."""
    name = type(opt).__name__.lower()
    decay = max(float(g.get("weight_decay", 0.0) or 0.0) for g in opt.param_groups)
    if name == "adam":
        if any(g.get("decoupled_weight_decay") for g in opt.param_groups):
            return "adamw"
        return "adam_l2" if decay > 0 else "adam"
    return name


def _default_keys(model: nn.Module, loss_fn: Any) -> dict[str, str]:
    """For a `dcal.DCAL` with a `dcal.UncertaintyLoss`: ``loss1``/``w1``... → ``loss_sa``/``w_sa``..."""
    from dcal.loss import UncertaintyLoss
    from dcal.model import DCAL

    if not isinstance(model, DCAL) or not isinstance(loss_fn, UncertaintyLoss):
        return {}
    branches = [b for b, on in (("sa", True), ("glca", model.glca is not None), ("pwca", model.pwca_enabled)) if on]
    keys = {}
    for i, b in enumerate(branches):
        keys[f"loss{i + 1}"] = f"loss_{b}"
        keys[f"w{i + 1}"] = f"w_{b}"
    return keys


def run_config(w) -> dict:
        """What the watch knows of the run, in `dcal train`'s config.yaml layout (the doctor reads it)."""
        opt = w.optimizer
        model: dict[str, Any] = {"class": type(w.model).__name__,
                                 "parameters": sum(p.numel() for p in w.model.parameters())}
        from dcal.model import DCAL

        if isinstance(w.model, DCAL):
            model.update(glca=w.model.glca is not None, pwca=w.model.pwca_enabled)
        train: dict[str, Any] = {"optimizer": _optimizer_name(opt),
                                 "weight_decay": max(float(g.get("weight_decay", 0.0) or 0.0) for g in opt.param_groups)}
        if w._batch_size is not None:
            train["batch_size"] = w._batch_size
        if w.accum is not None:
            train["grad_accum_steps"] = w.accum
        if w.loss_fn is not None and hasattr(w.loss_fn, "bounds"):
            b = w.loss_fn.bounds
            train["uncertainty_bounds"] = None if b is None else [float(x) for x in b]
        derived: dict[str, Any] = {"lr": w._peak_lr or float(opt.param_groups[0]["lr"]), "world_size": 1}
        num_classes = getattr(w.model, "num_classes", None)
        if isinstance(num_classes, int) and num_classes > 0:
            derived["num_classes"] = num_classes
        if w._batch_size is not None and w.accum is not None:
            derived["global_batch"] = w._batch_size * w.accum
        return {"model": model, "train": train, "derived": derived,
                "watch": {"loss_fn": None if w.loss_fn is None else type(w.loss_fn).__name__,
                          "keys": dict(w.user_keys), "replay": w.replay is not None, "mode": w.mode,
                          "grad_scaler": scaler_enabled(w.scaler)}}
