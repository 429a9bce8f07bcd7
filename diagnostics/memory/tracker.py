"""The CPU live-tensor tracker: a `TorchDispatchMode` that counts every storage an op creates, once.

It sees every op's outputs (backward included), counts each new storage once, and a weak reference on the
storage subtracts it the moment it is freed. Costs ~10 µs per op. Kept hand-written on purpose: torch's own
profilers report allocations per op or per CUDA block, not the live bytes of CPU tensors at every moment.
"""
from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StorageTracker", "gc_tensors", "root_tensors"]


@functools.cache
def _aliased_returns(func) -> tuple[bool, ...]:
    """Per return of an op: True when it aliases an input (a view, an in-place or out= result)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return ()
    return tuple(r.alias_info is not None for r in schema.returns)


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live storages: those seeded plus those created while the mode is on.

    Args:
        device_types: the devices whose tensors are counted.
        round_to: count each storage rounded up to a multiple of this many bytes (1: exact; 512: the CUDA
            caching allocator's block size, used by `predict_step_memory` for a CUDA target).
    """

    def __init__(self, device_types: tuple[str, ...] = ("cpu",), round_to: int = 1):
        super().__init__()
        if round_to < 1:
            raise ValueError(f"StorageTracker round_to must be >= 1, got {round_to}")
        self.device_types = frozenset(device_types)
        self.round_to = round_to
        self.live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = 0
        self.peak = 0
        self.phase_peak = 0

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[1] is ref:
            del self.live[key]
            self.current -= entry[0]
            self.on_free(key, entry[0])

    def on_new(self, key: int, nbytes: int, t: Tensor, func) -> None:
        """Hook for subclasses: a new storage of `nbytes` made by op `func` (None when seeded)."""

    def on_free(self, key: int, nbytes: int) -> None:
        """Hook for subclasses: the storage `key` was freed."""

    def add(self, t: Tensor, new: bool = True, func=None) -> None:
        if t.device.type not in self.device_types or t.layout is not torch.strided:
            return
        s = t.untyped_storage()
        key = s._cdata
        n = -(-s.nbytes() // self.round_to) * self.round_to
        entry = self.live.get(key)
        if entry is not None:
            if entry[0] == n:
                return
            self.live[key] = (n, entry[1])  # resized in place (out= / resize_)
            self.current += n - entry[0]
        elif not new or n == 0:
            return
        else:
            self.live[key] = (n, weakref.ref(s, functools.partial(self._freed, key)))
            self.current += n
            self.on_new(key, n, t, func)
        if self.current > self.peak:
            self.peak = self.current
        if self.current > self.phase_peak:
            self.phase_peak = self.current

    def seed(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            self.add(t)

    def close(self) -> None:
        self.live.clear()  # the weak references die with it: no callback fires afterwards

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.track_outputs(func, func(*args, **(kwargs or {})))

    def track_outputs(self, func, out):
        """Count the new storages among an op's outputs (not the views, in-place or out= results); returns `out`."""
        aliased = _aliased_returns(func)
        if isinstance(out, Tensor):
            self.add(out, not (aliased and aliased[0]), func)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, Tensor):
                    self.add(o, not (i < len(aliased) and aliased[i]), func)
        return out


def gc_tensors() -> Iterator[Tensor]:
    """Every plain tensor (and parameter, with its .grad) visible to Python's gc."""
    # type() rather than isinstance(): isinstance reads o.__class__, which some module proxies answer
    # with a deprecation warning.
    for o in gc.get_objects():
        cls = type(o)
        if cls is Tensor:
            yield o
        elif issubclass(cls, nn.Parameter):
            yield o
            if o.grad is not None:
                yield o.grad


def root_tensors(roots: Any) -> Iterator[Tensor]:
    """Tensors held by modules (parameters, their grads, buffers), optimisers (state) or given directly."""
    if roots is None:
        return
    if isinstance(roots, Tensor):
        yield roots
    elif isinstance(roots, nn.Module):
        for p in roots.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from roots.buffers()
    elif isinstance(roots, torch.optim.Optimizer):
        for state in roots.state.values():
            for v in state.values():
                if isinstance(v, Tensor):
                    yield v
    elif isinstance(roots, Mapping):
        for v in roots.values():
            yield from root_tensors(v)
    elif isinstance(roots, Iterable) and not isinstance(roots, (str, bytes)):
        for r in roots:
            yield from root_tensors(r)
    else:
        raise TypeError(f"memory baseline: cannot find tensors in a {type(roots).__name__}")
