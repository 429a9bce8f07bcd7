"""Find the first module whose output or gradient went non-finite (NaN/Inf): fairseq's NanDetector, in two tiers.

Tier 1 (`finite_checks`, every step): the loss terms, the uncertainty weights w_i and the gradient norm are
checked with one device sync. Tier 2 (`NonFiniteDetector`, only when tier 1 fires): the micro-batch is
replayed under hooks on every module, which name the first module whose forward output, gradient w.r.t.
its inputs, or parameter gradient is non-finite. `NonFiniteCallback` wires both into the trainer.

Errors are raised directly from the hook that finds them: exceptions raised in autograd hooks propagate out
of ``loss.backward()`` unchanged (tested), so there is nothing to re-raise later, except for the one case
described in `NonFiniteDetector`.
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

__all__ = ["NonFiniteError", "NonFiniteDetector", "finite_checks", "NonFiniteCallback", "describe_tensor"]

PHASES = ("forward", "backward")

# torch warns once per process about backward hooks on modules it cannot hook (a dataclass output such as
# DCALOutput, a module whose inputs need no gradient); both are expected here and say nothing to the user.
_HOOK_WARNINGS = (
    r"For backward hooks to be called, module output should be",
    r"Full backward hook is firing when gradients are computed with respect to module outputs",
)


class NonFiniteError(FloatingPointError):
    """A NaN/Inf found in a run, with where it was found.

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

    Args:
        model: the module tree to watch; names are relative to it (``backbone.blocks.1.mlp.fc1``).
        step: the optimiser step, copied into every error.
        extra: more module trees to watch, by name (``{"loss_fn": trainer.loss_fn}`` → ``loss_fn``).

    Attributes:
        finding: the NonFiniteError raised (also when the caller catches it), else None.
    """

    def __init__(self, model: nn.Module, step: int | None = None, *, extra: Mapping[str, nn.Module] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"NonFiniteDetector needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.step = step
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
        self.finding = NonFiniteError(module, phase, self.step, detail)
        raise self.finding

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


# ----------------------------------------------------------------------------- trainer callback
def _loss_weights(loss_fn: nn.Module | None) -> Tensor | None:
    if loss_fn is None:
        return None
    weights = getattr(loss_fn, "weights", None)
    return weights() if callable(weights) else getattr(loss_fn, "log_vars", None)


class NonFiniteCallback(Callback):
    """Tier 1 every step, tier 2 (a replay under `NonFiniteDetector`) when it fires.

    `after_loss` keeps references to the loss terms of each micro-batch (the total, each branch loss, the
    w_i); `before_step` checks them together with the gradient norm and w in one `finite_checks` call, so a
    step costs one device sync however many micro-batches it accumulates. When a term is non-finite, the
    micro-batches whose loss terms failed (all of the step's, if only the gradient norm or w did) are
    replayed with ``trainer.replay(batch, rng_state)`` under `NonFiniteDetector(trainer.model,
    extra={"loss_fn": trainer.loss_fn})`; the first module it names is the finding.

    Args:
        mode: ``"raise"``: raise the NonFiniteError (from the replay, or naming the tier-1 term with detail
            "not reproduced on replay"). ``"warn"``: ``trainer.log`` the finding, set
            ``trainer.skip_step = True`` and add ``"nonfinite": "<module> (<phase>)"`` to the step record.
        replay: run tier 2; False reports the tier-1 term only.

    Errors carry ``step = trainer.step + 1`` at before_step: the number this step gets in its record.

    Needs from the trainer (see `dcal.callbacks`): model, loss_fn, batch, batch_rng_state, micro_step,
    replay(), log(), step, loss, branch_losses, grad_norm, skip_step, record. A replay runs backward, so
    it changes ``.grad``; that is harmless because the step is then either skipped or the run stops.
    """

    order = -10  # before other callbacks see the step, so that skip_step is set early

    def __init__(self, mode: str = "raise", replay: bool = True):
        if mode not in ("raise", "warn"):
            raise ValueError(f"NonFiniteCallback mode must be 'raise' or 'warn', got {mode!r}")
        self.mode = mode
        self.replay = replay
        self.findings: list[NonFiniteError] = []
        self._micro: list[tuple[Any, Any]] = []
        self._terms: list[dict[str, Tensor]] = []
        self._pending: str | None = None
        self._replaying = False

    def before_batch(self, trainer) -> None:
        if self._replaying:
            return
        if trainer.micro_step == 0:
            self._micro, self._terms, self._pending = [], [], None
        self._micro.append((trainer.batch, trainer.batch_rng_state))

    def after_loss(self, trainer) -> None:
        if self._replaying:
            return
        # Branch losses first: when the total is non-finite too, the branch is the more precise name.
        terms = {f"loss_{k}": v.detach() for k, v in (getattr(trainer, "branch_losses", None) or {}).items()}
        terms["loss"] = trainer.loss.detach()
        self._terms.append(terms)

    def before_step(self, trainer) -> None:
        if self._replaying:
            return
        values: dict[str, Any] = {}
        many = len(self._terms) > 1
        for i, terms in enumerate(self._terms):
            for k, v in terms.items():
                values[f"{k} (micro-batch {i})" if many else k] = v
        values["grad_norm"] = getattr(trainer, "grad_norm", None)
        w = _loss_weights(getattr(trainer, "loss_fn", None))
        values["w"] = None if w is None else w.detach()
        bad = finite_checks(values)
        if not bad:
            return
        err = self._diagnose(trainer, bad, values)
        self.findings.append(err)
        if self.mode == "raise":
            raise err
        trainer.log(f"non-finite {_shorten(bad)}: {err}")
        trainer.skip_step = True
        self._pending = f"{err.module} ({err.phase})"

    def after_step(self, trainer) -> None:
        if self._pending is not None:
            trainer.record["nonfinite"] = self._pending
            self._pending = None

    # ------------------------------------------------------------------
    def locate(self, trainer, batch: Any = None, rng_state: Any = None, step: int | None = None) -> NonFiniteError | None:
        """Replay one micro-batch (default: the current one) under `NonFiniteDetector`; the finding or None.

        The trainer may also call this when its forward raised first (e.g. `dcal.RolloutError` on a
        non-finite attention map), to name the module upstream of the symptom."""
        batch = trainer.batch if batch is None else batch
        rng_state = trainer.batch_rng_state if rng_state is None else rng_state
        loss_fn = getattr(trainer, "loss_fn", None)
        extra = {"loss_fn": loss_fn} if isinstance(loss_fn, nn.Module) else None
        self._replaying = True
        try:
            with NonFiniteDetector(trainer.model, step=step, extra=extra):
                trainer.replay(batch, rng_state)
        except NonFiniteError as e:
            return e
        finally:
            self._replaying = False
        return None

    def _diagnose(self, trainer, bad: list[str], values: Mapping[str, Any]) -> NonFiniteError:
        step = trainer.step + 1  # numbered as in this step's record (trainer.step counts the steps done)
        where = _shorten([f"{k}={_scalar_text(values.get(k.split('[')[0]))}" for k in bad])
        first = bad[0].split(" (micro-batch")[0]
        phase = "backward" if first == "grad_norm" else "forward"
        if not self.replay:
            return NonFiniteError(first, phase, step, f"tier-1 check: {where} (replay off)")
        loss_bad = sorted({int(k.split("micro-batch ")[1].rstrip(")")) for k in bad if "micro-batch" in k})
        if not loss_bad and any(k.startswith("loss") for k in bad):
            loss_bad = [0]
        for i in loss_bad or range(len(self._micro)):
            batch, rng = self._micro[i]
            e = self.locate(trainer, batch, rng, step)
            if e is not None:
                if len(self._micro) > 1:
                    e = NonFiniteError(e.module, e.phase, e.step, f"{e.detail} (micro-batch {i})")
                return e
        return NonFiniteError(first, phase, step, f"not reproduced on replay; tier-1 check: {where}")


def _shorten(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _scalar_text(v: Any) -> str:
    if isinstance(v, Tensor):
        v = v.detach().float().cpu()
        return f"{v.item():.4g}" if v.numel() == 1 else str([round(x, 4) for x in v.reshape(-1).tolist()])
    return "?" if v is None else f"{float(v):.4g}"
