"""The trainer's events and the callbacks that attach to them.

The trainer announces an event by calling the method of that name on every callback, in order of
`Callback.order` (lower first; the metrics logger runs last so that other callbacks can add fields to the
record it writes). What a callback may read or set on the trainer at each event:

===================  =====================================================================================
event                trainer attributes that are meaningful then
===================  =====================================================================================
before_fit           ``model``, ``loss_fn``, ``optimizer``, ``scheduler``, ``cfg``, ``out_dir``, ``device``,
                     ``step`` (optimiser steps done: > 0 after a resume), ``epoch``
before_epoch         ``epoch``
before_batch         ``batch`` (dict: ``image``, ``label``, ...), ``batch_rng_state`` (RNG states taken
                     just before this micro-batch's forward: ``trainer.replay`` restores them),
                     ``micro_step`` (index of the micro-batch within the optimiser step)
after_forward        ``outputs`` (a `DCALOutput`)
after_loss           ``loss`` (the total, a Tensor), ``branch_losses`` (dict ``sa``/``glca``/``pwca`` →
                     Tensor; absent branches missing)
after_backward       gradients are in ``.grad`` (accumulating over micro-batches); ``grad_norm`` is set
                     only at the last micro-batch of an optimiser step (before clipping)
before_step          last micro-batch, just before ``optimizer.step()``; set ``skip_step = True`` to skip
                     this optimiser step (gradients are then zeroed)
after_step           ``record``: the dict that will become this step's line in metrics.jsonl
                     (``kind: "step"``); add fields to it
after_epoch          ``epoch`` just finished
before_eval          --
after_eval           ``eval_record``: the eval line (``kind: "eval"``); add fields; ``eval_outputs``:
                     dict of concatenated tensors over the eval set (``rollout``, ``local_index``,
                     ``part_mask``, ``label``, ...) when the eval collected them
after_fit            ``history``
===================  =====================================================================================

`trainer.replay(batch, rng_state)` re-runs forward, loss and backward of one micro-batch under the given RNG
state (no optimiser step), which is what the tier-2 NaN detector needs. `trainer.log(message)` writes a
line to the run's log. Raising from a callback stops the run (after the trainer has saved nothing new).
"""
from __future__ import annotations

__all__ = ["Callback", "EVENTS"]

EVENTS = (
    "before_fit", "before_epoch", "before_batch", "after_forward", "after_loss", "after_backward",
    "before_step", "after_step", "after_epoch", "before_eval", "after_eval", "after_fit",
)


class Callback:
    """Base class: override the events you need. `order` sorts callbacks (lower runs first)."""

    order: int = 0

    def before_fit(self, trainer) -> None: ...
    def before_epoch(self, trainer) -> None: ...
    def before_batch(self, trainer) -> None: ...
    def after_forward(self, trainer) -> None: ...
    def after_loss(self, trainer) -> None: ...
    def after_backward(self, trainer) -> None: ...
    def before_step(self, trainer) -> None: ...
    def after_step(self, trainer) -> None: ...
    def after_epoch(self, trainer) -> None: ...
    def before_eval(self, trainer) -> None: ...
    def after_eval(self, trainer) -> None: ...
    def after_fit(self, trainer) -> None: ...
