"""Uncertainty-weighted multi-task loss (Kendall et al. 2018, as FairMOT and DCAL use it), and the
AdamW parameter groups."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .errors import ConfigError

__all__ = ["UncertaintyLoss", "param_groups"]


class UncertaintyLoss(nn.Module):
    """L = ½·Σ_i (e^{−w_i}·L_i + w_i) with learnable log-variances w_i.

    At the optimum w_i = log L_i: the effective weight ½·e^{−w_i} is ½/L_i, so similar branch losses give
    similar weights by construction, and a negative total is normal once the L_i fall below 1.

    Args:
        num_tasks: number of branch losses (3 for SA, GLCA, PWCA).
        init: initial w_i, a float or one value per task (0 in the paper).
        bounds: optional (low, high) clamp on w_i. Off by default: it exists only to reproduce the seed
            system, whose clamp to [−1, 1] holds w away from its optimum and zeroes its gradient there.
    """

    def __init__(self, num_tasks: int = 3, init: float | Sequence[float] = 0.0,
                 bounds: tuple[float, float] | None = None):
        super().__init__()
        if num_tasks < 1:
            raise ConfigError(f"UncertaintyLoss needs num_tasks >= 1, got {num_tasks}")
        w = torch.full((num_tasks,), float(init)) if isinstance(init, (int, float)) else torch.tensor(init, dtype=torch.float32)
        if w.shape != (num_tasks,):
            raise ConfigError(f"UncertaintyLoss init has {w.numel()} values for {num_tasks} tasks")
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ConfigError(f"UncertaintyLoss bounds must be (low, high) with low < high, got {bounds}")
        self.num_tasks = num_tasks
        self.bounds = bounds
        self.log_vars = nn.Parameter(w)

    def weights(self) -> Tensor:
        """The w_i actually used (after the optional clamp)."""
        return self.log_vars if self.bounds is None else self.log_vars.clamp(*self.bounds)

    def forward(self, losses: Sequence[Tensor]) -> Tensor:
        if len(losses) != self.num_tasks:
            raise ValueError(f"UncertaintyLoss expects {self.num_tasks} losses, got {len(losses)}")
        L = torch.stack([torch.as_tensor(x, dtype=torch.float32).reshape(()) for x in losses])  # (T,)
        w = self.weights()
        return 0.5 * (torch.exp(-w) * L + w).sum()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, bounds={self.bounds}"


_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def param_groups(model: nn.Module, loss: nn.Module | None = None, weight_decay: float = 0.05) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices only.

    No weight decay on biases, norm weights (every 1-D parameter), the position embedding, the class (and
    register) tokens, and the loss's w_i (their own group, named ``uncertainty``).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if loss is not None:
        lp = [p for p in loss.parameters() if p.requires_grad]
        if lp:
            groups.append({"params": lp, "weight_decay": 0.0, "name": "uncertainty"})
    return [g for g in groups if g["params"]]
