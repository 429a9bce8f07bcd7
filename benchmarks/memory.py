"""Peak training memory for the benchmarks.

CUDA: the allocator's own peak. CPU has no allocator statistics, so the live-tensor tracker of
`diagnostics.memory.MemoryProfiler` (source ``cpu-dispatch``) counts tensor memory itself; the tensors alive
before the call (parameters, optimiser state, the batch) are its baseline.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from diagnostics.memory import MemoryProfiler

__all__ = ["peak_memory"]


def peak_memory(fn: Callable[[], object], device: torch.device, resident: Iterable[torch.Tensor] = ()) -> dict:
    """Peak memory of one call of `fn` in bytes, with the method named.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (everything allocated on the device counts).
    CPU: `MemoryProfiler("cpu")`, with `resident` as the tensors alive before the call.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    prof = MemoryProfiler("cpu", baseline=list(resident))
    with prof.step():
        fn()
    report = prof.history[-1]
    return {"peak_bytes": report["mem_peak_mb"] * 1e6,
            "method": f"diagnostics.memory.MemoryProfiler ({report['source']}: live CPU tensor bytes tracked by a TorchDispatchMode)"}
