"""What the watch reads from a loop: the micro-batch it hands to ``replay``, the warnings it gives, and the
loss terms and gradient norm it takes from hook arguments."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor


class LeakWarning(UserWarning):
    """Step outputs (or memory) grow step after step: something holds them; the message names it."""


class NonFiniteWarning(RuntimeWarning):
    """``mode="warn"``: a non-finite step, skipped; the message names the module."""


class MicroBatch(NamedTuple):
    """What one micro-batch ran with, given to ``replay``.

    Attributes:
        args, kwargs: the model's forward arguments.
        targets: the criterion's positional arguments that carry no gradient (the labels), in order.
        batch: what `Watch.set_batch` was given for this micro-batch (None if it was not called): for loops
            whose labels never reach a hooked criterion.
    """

    args: tuple
    kwargs: dict
    targets: tuple
    batch: Any = None


# ----------------------------------------------------------------------------- reading values
def _scalars(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Floating-point tensors of a criterion's output by name: a Tensor is ``loss``; a mapping, dataclass or
    namedtuple by its keys; a tuple/list: its first tensor is ``loss``, its mappings by their keys."""
    if isinstance(obj, Tensor):
        return {prefix or "loss": obj} if obj.is_floating_point() else {}
    if isinstance(obj, Mapping):
        items = obj.items()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = zip(obj._fields, obj)
    elif isinstance(obj, (tuple, list)):
        out: dict[str, Tensor] = {}
        for v in obj:
            if isinstance(v, Tensor) and not out:
                out.update(_scalars(v))
            elif not isinstance(v, Tensor):
                out.update(_scalars(v, ""))
        return out
    else:
        return {}
    return {str(k): v for k, v in items if isinstance(v, Tensor) and v.is_floating_point()}


def _branch_losses(args: tuple) -> dict[str, Tensor]:
    """``loss1``, ``loss2``... when the criterion's first argument is a list of scalar losses."""
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first and all(isinstance(v, Tensor) and v.numel() == 1 for v in first):
        return {f"loss{i + 1}": v for i, v in enumerate(first)}
    return {}


def _first_graph_tensor(obj: Any) -> Tensor | None:
    for v in _scalars(obj).values():
        if v.requires_grad:
            return v
    if isinstance(obj, Tensor) and obj.requires_grad:
        return obj
    return None


def _floats(values: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors to Python numbers (a scalar) or lists, one host sync per device; other values unchanged."""
    out = dict(values)
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for k, v in values.items():
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append((k, v.detach().float().reshape(-1)))
    for items in by_device.values():
        flat = torch.cat([t for _, t in items]).tolist()
        i = 0
        for k, t in items:
            n = t.numel()
            out[k] = flat[i] if n == 1 else flat[i:i + n]
            i += n
    return out


def _grad_norm(params: list[Tensor]) -> Tensor | None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return total(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
