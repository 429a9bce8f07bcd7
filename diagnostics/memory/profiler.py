"""`MemoryProfiler` (memory per step and per phase, from any source) and the CUDA snapshot tools
(`record_history` for https://pytorch.org/memory_viz, `oom_snapshot` on an out-of-memory error)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .sources import MB, cuda_peak, cuda_reset, mb, resolve_source, rss_bytes
from .tracker import StorageTracker, gc_tensors, root_tensors

__all__ = ["MemoryProfiler", "record_history", "oom_snapshot"]


class MemoryProfiler:
    """Memory per step: allocated at the end, the peak, and the peak of each named phase.

    Use as ``with MemoryProfiler() as prof:`` around the loop, and per step either ``with prof.step():``
    or ``prof.step_begin()`` … ``prof.step_end()``; mark phases with ``with prof.phase("forward"):``.
    `step_end` returns (and appends to ``history``) ``{mem_allocated_mb, mem_reserved_mb, mem_peak_mb,
    phase_peaks: {name: mb}, source}``; ``mem_reserved_mb`` is None where there is no caching allocator.

    Args:
        device: where the model lives (default: CUDA if available, else CPU).
        source: ``"auto"`` (``"cuda"`` on a CUDA device, else ``"cpu-dispatch"``), or one of `SOURCES`.
        baseline: for ``"cpu-dispatch"``, the tensors alive before the first step that count as allocated:
            ``"gc"`` (scan every tensor Python knows of, once: ~0.1 s), None (count only what each step
            allocates), or modules / optimisers / tensors (re-read at every step, cheap).
    """

    def __init__(self, device: str | torch.device | None = None, source: str = "auto", *, baseline: Any = "gc"):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.source = resolve_source(self.device, source)
        self.baseline = baseline
        self.history: list[dict] = []
        self._tracker = None
        self._tracking = False
        self._in_step = False
        self._phase: str | None = None
        self._phase_peaks: dict[str, int] = {}
        self._step_peak = 0
        self._seeded = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> MemoryProfiler:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """End an open step without a report and stop tracking (idempotent)."""
        self._stop_mode()
        self._in_step = False
        self._phase = None
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
            self._seeded = False

    # ------------------------------------------------------------------ cuda helpers
    def _cuda_peak(self) -> int:
        return cuda_peak(self.device)

    def _cuda_reset(self) -> None:
        cuda_reset(self.device)

    def _start_mode(self) -> None:
        if not self._tracking:
            self._tracker.__enter__()
            self._tracking = True

    def _stop_mode(self) -> None:
        if self._tracking:
            self._tracking = False
            self._tracker.__exit__(None, None, None)

    # ------------------------------------------------------------------ steps and phases
    def step_begin(self) -> None:
        if self._in_step:
            raise RuntimeError("MemoryProfiler.step_begin: the previous step was not ended (call step_end)")
        self._in_step = True
        self._phase_peaks = {}
        if self.source == "cuda":
            self._step_peak = 0
            self._cuda_reset()
        elif self.source == "cpu-dispatch":
            if self._tracker is None:
                self._tracker = StorageTracker()
            if not self._seeded:
                if isinstance(self.baseline, str):
                    if self.baseline != "gc":
                        raise ValueError(f"MemoryProfiler baseline must be 'gc', None or tensors, got {self.baseline!r}")
                    self._tracker.seed(gc_tensors())
                    self._seeded = True
                elif self.baseline is None:
                    self._seeded = True
            if not self._seeded:  # modules / optimisers: re-read each step (new grads, new optimiser state)
                self._tracker.seed(root_tensors(self.baseline))
            self._tracker.peak = self._tracker.current
            self._start_mode()
        else:
            self._step_peak = rss_bytes()

    def phase_begin(self, name: str) -> None:
        if not self._in_step:
            raise RuntimeError(f"MemoryProfiler.phase_begin({name!r}) outside a step (call step_begin first)")
        if self._phase is not None:
            raise RuntimeError(f"MemoryProfiler.phase_begin({name!r}): phase {self._phase!r} is still open")
        self._phase = name
        if self.source == "cuda":
            self._step_peak = max(self._step_peak, self._cuda_peak())
            self._cuda_reset()
        elif self.source == "cpu-dispatch":
            self._tracker.phase_peak = self._tracker.current
        else:
            self._phase_rss = rss_bytes()
            self._step_peak = max(self._step_peak, self._phase_rss)

    def phase_end(self) -> None:
        if self._phase is None:
            raise RuntimeError("MemoryProfiler.phase_end: no phase is open")
        name, self._phase = self._phase, None
        if self.source == "cuda":
            peak = self._cuda_peak()
            self._cuda_reset()
        elif self.source == "cpu-dispatch":
            peak = self._tracker.phase_peak
        else:
            peak = max(self._phase_rss, rss_bytes())
        self._step_peak = max(self._step_peak, peak)
        self._phase_peaks[name] = max(self._phase_peaks.get(name, 0), peak)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark a phase (``"forward"``, ``"backward"``, ``"optimizer"``); repeated phases keep their max."""
        self.phase_begin(name)
        try:
            yield
        finally:
            self.phase_end()

    def step_end(self) -> dict:
        if not self._in_step:
            raise RuntimeError("MemoryProfiler.step_end without step_begin")
        if self._phase is not None:
            self.phase_end()
        self._in_step = False
        reserved = None
        if self.source == "cuda":
            peak = max(self._step_peak, self._cuda_peak())
            allocated = torch.cuda.memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
        elif self.source == "cpu-dispatch":
            self._stop_mode()
            peak, allocated = self._tracker.peak, self._tracker.current
        else:
            allocated = rss_bytes()
            peak = max(self._step_peak, allocated)
        rec = {
            "mem_allocated_mb": mb(allocated),
            "mem_reserved_mb": mb(reserved),
            "mem_peak_mb": mb(peak),
            "phase_peaks": {k: mb(v) for k, v in self._phase_peaks.items()},
            "source": self.source,
        }
        self.history.append(rec)
        return rec

    @contextmanager
    def step(self) -> Iterator[MemoryProfiler]:
        """``with prof.step():`` = step_begin … step_end; the report is ``prof.history[-1]``."""
        self.step_begin()
        try:
            yield self
        except BaseException:
            self._phase = None
            self._in_step = False
            self._stop_mode()
            raise
        self.step_end()


