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
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from dcal.callbacks import Callback
from dcal.errors import NonFiniteLossError
from dcal.metrics_log import AMP_OVERFLOW  # the skip_reason of a step the GradScaler skipped (re-exported)

__all__ = ["NonFiniteError", "NonFiniteDetector", "finite_checks", "NonFiniteCallback", "describe_tensor",
           "FiniteGuard", "StepCheck", "scaler_enabled", "MAX_OVERFLOWS_IN_A_ROW", "AMP_OVERFLOW"]

PHASES = ("forward", "backward")

# A GradScaler halves its scale on every overflow (backoff 0.5). 20 overflows in a row take the default
# initial scale 2^16 down to 2^-4: the loss is then multiplied by less than 1, so a gradient that still
# overflows is not a scaling problem the scaler can solve but a non-finite gradient: a fault.
MAX_OVERFLOWS_IN_A_ROW = 20

# Tier-1 names of gradient terms: with an enabled GradScaler, these alone being non-finite is an overflow.
GRADIENT_TERMS = ("grad_norm",)

# torch warns once per process about backward hooks on modules it cannot hook (a dataclass output such as
# DCALOutput, a module whose inputs need no gradient); both are expected here and say nothing to the user.
_HOOK_WARNINGS = (
    r"For backward hooks to be called, module output should be",
    r"Full backward hook is firing when gradients are computed with respect to module outputs",
)


class NonFiniteError(NonFiniteLossError):
    """A NaN/Inf found in a run, with where it was found (a `dcal.NonFiniteLossError`, so a ``FloatingPointError``).

    Attributes:
        module: qualified module name (``backbone.blocks.3.mlp.fc1``), or the loss term (``loss_glca``,
            ``grad_norm``) when only the tier-1 check saw it.
        phase: ``"forward"`` or ``"backward"``.
        step: the optimiser step, or None.
        detail: which tensor (output index / key / parameter), its nan/inf counts and finite min/max; in
            forward also the module input's.
    """

    def __init__(self, module: str, phase: str, step: int | None = None, detail: str = ""):
        if phase not in PHASES:
            raise ValueError(f"NonFiniteError phase must be one of {PHASES}, got {phase!r}")
        self.module = module
        self.phase = phase
        self.step = step
        self.detail = detail
        at = "" if step is None else f" at step {step}"
        super().__init__(f"non-finite value in {phase}{at}: {module}: {detail}")

    def __reduce__(self):
        return (type(self), (self.module, self.phase, self.step, self.detail))


def scaler_enabled(scaler: Any) -> bool:
    """True for an enabled `torch.amp.GradScaler` (anything with ``is_enabled()``); False for None or a disabled one."""
    if scaler is None:
        return False
    is_enabled = getattr(scaler, "is_enabled", None)
    if not callable(is_enabled) or not callable(getattr(scaler, "get_scale", None)):
        raise TypeError(f"scaler must be a torch.amp.GradScaler (is_enabled(), get_scale()), got {type(scaler).__name__}")
    return bool(is_enabled())


# ----------------------------------------------------------------------------- tensor helpers
def _iter_tensors(obj: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, Tensor]]:
    """(path, tensor) for every tensor in a Tensor / tuple / list / dict / dataclass, recursively."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif depth > 8:
        return
    elif isinstance(obj, (tuple, list)):
        fields = getattr(obj, "_fields", None)  # namedtuple: name the field
        for i, v in enumerate(obj):
            yield from _iter_tensors(v, f"{path}.{fields[i]}" if fields else f"{path}[{i}]", depth + 1)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _iter_tensors(v, f"{path}[{k!r}]", depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _iter_tensors(getattr(obj, f.name), f"{path}.{f.name}", depth + 1)


def _checkable(t: Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and t.layout == torch.strided and t.numel() > 0


@torch.no_grad()
def _first_nonfinite(obj: Any) -> tuple[str, Tensor] | None:
    for path, t in _iter_tensors(obj):
        if _checkable(t) and not bool(torch.isfinite(t).all()):
            return path, t
    return None


@torch.no_grad()
def describe_tensor(t: Tensor) -> str:
    """``(8, 17, 48) float32: 3 nan, 1 +inf, 0 -inf of 6528; finite min -2.1, max 3.4``."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    head = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    if not t.is_floating_point():
        return f"{head} (not floating point)"
    if t.numel() == 0:
        return f"{head}: empty"
    finite = torch.isfinite(t)
    n_nan, n_pinf, n_ninf = (int(f(t).sum()) for f in (torch.isnan, torch.isposinf, torch.isneginf))
    vals = t[finite]
    rng = f"finite min {vals.min().item():.4g}, max {vals.max().item():.4g}" if vals.numel() else "no finite value"
    if n_nan + n_pinf + n_ninf == 0:
        return f"{head}: all finite, min {vals.min().item():.4g}, max {vals.max().item():.4g}"
    return f"{head}: {n_nan} nan, {n_pinf} +inf, {n_ninf} -inf of {t.numel()}; {rng}"


def _describe_all(obj: Any, name: str) -> str:
    parts = [f"{name}{p} {describe_tensor(t)}" for p, t in _iter_tensors(obj) if _checkable(t)]
    return "; ".join(parts) if parts else f"{name}: no floating-point tensor"


# ----------------------------------------------------------------------------- tier 1
def finite_checks(values: Mapping[str, Tensor | float | int | None]) -> list[str]:
    """Names of the non-finite entries of `values` (empty list when all are finite).

    Scalars and small tensors (a loss, the w_i vector, the gradient norm) are concatenated per
    (device, dtype) and tested with one ``isfinite(...).all()``, so a healthy step costs one device sync;
    the per-term search runs only when that fails. A vector entry that fails is named with its index
    (``w[1]``). None entries are skipped.
    """
    bad: list[str] = []
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    tensors: list[tuple[str, Tensor]] = []
    for name, v in values.items():
        if v is None:
            continue
        if isinstance(v, Tensor):
            v = v.detach()
            if not _checkable(v):
                continue
            tensors.append((name, v))
            groups.setdefault((v.device, v.dtype), []).append(v.reshape(-1))
        elif not math.isfinite(float(v)):
            bad.append(name)
    if not groups:
        return bad
    flags = [torch.isfinite(torch.cat(g)).all() for g in groups.values()]
    if len(flags) == 1:
        ok = bool(flags[0])  # the one sync
    elif len({f.device for f in flags}) == 1:
        ok = bool(torch.stack(flags).all())
    else:
        ok = all(bool(f) for f in flags)  # one sync per device
    if ok:
        return bad
    for name, v in tensors:
        fin = torch.isfinite(v)
        if bool(fin.all()):
            continue
        if v.numel() == 1:
            bad.append(name)
        else:
            idx = (~fin).reshape(-1).nonzero().reshape(-1).tolist()
            bad.extend(f"{name}[{i}]" for i in idx)
    return bad


# ----------------------------------------------------------------------------- tier 2
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


# ----------------------------------------------------------------------------- one step of any loop
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


# ----------------------------------------------------------------------------- trainer callback
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


def _shorten(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _scalar_text(v: Any) -> str:
    if isinstance(v, Tensor):
        v = v.detach().float().cpu()
        return f"{v.item():.4g}" if v.numel() == 1 else str([round(x, 4) for x in v.reshape(-1).tolist()])
    return "?" if v is None else f"{float(v):.4g}"
