"""`FiniteGuard`: tier 1 and tier 2 for one optimiser step at a time, for any training loop (the trainer's
callback and `diagnostics.watch` are its users)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch import Tensor

from .checks import (
    GRADIENT_TERMS,
    MAX_OVERFLOWS_IN_A_ROW,
    NonFiniteError,
    _scalar_text,
    _shorten,
    finite_checks,
    scaler_enabled,
)
from .detector import NonFiniteDetector


@dataclasses.dataclass
class StepCheck:
    """What `FiniteGuard.check` found for one optimiser step.

    Attributes:
        bad: the tier-1 names that were non-finite (empty for a healthy step).
        error: the fault: tier 2's finding, or the tier-1 term when tier 2 is off or did not reproduce it;
            None for a healthy step and for an overflow.
        overflow: the GradScaler skips this step because its scaled gradients overflowed (not a fault).
    """

    bad: list[str]
    error: NonFiniteError | None = None
    overflow: bool = False


def _base(name: str) -> str:
    """``grad_norm (micro-batch 1)`` / ``w[2]`` → ``grad_norm`` / ``w``."""
    return name.split(" (micro-batch")[0].split("[")[0]


class FiniteGuard:
    """Tier 1 and tier 2 for one optimiser step at a time, for any training loop.

    Per micro-batch, `add_micro` keeps references to its loss terms (detached) and to what `replay` needs to
    run it again; `check` tests them together with the step-level terms (gradient norm, w) in one
    `finite_checks` call, so a healthy step costs one device sync however many micro-batches it has. On a
    fault it replays the micro-batches whose terms failed (all of them when only a step-level term did)
    under `NonFiniteDetector` and returns the first module named. `NonFiniteCallback` and
    `diagnostics.watch` are its users.

    Args:
        model: the module tree tier 2 watches.
        loss_fn: the criterion; watched too (named ``loss_fn``) when it is an ``nn.Module``.
        replay: ``replay(batch)`` re-runs forward, loss and backward of one micro-batch, given the ``batch``
            passed to `add_micro`; None: tier 1 only (the error names the tier-1 term).
        scaler: the run's `torch.amp.GradScaler` or None; see `check`.
    """

    def __init__(self, model: nn.Module, *, loss_fn: Any = None, replay: Any = None, scaler: Any = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"FiniteGuard needs an nn.Module, got {type(model).__name__}")
        if replay is not None and not callable(replay):
            raise TypeError(f"replay must be a callable replay(batch), got {type(replay).__name__}")
        self.model = model
        self.loss_fn = loss_fn if isinstance(loss_fn, nn.Module) else None
        self.replay = replay
        self.scaler = scaler
        self.scaler_skips = scaler_enabled(scaler)
        self.overflows_in_a_row = 0
        self.replaying = False
        self._micro: list[tuple[dict[str, Any], Any]] = []

    @property
    def micro_batches(self) -> int:
        """Micro-batches added since `begin_step`."""
        return len(self._micro)

    def begin_step(self) -> None:
        """Forget the previous step's micro-batches."""
        self._micro = []

    def add_micro(self, terms: Mapping[str, Tensor | float | None], batch: Any = None) -> None:
        """Keep one micro-batch's loss terms (name → scalar or small tensor) and its ``batch`` for `replay`."""
        self._micro.append(({k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()}, batch))

    def check(self, step: int | None, values: Mapping[str, Any] | None = None, *,
              scaler_skipped: bool | None = None) -> StepCheck:
        """Tier 1 on this step's micro-batch terms and `values` (``grad_norm``, ``w``...); tier 2 on a fault.

        Args:
            step: the step's number, copied into the error.
            values: step-level terms; None entries are skipped.
            scaler_skipped: True: the GradScaler skipped this step (its ``optimizer.step`` never ran); False:
                the optimiser step runs whatever the values are; None (the trainer's case, before
                ``scaler.step``): an enabled scaler will skip a step whose gradients are non-finite.
                A skipped step with finite loss terms, or one whose only non-finite terms are gradient
                terms (`GRADIENT_TERMS`), is an overflow; `MAX_OVERFLOWS_IN_A_ROW` of them are a fault.
        """
        terms: dict[str, Any] = {}
        many = len(self._micro) > 1
        for i, (micro, _) in enumerate(self._micro):
            for k, v in micro.items():
                terms[f"{k} (micro-batch {i})" if many else k] = v
        terms.update(values or {})
        bad = finite_checks(terms)
        grads_only = bool(bad) and all(_base(k) in GRADIENT_TERMS for k in bad)
        overflow = (scaler_skipped is True and (not bad or grads_only)) or (
            scaler_skipped is None and self.scaler_skips and grads_only)
        if not overflow:
            self.overflows_in_a_row = 0  # a step that is not an overflow ends the run of them
            return StepCheck(bad, self._diagnose(step, bad, terms) if bad else None)
        self.overflows_in_a_row += 1
        if self.overflows_in_a_row < MAX_OVERFLOWS_IN_A_ROW:
            return StepCheck(bad, overflow=True)
        note = (f"{self.overflows_in_a_row} GradScaler overflows in a row (scale now "
                f"{self.scaler.get_scale():.3g}): the gradients are non-finite at any scale")
        self.overflows_in_a_row = 0  # reported once per run of them
        return StepCheck(bad, self._diagnose(step, bad or ["grad_norm"], terms, note=note, exempt_overflow=False))

    def locate(self, batch: Any, step: int | None = None, *, exempt_overflow: bool = True) -> NonFiniteError | None:
        """Replay one micro-batch under `NonFiniteDetector`; the error it raises, or None.

        Args:
            exempt_overflow: pass the scaler to the detector (a non-finite scaled gradient is an overflow).
        """
        if self.replay is None:
            raise RuntimeError("FiniteGuard.locate needs a replay(batch) callable (replay=None was given)")
        extra = {"loss_fn": self.loss_fn} if self.loss_fn is not None else None
        self.replaying = True
        try:
            with NonFiniteDetector(self.model, step=step, extra=extra,
                                   scaler=self.scaler if exempt_overflow else None):
                self.replay(batch)
        except NonFiniteError as e:
            return e
        finally:
            self.replaying = False
        return None

    def _diagnose(self, step: int | None, bad: list[str], values: Mapping[str, Any], *, note: str = "",
                  exempt_overflow: bool = True) -> NonFiniteError:
        where = _shorten([f"{k}={_scalar_text(values.get(k.split('[')[0]))}" for k in bad])
        if note:
            where = f"{where}; {note}"
        first = bad[0].split(" (micro-batch")[0]
        phase = "backward" if _base(first) in GRADIENT_TERMS else "forward"
        if self.replay is None:
            return NonFiniteError(first, phase, step, f"tier-1 check: {where} (replay off: give a replay to name "
                                                      "the module)")
        loss_bad = sorted({int(k.split("micro-batch ")[1].rstrip(")")) for k in bad if "micro-batch" in k})
        for i in loss_bad or range(len(self._micro)):
            e = self.locate(self._micro[i][1], step, exempt_overflow=exempt_overflow)
            if e is not None:
                extra = f" (micro-batch {i})" if len(self._micro) > 1 else ""
                return NonFiniteError(e.module, e.phase, e.step, f"{e.detail}{extra}{'; ' + note if note else ''}")
        return NonFiniteError(first, phase, step, f"not reproduced on replay; tier-1 check: {where}")