@contextmanager
def record_history(path: str | os.PathLike, max_entries: int = 100_000, device: Any = None) -> Iterator[str]:
    """Record every CUDA allocation with its stack; on exit (also on an exception, e.g. an OOM) write a
    snapshot to `path` for https://pytorch.org/memory_viz. Wraps `torch.cuda.memory._record_memory_history`
    and `_dump_snapshot` (private torch APIs, feature-detected). CUDA only: raises elsewhere."""
    mem = getattr(torch.cuda, "memory", None)
    rec = getattr(mem, "_record_memory_history", None)
    dump = getattr(mem, "_dump_snapshot", None)
    if rec is None or dump is None:
        raise RuntimeError(f"record_history: torch {torch.__version__} has no torch.cuda.memory._record_memory_history")
    if not torch.cuda.is_available():
        raise RuntimeError("record_history needs a CUDA device: the allocation history is the CUDA allocator's")
    path = os.fspath(path)
    rec(enabled="all", max_entries=max_entries, device=device)
    try:
        yield path
    finally:
        try:
            dump(path)
        finally:
            rec(enabled=None, device=device)


_OOM_PATHS: list[str] = []
_OOM_ATTACHED = False


def _oom_observer(device: int, alloc: int, device_alloc: int, device_free: int) -> None:
    # Called by the CUDA allocator as it raises OutOfMemoryError. An exception escaping into the allocator
    # would replace the OOM error, so a failed dump is reported as a warning and the OOM goes on.
    for path in list(_OOM_PATHS):
        try:
            torch.cuda.memory._dump_snapshot(path)
        except Exception as e:  # reported as a warning, never silent
            warnings.warn(f"CUDA OOM on device {device}: could not write the memory snapshot {path}: {e!r}",
                          RuntimeWarning, stacklevel=1)
        else:
            warnings.warn(f"CUDA OOM on device {device} (asked {alloc / MB:.1f} MB, {device_free / MB:.1f} MB free):"
                          f" memory snapshot written to {path} (open it at https://pytorch.org/memory_viz)",
                          RuntimeWarning, stacklevel=1)


@contextmanager
def oom_snapshot(path: str | os.PathLike) -> Iterator[str]:
    """While active, a CUDA out-of-memory error writes a snapshot to `path` first.

    Uses `torch._C._cuda_attach_out_of_memory_observer` (feature-detected). torch cannot detach an observer,
    so one observer is attached per process and dumps to the paths currently registered. The snapshot holds
    stacks only while `record_history` (or `_record_memory_history`) is recording.
    """
    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if attach is None:
        raise RuntimeError(f"oom_snapshot: torch {torch.__version__} has no _cuda_attach_out_of_memory_observer")
    if not torch.cuda.is_available():
        raise RuntimeError("oom_snapshot needs a CUDA device")
    global _OOM_ATTACHED
    if not _OOM_ATTACHED:
        attach(_oom_observer)
        _OOM_ATTACHED = True
    path = os.fspath(path)
    _OOM_PATHS.append(path)
    try:
        yield path
    finally:
        _OOM_PATHS.remove(path)
