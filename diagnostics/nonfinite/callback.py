"""`NonFiniteCallback`: `FiniteGuard` on the `dcal.train.Trainer`'s events."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from dcal.callbacks import Callback
from dcal.runfolder import AMP_OVERFLOW

from .checks import NonFiniteError, _shorten
from .guard import FiniteGuard


def _loss_weights(loss_fn: Any) -> Tensor | None:
    """The uncertainty weights w of a criterion: its ``weights()`` or its ``log_vars``; None if it has neither."""
    if loss_fn is None:
        return None
    weights = getattr(loss_fn, "weights", None)
    w = weights() if callable(weights) else getattr(loss_fn, "log_vars", None)
    return w if isinstance(w, Tensor) else None


class NonFiniteCallback(Callback):
    """`FiniteGuard` on the trainer's events: tier 1 every step, tier 2 (a replay) when it fires.

    `after_loss` gives the guard each micro-batch's loss terms (the total and each branch loss) and its
    (batch, RNG state); `before_step` checks them with the gradient norm and w, and replays the failed
    micro-batches with ``trainer.replay(batch, rng_state)`` under `NonFiniteDetector(trainer.model,
    extra={"loss_fn": trainer.loss_fn})`. With an enabled ``trainer.scaler`` a step whose only non-finite
    term is the gradient norm is an fp16 overflow the scaler skips: not a fault; its record gets
    ``skipped: true`` and ``skip_reason: "amp-overflow"`` (`AMP_OVERFLOW`).

    Args:
        mode: ``"raise"``: raise the NonFiniteError (from the replay, or naming the tier-1 term with detail
            "not reproduced on replay"). ``"warn"``: ``trainer.log`` the finding, set
            ``trainer.skip_step = True`` and add ``"nonfinite": "<module> (<phase>)"`` to the step record.
        replay: run tier 2; False reports the tier-1 term only.

    Errors carry ``step = trainer.step + 1`` at before_step: the number this step gets in its record.

    Needs from the trainer (see `dcal.callbacks`): model, loss_fn, batch, batch_rng_state, micro_step,
    replay(), log(), step, loss, branch_losses, grad_norm, skip_step, record; scaler if it has one. A replay
    runs backward, so it changes ``.grad``; that is harmless because the step is then either skipped or
    the run stops.
    """

    order = -10  # before other callbacks see the step, so that skip_step is set early

    def __init__(self, mode: str = "raise", replay: bool = True):
        if mode not in ("raise", "warn"):
            raise ValueError(f"NonFiniteCallback mode must be 'raise' or 'warn', got {mode!r}")
        self.mode = mode
        self.replay = replay
        self.findings: list[NonFiniteError] = []
        self.guard: FiniteGuard | None = None
        self._pending: str | None = None
        self._overflow = False

    def _guard(self, trainer) -> FiniteGuard:
        if self.guard is None or self.guard.model is not trainer.model:
            replay = (lambda b: trainer.replay(*b)) if self.replay else None
            self.guard = FiniteGuard(trainer.model, loss_fn=getattr(trainer, "loss_fn", None), replay=replay,
                                     scaler=getattr(trainer, "scaler", None))
        return self.guard

    def before_batch(self, trainer) -> None:
        guard = self._guard(trainer)
        if not guard.replaying and trainer.micro_step == 0:
            guard.begin_step()
            self._pending, self._overflow = None, False

    def after_loss(self, trainer) -> None:
        guard = self._guard(trainer)
        if guard.replaying:
            return
        # Branch losses first: when the total is non-finite too, the branch is the more precise name.
        terms = {f"loss_{k}": v for k, v in (getattr(trainer, "branch_losses", None) or {}).items()}
        terms["loss"] = trainer.loss
        guard.add_micro(terms, (trainer.batch, trainer.batch_rng_state))

    def before_step(self, trainer) -> None:
        guard = self._guard(trainer)
        if guard.replaying:
            return
        w = _loss_weights(getattr(trainer, "loss_fn", None))
        result = guard.check(trainer.step + 1, {"grad_norm": getattr(trainer, "grad_norm", None),
                                                "w": None if w is None else w.detach()})
        self._overflow = result.overflow
        err = result.error
        if err is None:
            return
        self.findings.append(err)
        if self.mode == "raise":
            raise err
        trainer.log(f"non-finite {_shorten(result.bad)}: {err}")
        trainer.skip_step = True
        self._pending = f"{err.module} ({err.phase})"

    def after_step(self, trainer) -> None:
        if self._pending is not None:
            trainer.record["nonfinite"] = self._pending
            self._pending = None
        if self._overflow:
            trainer.record.update(skipped=True, skip_reason=AMP_OVERFLOW)
            self._overflow = False

    def locate(self, trainer, batch: Any = None, rng_state: Any = None, step: int | None = None) -> NonFiniteError | None:
        """Replay one micro-batch (default: the current one) under `NonFiniteDetector`; the finding or None.

        The trainer may also call this when its forward raised first (e.g. `dcal.RolloutError` on a
        non-finite attention map), to name the module upstream of the symptom."""
        batch = trainer.batch if batch is None else batch
        rng_state = trainer.batch_rng_state if rng_state is None else rng_state
        guard = self._guard(trainer)
        if guard.replay is None:
            guard = FiniteGuard(trainer.model, loss_fn=guard.loss_fn, replay=lambda b: trainer.replay(*b),
                                scaler=guard.scaler)
        return guard.locate((batch, rng_state), step)
