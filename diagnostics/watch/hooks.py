"""The watch's hook handlers: when a micro-batch starts, its backward begins, the optimiser steps (or never
does); `StepHooks` is a part of `Watch` and works on its state."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..nonfinite import (
    AMP_OVERFLOW,
    NonFiniteError,
    _loss_weights,
    scaler_enabled,
)
from .values import (
    MicroBatch,
    NonFiniteWarning,
    _branch_losses,
    _first_graph_tensor,
    _grad_norm,
    _scalars,
)


class StepHooks:
    """`Watch`'s hook handlers and step state (a mixin: the attributes are `Watch.__init__`'s)."""

    # ------------------------------------------------------------------ state
    def _reset_step(self) -> None:
        self._in_step = False
        self._phase: str | None = None  # None, "forward", "backward", "optimizer"
        self._micro: dict | None = None
        self._n_micro = 0
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._logged: dict[str, Any] = {}
        self._step_values: dict[str, Any] = {}
        self._scale_begin: float | None = None

    def _live(self) -> bool:
        return self._active and torch.is_grad_enabled() and not self._guard.replaying

    def _begin_step(self) -> None:
        self._flush()
        self._in_step = True
        self._guard.begin_step()
        if scaler_enabled(self.scaler):
            self._scale_begin = float(self.scaler.get_scale())
        if self._monitor is not None:
            self._monitor.step_begin(self.step + 1)

    def _set_phase(self, name: str | None) -> None:
        self._phase = name
        if self._monitor is not None:
            self._monitor.phase(name)

    # ------------------------------------------------------------------ hooks
    def _on_forward_pre(self, module, args, kwargs) -> None:
        if not self._live() or self._phase == "forward":
            return None  # evaluation, replay, or another forward of the same micro-batch
        if self._phase == "backward":
            self._close_skipped_step()
        if not self._in_step:
            self._begin_step()
        self._n_micro += 1
        self._micro = {"args": args, "kwargs": kwargs, "targets": (), "batch": None, "terms": {},
                       "rng": self._rng_state() if self.replay is not None else None}
        if self._batch_size is None and args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            self._batch_size = int(args[0].shape[0])
        self._set_phase("forward")
        return None

    def _on_model_output(self, module, args, kwargs, output) -> None:
        if not self._live() or self._micro is None:
            return None
        graph = _first_graph_tensor(output)
        if self.loss_fn is None:  # the output is all there is to check (and, when a scalar, the loss)
            scalars = _scalars(output)
            terms = {k: v for k, v in scalars.items() if v.numel() == 1}
            if not terms:  # not a loss: check the outputs cheaply (max |x| is non-finite iff one value is)
                terms = {f"output {k} (max |x|)": v.detach().abs().amax() for k, v in scalars.items()}
            self._micro["terms"].update(terms)
            self._track(graph)
        self._hook_backward(graph)  # also with a criterion: a loss computed without it still has a backward
        return None

    def _on_loss(self, module, args, kwargs, output) -> None:
        if not self._live() or self._micro is None or self._phase != "forward":
            return None
        self._micro["terms"].update({**_branch_losses(args), **_scalars(output)})
        if self.replay is not None:
            self._micro["targets"] = tuple(a for a in args if isinstance(a, Tensor) and not a.requires_grad)
        graph = _first_graph_tensor(output)
        self._track(graph)
        self._hook_backward(graph)
        return None

    def _track(self, t: Tensor | None) -> None:
        if t is not None and self._monitor is not None:
            self._monitor.track(t)  # a weak reference: the leak detector's

    def _hook_backward(self, t: Tensor | None) -> None:
        if t is not None:
            self._tensor_handles.append(t.register_hook(self._on_backward_start))

    def _on_backward_start(self, grad: Tensor) -> None:
        if self._active and self._phase == "forward" and not self._guard.replaying:
            self._finish_micro()
            self._set_phase("backward")
        return None

    def _finish_micro(self) -> None:
        mb = self._micro
        if mb is None:
            return
        self._micro = None
        terms = {self.keys.get(k, k): v.detach() for k, v in mb["terms"].items()}
        self._seen_names.update(mb["terms"])
        for k, v in terms.items():
            if v.numel() == 1 and "(max |x|)" not in k:
                self._sums[k] = self._sums[k] + v if k in self._sums else v.float().reshape(())
                self._counts[k] = self._counts.get(k, 0) + 1
        batch = None
        if self.replay is not None:
            batch = (MicroBatch(mb["args"], mb["kwargs"], mb["targets"], mb["batch"]), mb["rng"])
        self._guard.add_micro(terms, batch)

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        if not self._active or self._guard.replaying:
            return None
        if not self._in_step:
            self._begin_step()
        if self._phase == "forward":
            self._finish_micro()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = _grad_norm(params)
        w = _loss_weights(self.loss_fn)
        lr = optimizer.param_groups[0]["lr"]
        self._step_values = {"lr": float(lr), "grad_norm": grad_norm}
        self._peak_lr = max(self._peak_lr, float(lr))
        result = self._guard.check(self.step + 1, {"grad_norm": grad_norm, "w": None if w is None else w.detach()},
                                   scaler_skipped=False)
        if result.error is not None:
            self._fault(result.error)
            for p in params:  # mode "warn": no gradient, no update (the optimiser skips parameters without one)
                p.grad = None
            self._step_values.update(skipped=True, skip_reason="nonfinite")
        self._set_phase("optimizer")
        return None

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        if not self._active or self._guard.replaying or not self._in_step:
            return None
        self.accum = self._n_micro or self.accum
        self._end_step(self._step_values)
        return None

    # ------------------------------------------------------------------ steps the optimiser never took
    def _close_skipped_step(self, at_exit: bool = False) -> None:
        """A micro-batch starts (or the watch exits) after a backward with no optimiser step since: either the
        loop accumulates, or the step was skipped (the scaler's scale dropped, or the step was due)."""
        due = self.accum is None or self._n_micro >= self.accum
        if not self._in_step or not due:
            return
        if scaler_enabled(self.scaler):
            scale = float(self.scaler.get_scale())
            if scale < self._scale_begin:
                return self._skip(AMP_OVERFLOW)
        if self.accum is not None and not at_exit:
            return self._skip("optimizer.step not called")
        return None

    def _skip(self, reason: str) -> None:
        if self._phase == "forward":
            self._finish_micro()
        w = _loss_weights(self.loss_fn)
        result = self._guard.check(self.step + 1, {"w": None if w is None else w.detach()},
                                   scaler_skipped=reason == AMP_OVERFLOW)
        if result.error is not None:
            self._fault(result.error)
        values = {"lr": float(self.optimizer.param_groups[0]["lr"]), "skipped": True, "skip_reason": reason}
        self._end_step(values)

    def _fault(self, err: NonFiniteError) -> None:
        self.findings.append(err)
        if self.mode == "raise":
            raise err
        self._log_line(f"non-finite: {err}")
        warnings.warn(str(err), NonFiniteWarning, stacklevel=3)
        self._step_values["nonfinite"] = f"{err.module} ({err.phase})"
