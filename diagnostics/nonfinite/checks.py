"""`NonFiniteError`, what a non-finite tensor looks like (`describe_tensor`), and tier 1: `finite_checks`,
one device sync per step."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from dcal.errors import NonFiniteLossError

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


def _shorten(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _scalar_text(v: Any) -> str:
    if isinstance(v, Tensor):
        v = v.detach().float().cpu()
        return f"{v.item():.4g}" if v.numel() == 1 else str([round(x, 4) for x in v.reshape(-1).tolist()])
    return "?" if v is None else f"{float(v):.4g}"
