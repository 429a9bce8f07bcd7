"""Find the first module whose output or gradient went non-finite (NaN/Inf): fairseq's NanDetector, in two tiers.

Tier 1 (`finite_checks`, every step): the loss terms, the uncertainty weights w_i and the gradient norm are
checked with one device sync. Tier 2 (`NonFiniteDetector`, only when tier 1 fires): the micro-batch is
replayed under hooks on every module, which name the first module whose forward output, gradient w.r.t.
its inputs, or parameter gradient is non-finite. `NonFiniteCallback` wires both into the trainer.

`FiniteGuard` holds both tiers for one optimiser step at a time and needs no trainer: `NonFiniteCallback`
(the `dcal.train.Trainer`'s events) and `diagnostics.watch` (hooks on any loop) are its two thin users.

Errors are raised directly from the hook that finds them: exceptions raised in autograd hooks propagate out
of ``loss.backward()`` unchanged (tested), so there is nothing to re-raise later, except for the one case
described in `NonFiniteDetector`. `NonFiniteError` subclasses `dcal.NonFiniteLossError` (what the trainer's
own check raises): ``except dcal.NonFiniteLossError`` catches both.

Mixed precision: a `torch.amp.GradScaler` skips the optimiser step whose *scaled* gradients overflowed and
lowers its scale; that is its design, not a fault. Given ``scaler=``, the detector and the guard treat a
non-finite gradient (with a finite loss) as such an overflow; a non-finite forward value (the loss, an
activation, w) is a fault whatever the scaler does, and so is a run of `MAX_OVERFLOWS_IN_A_ROW` overflows.

The package's modules, one concern each: `checks` (`NonFiniteError`, `describe_tensor`, tier 1's
`finite_checks`), `detector` (tier 2's `NonFiniteDetector`), `guard` (`FiniteGuard`, `StepCheck`: one step of
any loop) and `callback` (`NonFiniteCallback`, the trainer's). Every name is importable from here.
"""
from __future__ import annotations

from dcal.runfolder import AMP_OVERFLOW  # the skip_reason of a step the GradScaler skipped (re-exported)

from .callback import NonFiniteCallback
from .callback import _loss_weights as _loss_weights  # diagnostics.watch's
from .checks import (
    GRADIENT_TERMS,
    MAX_OVERFLOWS_IN_A_ROW,
    PHASES,
    NonFiniteError,
    describe_tensor,
    finite_checks,
    scaler_enabled,
)
from .detector import NonFiniteDetector
from .guard import FiniteGuard, StepCheck

__all__ = ["NonFiniteError", "NonFiniteDetector", "finite_checks", "NonFiniteCallback", "describe_tensor",
           "FiniteGuard", "StepCheck", "scaler_enabled", "MAX_OVERFLOWS_IN_A_ROW", "AMP_OVERFLOW", "PHASES",
           "GRADIENT_TERMS"]
