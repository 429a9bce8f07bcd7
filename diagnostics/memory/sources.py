"""Where memory numbers come from: the CUDA caching allocator, the CPU live-tensor tracker, or the RSS.

- ``"cuda"``: the caching allocator's counters (`torch.cuda.memory_allocated`, ``max_memory_allocated``
  with the peak reset per step and per phase, ``memory_reserved``).
- ``"cpu-dispatch"``: CPU tensor memory, counted exactly by `tracker.StorageTracker`. Live bytes = storages
  alive at the start (a gc scan, or the model/optimiser given) plus those allocated since.
- ``"rss"``: the process resident set, sampled at step and phase boundaries. Not tensor memory: a last
  resort, labelled as such.

`torch.cuda.max_memory_allocated()` returns 0 on a machine without a GPU instead of failing; nothing here
calls it unless the source is ``"cuda"``. MB are 10^6 bytes.
"""
from __future__ import annotations

import os

import torch

__all__ = ["MB", "SOURCES", "mb", "resolve_source", "rss_bytes", "cuda_peak", "cuda_reset"]

MB = 1e6
SOURCES = ("cuda", "cpu-dispatch", "rss")


def mb(n: float | None) -> float | None:
    """Bytes to MB (10^6), rounded to 3 decimals; None stays None."""
    return None if n is None else round(n / MB, 3)


def rss_bytes() -> int:
    """The process's resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cuda_peak(device: torch.device) -> int:
    """The caching allocator's peak allocated bytes since the last reset."""
    return torch.cuda.max_memory_allocated(device)


def cuda_reset(device: torch.device) -> None:
    """Reset the caching allocator's peak counters."""
    torch.cuda.reset_peak_memory_stats(device)


def resolve_source(device: torch.device, source: str) -> str:
    """The source for `device`: ``"auto"`` resolves to ``"cuda"`` on CUDA, ``"cpu-dispatch"`` on CPU.

    Args:
        device: where the model lives.
        source: ``"auto"`` or one of `SOURCES`; raises when the source cannot measure `device`.
    """
    dev = device.type
    if source == "auto":
        if dev == "cuda":
            source = "cuda"
        elif dev == "cpu":
            source = "cpu-dispatch"
        else:
            raise ValueError(f"MemoryProfiler: no memory source for device {device} (use source='rss')")
    if source not in SOURCES:
        raise ValueError(f"MemoryProfiler source must be 'auto' or one of {SOURCES}, got {source!r}")
    if source == "cuda" and (dev != "cuda" or not torch.cuda.is_available()):
        raise RuntimeError(f"MemoryProfiler source='cuda' needs a CUDA device (device={device}, "
                           f"cuda available: {torch.cuda.is_available()})")
    if source == "cpu-dispatch" and dev != "cpu":
        raise RuntimeError(f"MemoryProfiler source='cpu-dispatch' counts CPU tensors only (device={device})")
    if source == "rss" and not os.path.exists("/proc/self/statm"):
        raise RuntimeError("MemoryProfiler source='rss' reads /proc/self/statm, which this system lacks")
    return source
