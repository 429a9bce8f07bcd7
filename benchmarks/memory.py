"""Peak training memory: CUDA allocator statistics, or on CPU the peak of live tensor bytes.

CPU has no allocator statistics, so `LiveTensorPeak` counts tensor memory itself: a `TorchDispatchMode`
sees the outputs of every aten op (forward, autograd's backward and the optimiser alike), adds each new
storage's ``nbytes`` once, and a weakref finalizer on the storage takes them off when it is freed. Tensors
that exist before the measurement (parameters, optimiser state, the batch) are registered up front.
Scratch buffers that a kernel allocates and frees internally (never returned as tensors) are not seen.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorPeak", "peak_memory", "CPU_METHOD"]

CPU_METHOD = ("live tensor storage bytes, peak (TorchDispatchMode sees every op output; weakref finalizers "
              "subtract freed storages; pre-existing params/optimizer state/batch registered up front)")


class LiveTensorPeak(TorchDispatchMode):
    """Context manager: ``peak`` (bytes) of live tensor storages on `device` while it is active.

    Args:
        resident: tensors alive before entry that count towards the total (parameters, optimiser state).
        device: the device type whose tensors are counted (``"cpu"``).
    """

    def __init__(self, resident: Iterable[torch.Tensor] = (), device: str = "cpu"):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # id(storage) -> nbytes, for storages still alive
        for t in resident:
            self._track(t)
        self.resident = self.live

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def _track(self, t: object) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device or t.layout != torch.strided:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            return
        n = st.nbytes()
        self._seen[key] = n
        weakref.finalize(st, self._free, key)
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device, resident: Iterable[torch.Tensor] = ()) -> dict:
    """Peak memory of one call of `fn` in bytes, with the method named.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (everything allocated on the device counts).
    CPU: `LiveTensorPeak`, with `resident` as the tensors alive before the call.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    with LiveTensorPeak(resident, device.type) as m:
        fn()
    return {"peak_bytes": m.peak, "resident_bytes": m.resident, "method": CPU_METHOD}
