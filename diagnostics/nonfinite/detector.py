"""Tier 2: `NonFiniteDetector`, hooks on every module that name the first whose output or gradient went
non-finite (run on a replay of the failed micro-batch)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .checks import (
    _HOOK_WARNINGS,
    NonFiniteError,
    _describe_all,
    _first_nonfinite,
    describe_tensor,
    scaler_enabled,
)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (where checkpointing recomputes the forward)."""
    return torch._C._current_graph_task_id() != -1


def _queue_end_of_backward(fn) -> bool:
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if engine is None or not hasattr(engine, "queue_callback"):
        return False
    engine.queue_callback(fn)
    return True


class NonFiniteDetector:
    """Context manager: hooks on every module that raise `NonFiniteError` at the first non-finite value.

    Forward: a forward hook on each module checks its output (Tensor, tuple/list, dict, dataclass such as
    `dcal.DCALOutput`). Children finish before their parent, so the innermost first offender raises and
    its parent is never reached. The error also describes the module's input: a non-finite input means the
    value was made by functional code between modules (e.g. in `dcal.layers`), just before this call.

    Backward: full backward (pre-)hooks on each module and a hook on each parameter. A module whose gradient
    w.r.t. its output (grad_output) is finite but whose grad_input or parameter gradient is not made the
    non-finite value: it raises at once. A module that only passes on a non-finite grad_output is recorded;
    if no module claims the value by the end of that backward, the first such module is reported (the
    value came from functional code after it in forward order, e.g. the loss), raised from an end-of-backward
    autograd callback, so again out of ``loss.backward()``. Parameter hooks see the gradient this backward
    produced, not ``.grad`` accumulated earlier, so replaying into already-poisoned ``.grad`` misleads
    nothing.

    Gradient checkpointing (non-reentrant) recomputes forwards inside backward; those calls are skipped,
    so nothing is reported twice. Every hook is removed on exit, also when an exception propagates (which
    is never swallowed). The detector does not change any number: hooks return None, and torch's
    backward-hook wrappers are identities. Limitation: torch's full backward hooks reject a module whose
    output is later modified in place (e.g. ``nn.ReLU(inplace=True)`` after a hooked module).

    Mixed precision: with an enabled ``scaler``, the backward runs on *scaled* gradients, and a non-finite
    one is an overflow the scaler skips (and lowers its scale for), not a fault: it is kept in `overflow`
    (the first one, named as a finding would be) and nothing is raised. Forward values are not scaled, so
    a non-finite forward output raises as without a scaler.

    Args:
        model: the module tree to watch; names are relative to it (``backbone.blocks.1.mlp.fc1``).
        step: the optimiser step, copied into every error.
        extra: more module trees to watch, by name (``{"loss_fn": trainer.loss_fn}`` → ``loss_fn``).
        scaler: the run's `torch.amp.GradScaler` (or None); see above.

    Attributes:
        finding: the NonFiniteError raised (also when the caller catches it), else None.
        overflow: with an enabled scaler, the first non-finite gradient seen (not raised), else None.
    """

    def __init__(self, model: nn.Module, step: int | None = None, *, extra: Mapping[str, nn.Module] | None = None,
                 scaler: Any = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"NonFiniteDetector needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.step = step
        self.scaler_skips = scaler_enabled(scaler)
        self.overflow: NonFiniteError | None = None
        self.roots: list[tuple[str, nn.Module]] = [("", model)] + list((extra or {}).items())
        for name, m in self.roots[1:]:
            if not isinstance(m, nn.Module):
                raise TypeError(f"NonFiniteDetector extra[{name!r}] is {type(m).__name__}, not an nn.Module")
        self.finding: NonFiniteError | None = None
        self._handles: list[Any] = []
        self._warn_ctx: warnings.catch_warnings | None = None
        self._calls: dict[str, int] = {}
        self._reset_backward(-1)

    # ------------------------------------------------------------------ bookkeeping
    def _named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        seen: set[int] = set()
        for prefix, root in self.roots:
            for name, m in root.named_modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                full = ".".join(p for p in (prefix, name) if p) or f"<{type(root).__name__}>"
                yield full, m

    def _reset_backward(self, task: int) -> None:
        self._task = task
        self._tainted: set[str] = set()  # modules whose grad_output was already non-finite
        self._clean: set[str] = set()  # modules whose grad_output arrived finite
        self._sighting: tuple[str, str] | None = None  # first (module, detail) passing a non-finite grad
        self._queued = False

    def _backward_state(self) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._reset_backward(task)

    def _raise(self, module: str, phase: str, detail: str) -> None:
        err = NonFiniteError(module, phase, self.step, detail)
        if phase == "backward" and self.scaler_skips:
            if self.overflow is None:  # scaled gradients: the GradScaler skips this step by design
                self.overflow = err
            return
        self.finding = err
        raise err

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, name: str):
        def hook(module, args, kwargs, output):
            if self.finding is not None or _in_backward():  # checkpoint recompute: already checked
                return None
            self._calls[name] = self._calls.get(name, 0) + 1
            bad = _first_nonfinite(output)
            if bad is None:
                return None
            path, t = bad
            inputs = _describe_all((args, kwargs) if kwargs else args, "input")
            came_in = _first_nonfinite((args, kwargs)) is not None
            why = (" (its input was already non-finite: made by functional code just before this call)"
                   if came_in else " (its input is finite: this module made it)")
            self._raise(name, "forward", f"output{path} {describe_tensor(t)}{why}; call {self._calls[name]} "
                                         f"of this module; {inputs}")
        return hook

    def _backward_pre_hook(self, name: str):
        def hook(module, grad_output):
            self._backward_state()
            bad = _first_nonfinite(grad_output)
            if bad is None:
                self._clean.add(name)
            else:
                self._tainted.add(name)
                self._sight(name, f"the gradient reaching this module was already non-finite (grad_output"
                                  f"{bad[0]} {describe_tensor(bad[1])}): made by functional code that runs "
                                  "after it in forward (e.g. in its parent's forward, or the loss)")
            return None
        return hook

    def _backward_hook(self, name: str):
        def hook(module, grad_input, grad_output):
            self._backward_state()
            bad_in = _first_nonfinite(grad_input)
            if bad_in is None or _first_nonfinite(grad_output) is not None:
                return None
            self._raise(name, "backward", f"grad_input{bad_in[0]} {describe_tensor(bad_in[1])} while its "
                                          f"grad_output is finite ({_describe_all(grad_output, 'grad_output')}): "
                                          "this module's backward made it")
        return hook

    def _param_hook(self, owner: str, pname: str):
        def hook(grad):
            self._backward_state()
            if grad is None or bool(torch.isfinite(grad).all()):
                return None
            detail = f"gradient of parameter {pname!r} {describe_tensor(grad)}"
            # A claim needs evidence that the gradient reaching the owner was finite: its grad_output was
            # seen finite, or no non-finite gradient has appeared anywhere yet in this backward. A module
            # whose parameters are used functionally (e.g. `backbone.pos_embed`) has no grad_output.
            clean = owner in self._clean and owner not in self._tainted
            if not clean and (owner in self._tainted or self._sighting is not None):
                self._sight(owner, detail + " (the gradient reaching this module was already non-finite)")
                return None
            self._raise(owner, "backward", detail + " while the gradient reaching the module is finite")
        return hook

    def _sight(self, name: str, detail: str) -> None:
        if self._sighting is not None:
            return
        self._sighting = (name, detail)
        if not self._queued:
            self._queued = _queue_end_of_backward(self._end_of_backward)

    def _end_of_backward(self) -> None:
        if self.finding is None and self._sighting is not None:
            name, detail = self._sighting
            self._raise(name, "backward", detail)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> NonFiniteDetector:
        if self._handles:
            raise RuntimeError("NonFiniteDetector is already active (it is not re-entrant)")
        self.finding = None
        self.overflow = None
        self._calls = {}
        self._reset_backward(-1)
        self._warn_ctx = warnings.catch_warnings()
        self._warn_ctx.__enter__()
        for msg in _HOOK_WARNINGS:
            warnings.filterwarnings("ignore", message=msg, category=UserWarning)
        try:
            params_seen: set[int] = set()
            for name, m in self._named_modules():
                self._handles.append(m.register_forward_hook(self._forward_hook(name), with_kwargs=True))
                self._handles.append(m.register_full_backward_pre_hook(self._backward_pre_hook(name)))
                self._handles.append(m.register_full_backward_hook(self._backward_hook(name)))
                for pname, p in m.named_parameters(recurse=False):
                    if p.requires_grad and id(p) not in params_seen:
                        params_seen.add(id(p))
                        self._handles.append(p.register_hook(self._param_hook(name, pname)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        if exc_type is None and self._sighting is not None and self.finding is None:
            # Only when this torch has no end-of-backward callback: report the unclaimed sighting here.
            name, detail = self._sighting
            self._raise(name, "backward", detail)
        return False

    def remove(self) -> None:
        """Remove every hook (idempotent; `__exit__` calls it)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        if self._warn_ctx is not None:
            ctx, self._warn_ctx = self._warn_ctx, None
            ctx.__exit__(None, None, None)

    def check(self) -> None:
        """Raise the finding again if one was made (for callers that caught it inside the block)."""
        if self.finding is not None:
            raise self.finding
