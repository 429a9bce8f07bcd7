"""Watch weight decay erode a run: the decay-dominated share, Σθ² and how many weights a Σlr can erase.

Adam with L2 *coupled* (``torch.optim.Adam(weight_decay=wd)``, the predecessor's optimiser) adds wd·θ to the
gradient before Adam divides by its running RMS. Where |wd·θ| > |g| the step's direction is the decay's, and
Adam's normalised step moves that weight by ≈ lr towards zero whatever wd is: over a run, by ≈ Σlr. A clip
of the total gradient norm shrinks every g and so makes more weights decay-dominated. Three numbers show it
in any run:

- `decay_dominated_share`: the share of parameters (with a gradient) whose |wd·θ| exceeds |g|, with the
  gradient as the optimiser sees it (after clipping) or before clipping (``grad_scale``). Under coupled L2 a
  share near 1 means the step is mostly decay; under decoupled decay (AdamW) the same share says only that
  the gradient is small next to wd·θ, since the decay (lr·wd·θ) is applied apart from Adam's step.
- `weight_sum_sq`: Σθ² of the weight matrices (parameters with ≥ 2 dimensions); erosion makes it fall.
- `magnitude_quantiles` / `share_below`: |θ| quantiles, and the share of weights with |θ| below a value
  (Σlr: what coupled L2 can zero in a run if the decay dominates throughout).

`DecayDominanceCallback` writes the first two into every step record of a `dcal.train.Trainer` run
(``metrics.jsonl``), measured after clipping and before the optimiser step (the only moment gradients and
weights belong to the same step). In any other loop call the functions between ``clip_grad_norm_`` and
``optimizer.step()``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from dcal.callbacks import Callback

__all__ = ["decay_dominated_share", "weight_sum_sq", "magnitude_quantiles", "share_below", "coupled_decay",
           "DecayDominanceCallback"]

Source = nn.Module | torch.optim.Optimizer | Iterable[torch.Tensor]


def _groups(source: Source, weight_decay: float | None) -> list[tuple[list[torch.Tensor], float]]:
    """(parameters, weight decay) per group: an optimizer's own groups, or one group of a module's / list's
    parameters with the given `weight_decay` (required then)."""
    if weight_decay is not None and (not math.isfinite(weight_decay) or weight_decay < 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(source, torch.optim.Optimizer):
        groups = [(list(g["params"]), float(g.get("weight_decay", 0.0)) if weight_decay is None else weight_decay)
                  for g in source.param_groups]
    else:
        if weight_decay is None:
            raise ValueError("weight_decay is required when the source is a module or a list of parameters "
                             "(pass the optimizer to use its groups' weight_decay)")
        groups = [(_params(source), weight_decay)]
    return groups


def _params(source: Source) -> list[torch.Tensor]:
    if isinstance(source, torch.optim.Optimizer):
        return [p for g in source.param_groups for p in g["params"]]
    params = list(source.parameters()) if isinstance(source, nn.Module) else list(source)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a Tensor")
    return params


@torch.no_grad()
def decay_dominated_share(source: Source, weight_decay: float | None = None, *, grad_scale: float = 1.0) -> float:
    """The share of parameters whose decay term outweighs their gradient: |wd·θ| > grad_scale·|g|.

    Counted over every parameter element that has a gradient (``.grad`` not None); a group with
    weight_decay 0 counts as never dominated. Call it after clipping and before ``optimizer.step()``.

    Args:
        source: an optimizer (each group's ``weight_decay``, unless `weight_decay` is given), a module or a
            list of parameters (then `weight_decay` is required).
        weight_decay: the decay to compare with; overrides the optimizer's.
        grad_scale: multiplies |g| (> 0): the factor clipping divided the gradient by, to ask the same
            question of the unclipped gradient (``max(1, grad_norm / clip)``).

    Raises:
        ValueError: no parameter has a gradient, a negative/non-finite weight_decay, grad_scale <= 0, a
            non-finite gradient (name its index: a share of NaNs means nothing).
    """
    if not (math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale!r}")
    dominated = counted = 0
    for gi, (params, wd) in enumerate(_groups(source, weight_decay)):
        for pi, p in enumerate(params):
            if p.grad is None:
                continue
            g = p.grad.detach().abs()
            if not torch.isfinite(g).all():
                raise ValueError(f"decay_dominated_share: group {gi}, parameter {pi} (shape {tuple(p.shape)}) "
                                 f"has a non-finite gradient")
            dominated += int((wd * p.detach().abs() > grad_scale * g).sum())
            counted += p.numel()
    if counted == 0:
        raise ValueError("decay_dominated_share: no parameter has a gradient (call it after backward() and "
                         "before optimizer.zero_grad())")
    return dominated / counted


@torch.no_grad()
def weight_sum_sq(source: Source) -> float:
    """Σθ² over the weight matrices (parameters with ≥ 2 dimensions: not biases, norms' gains or scalars).

    Raises:
        ValueError: the source holds no parameter with ≥ 2 dimensions.
    """
    mats = [p for p in _params(source) if p.ndim >= 2]
    if not mats:
        raise ValueError("weight_sum_sq: no parameter with >= 2 dimensions")
    return float(sum(p.detach().double().pow(2).sum() for p in mats))


def _abs_values(source: Source, matrices_only: bool) -> torch.Tensor:
    params = [p for p in _params(source) if p.ndim >= 2 or not matrices_only]
    if not params:
        raise ValueError("no parameter to measure" + (" with >= 2 dimensions" if matrices_only else ""))
    return torch.cat([p.detach().reshape(-1).abs().float() for p in params])


@torch.no_grad()
def magnitude_quantiles(source: Source, quantiles: Sequence[float] = (0.5, 0.9, 0.99), *,
                        matrices_only: bool = True) -> dict[float, float]:
    """Quantiles of |θ| over the weights: {q: value}.

    Args:
        source: a module, an optimizer or a list of parameters.
        quantiles: each in [0, 1].
        matrices_only: only parameters with ≥ 2 dimensions (those weight decay is usually meant for).

    Raises:
        ValueError: a quantile outside [0, 1], or nothing to measure.
    """
    bad = [q for q in quantiles if not 0.0 <= q <= 1.0]
    if bad or not quantiles:
        raise ValueError(f"quantiles must be a non-empty list of values in [0, 1], got {list(quantiles)}")
    values = _abs_values(source, matrices_only).double().sort().values
    # torch.quantile refuses tensors above 2^24 elements: index the sorted values (linear interpolation, as it does)
    pos = torch.tensor(list(quantiles), dtype=torch.float64) * (values.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    out = values[lo] + (values[hi] - values[lo]) * (pos - lo)
    return {float(q): float(v) for q, v in zip(quantiles, out)}


@torch.no_grad()
def share_below(source: Source, value: float, *, matrices_only: bool = True) -> float:
    """The share of weights with |θ| < `value` (e.g. a run's Σlr: what coupled L2 can zero in it).

    Raises:
        ValueError: a negative or non-finite value, or nothing to measure.
    """
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"value must be a finite number >= 0, got {value!r}")
    a = _abs_values(source, matrices_only)
    return float((a < value).sum()) / a.numel()


def coupled_decay(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer adds weight decay to the gradient (coupled L2) in any group with decay > 0.

    ``torch.optim.AdamW`` (and any optimizer whose ``decoupled_weight_decay`` flag is set) decouples it;
    Adam, SGD, RMSprop and the rest couple it.
    """
    if isinstance(optimizer, torch.optim.AdamW):
        return False
    return any(float(g.get("weight_decay", 0.0)) > 0 and not g.get("decoupled_weight_decay", False)
               for g in optimizer.param_groups)


class DecayDominanceCallback(Callback):
    """Writes ``decay_dominated`` (share after clipping), ``decay_dominated_unclipped`` (the same share for
    the gradient before clipping) and ``weight_sum_sq`` (Σθ² of the weight matrices, after the step) into the
    step record of every `every`-th optimiser step, and logs once whether the optimizer couples its decay.

    Args:
        weight_decay: the decay to compare with; None uses each optimizer group's ``weight_decay``.
        every: measure steps 1, 1 + every, … (record numbers); other steps get no fields.

    Needs from the trainer: model, optimizer, step, grad_norm (the total norm before clipping),
    cfg.train.clip_grad, record, log().
    """

    order = 50  # before the metrics logger, which writes the record

    def __init__(self, weight_decay: float | None = None, every: int = 1):
        if every < 1:
            raise ValueError(f"DecayDominanceCallback every must be >= 1, got {every}")
        if weight_decay is not None and (not math.isfinite(weight_decay) or weight_decay < 0):
            raise ValueError(f"DecayDominanceCallback weight_decay must be a finite number >= 0, got {weight_decay!r}")
        self.weight_decay, self.every = weight_decay, every
        self._pending: dict | None = None

    def before_fit(self, trainer) -> None:
        kind = "coupled (L2 added to the gradient)" if coupled_decay(trainer.optimizer) else "decoupled or none"
        trainer.log(f"DecayDominanceCallback: {type(trainer.optimizer).__name__} weight decay is {kind}")

    def before_step(self, trainer) -> None:
        self._pending = None
        if trainer.step % self.every != 0 or trainer.grad_norm is None:
            return
        norm = float(trainer.grad_norm)
        if not math.isfinite(norm):
            return  # a non-finite step: NonFiniteCallback's to report, and this step's share means nothing
        clip = trainer.cfg.train.clip_grad
        unclip = max(1.0, norm / clip) if clip else 1.0  # what clip_grad_norm_ divided every gradient by
        opt = trainer.optimizer
        self._pending = {"decay_dominated": decay_dominated_share(opt, self.weight_decay),
                         "decay_dominated_unclipped": decay_dominated_share(opt, self.weight_decay, grad_scale=unclip)}

    def after_step(self, trainer) -> None:
        if self._pending is None:
            return
        trainer.record.update(self._pending, weight_sum_sq=weight_sum_sq(trainer.model))
        self._pending = None
