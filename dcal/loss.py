"""DCAL's branch losses, the uncertainty-weighted multi-task loss (Kendall et al. 2018, as FairMOT and DCAL
use it) that combines them, and the AdamW parameter groups."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .branches import BRANCHES  # the branch losses, in the order UncertaintyLoss weighs them (torch-free)
from .errors import ConfigError

__all__ = ["UncertaintyLoss", "branch_losses", "param_groups", "BRANCHES"]



def branch_losses(output, targets: Tensor, branches: Sequence[str] | None = None) -> list[Tensor]:
    """The fp32 cross-entropies of a `DCALOutput`'s branches against `targets` (B,), in the order of
    `branches` (default `BRANCHES` order): what `UncertaintyLoss` weighs. The one place the DCAL branch loss
    is written (the trainer, `dcal memory` and `diagnostics.predict_step_memory` call it).

    Args:
        output: a `dcal.DCALOutput` (anything with ``sa_logits``, ``glca_logits``, ``pwca_logits``).
        targets: (B,) int64 class indices.
        branches: the branches to compute, e.g. `dcal.build.active_branches(model)`; each must have logits
            in `output`. Default: every branch whose logits are present (SA, GLCA if built, PWCA in training).

    Raises:
        ValueError naming a requested branch that `output` has no logits for, or an unknown branch.
    """
    unknown = [b for b in branches or () if b not in BRANCHES]
    if unknown:
        raise ValueError(f"branch_losses: unknown branch(es) {unknown}; the branches are {BRANCHES}")
    logits = {b: getattr(output, f"{b}_logits") for b in BRANCHES}
    if branches is None:
        branches = [b for b in BRANCHES if logits[b] is not None]
    missing = [b for b in branches if logits[b] is None]
    if missing:
        raise ValueError(f"branch_losses: the output has no {'/'.join(missing)} logits ({missing[0]}_logits is None: "
                         "is the branch built, and PWCA in training mode?)")
    return [F.cross_entropy(logits[b].float(), targets) for b in branches]


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


def param_groups(model: nn.Module, loss: nn.Module | None = None, weight_decay: float = 0.05) -> list[dict]:
    """AdamW parameter groups (DCAL_METHOD.md §6): decay on weight matrices only.

    timm's `param_groups_weight_decay` decides, with the model's own `no_weight_decay()` names (DCAL's:
    the backbone's position embedding and class/register tokens): no decay on those, on biases and on
    every 1-D parameter (norm weights). The loss's w_i get their own group, named ``uncertainty``, never
    decayed (decay would pull the log-variances towards 0).
    """
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    for g in groups:
        g["name"] = "decay" if g["weight_decay"] else "no_decay"
    if loss is not None:
        lp = [p for p in loss.parameters() if p.requires_grad]
        if lp:
            groups.append({"params": lp, "weight_decay": 0.0, "name": "uncertainty"})
    return groups
