"""`MemoryMonitor`: memory of (sampled) steps phase by phase, and step outputs that leak, for any training loop.

The one engine behind `MemoryCallback` (the `dcal.train.Trainer`'s events) and `diagnostics.watch` (hooks
on a hand-written loop): they only tell it where steps and phases begin and end.
"""
from __future__ import annotations

import statistics
import time
import weakref
from collections import deque
from typing import Any

from torch import Tensor

from .leaks import LeakDetector
from .profiler import MemoryProfiler

__all__ = ["MemoryMonitor", "LEAK_SOURCES", "LEAK_CHECK_EVERY"]

# Sources whose "allocated" counts every live tensor, so that a leak shows in it step after step. The exact
# CPU source counts the tensors its measured steps allocate (plus the model and optimiser), not what an
# unmeasured step left behind, so on CPU the leak detector reads the leaked step outputs only.
LEAK_SOURCES = ("cuda", "rss")

# The memory series is fitted for growth every this many steps (a leak grows steadily: found at most this many
# steps late, for a tenth of the cost); held step outputs are checked at every step where any is held.
LEAK_CHECK_EVERY = 10
# Timed plain steps before the first measured one (to know what a step costs) and how many are kept.
PLAIN_STEPS_BEFORE_PROBE = 3
PLAIN_STEPS_KEPT = 20


class MemoryMonitor:
    """Per step: `step_begin`, `phase` at each phase change, `track` on outputs holding a graph, `step_end`.

    `step_end` returns the fields for the step's record: ``mem_allocated_mb``, ``mem_peak_mb``,
    ``mem_source``, ``mem_peak_<phase>_mb`` (and ``mem_reserved_mb`` on CUDA), or no memory field for a step
    that was not measured (no stale or made-up numbers); and, once, ``leak``.

    Sampling: on CUDA every `every`-th step is measured (a few host-side counter reads). On CPU the exact
    source (``cpu-dispatch``) costs ~10 µs per op, far more than 2 % of a small model's step, so after
    `PLAIN_STEPS_BEFORE_PROBE` plain steps one measured step probes the cost, and later steps are measured
    only while the cumulative overhead stays within `max_overhead` of the elapsed step time.

    Leaks: `track` keeps a weak reference to a step output that holds an autograd graph (the loss). A loop
    drops it by the next step; outputs of earlier steps still alive at `step_end` are held by something (the
    classic ``losses.append(loss)``). Their count, and the allocated memory where it sees every tensor
    (`LEAK_SOURCES`), feed a `LeakDetector`; when it flags a series, that `step_end` adds ``leak`` (a line
    naming the growth and the holders found by `find_graph_holders`) and keeps the report in `leak_report`.
    The cost is a weak reference per step; the gc scans run only when a leak is flagged.

    Args:
        device: where the model lives (`MemoryProfiler`).
        source: passed to `MemoryProfiler`.
        baseline: passed to `MemoryProfiler` (the model, criterion and optimiser, typically).
        every: measure steps 1, 1 + every, 1 + 2·every, … (numbered as their records are, from 1).
        max_overhead: fraction of step time the CPU tracker may cost (cumulative), or None (every step).
        leaks: a `LeakDetector`, True for the default one, or False for none.
    """

    def __init__(self, device: Any = None, *, source: str = "auto", baseline: Any = "gc", every: int = 1,
                 max_overhead: float | None = 0.02, leaks: LeakDetector | bool = True):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"MemoryMonitor every must be an int >= 1, got {every!r}")
        if max_overhead is not None and not 0 < max_overhead < 1:
            raise ValueError(f"MemoryMonitor max_overhead must be in (0, 1) or None, got {max_overhead}")
        if not isinstance(leaks, (bool, LeakDetector)):
            raise TypeError(f"MemoryMonitor leaks must be a LeakDetector or a bool, got {type(leaks).__name__}")
        self.profiler = MemoryProfiler(device, source, baseline=baseline)
        self.every = every
        self.max_overhead = max_overhead
        self.leaks = LeakDetector() if leaks is True else (leaks or None)
        self.leak_report: dict | None = None
        self.measured_steps: list[int] = []
        self.measuring = False
        self._phase: str | None = None
        self._t0: float | None = None
        self._plain: deque = deque(maxlen=PLAIN_STEPS_KEPT)
        self._elapsed = 0.0
        self._spent = 0.0
        self._last_overhead: float | None = None
        self._last_was_measured = False
        self._seen_steps = 0
        self._tracked: list[tuple[int, weakref.ref]] = []
        self._step: int | None = None

    @property
    def source(self) -> str:
        return self.profiler.source

    @property
    def sampled(self) -> bool:
        """True when steps are sampled to bound the overhead (the exact CPU source with a `max_overhead`)."""
        return self.source == "cpu-dispatch" and self.max_overhead is not None

    @property
    def in_step(self) -> bool:
        return self._step is not None

    def _due(self, step: int) -> bool:
        if (step - 1) % self.every:
            return False
        if not self.sampled:
            return True
        if len(self._plain) < PLAIN_STEPS_BEFORE_PROBE or self._last_was_measured:
            return False  # time plain steps first, and between measured ones, to know what a step costs
        if self._last_overhead is None:
            return True  # the probe
        return self._spent + self._last_overhead <= self.max_overhead * self._elapsed

    # ------------------------------------------------------------------ steps and phases
    def step_begin(self, step: int) -> None:
        """Start the step whose record will carry number `step` (measured or not, as the sampling decides)."""
        if self._step is not None:
            self.abandon()
        self._step = step
        self._t0 = time.perf_counter()
        self.measuring = self._due(step)
        if self.measuring:
            self.profiler.step_begin()

    def phase(self, name: str | None) -> None:
        """End the open phase (if any) and begin `name` (None: no phase until the next call)."""
        if not self.measuring or name == self._phase:
            return
        if self._phase is not None:
            self.profiler.phase_end()
        self._phase = name
        if name is not None:
            self.profiler.phase_begin(name)

    def track(self, tensor: Any) -> None:
        """Watch a step output for leaks (ignored unless it is a Tensor holding a graph)."""
        if self.leaks is not None and self._step is not None and isinstance(tensor, Tensor) \
                and tensor.grad_fn is not None:
            self._tracked.append((self._step, weakref.ref(tensor)))

    def step_end(self) -> dict:
        """End the step; the memory (and leak) fields for its record."""
        if self._step is None:
            raise RuntimeError("MemoryMonitor.step_end without step_begin")
        step, self._step = self._step, None
        dt = time.perf_counter() - self._t0
        fields: dict[str, Any] = {}
        self._phase = None
        if self.measuring:
            self.measuring = False
            fields = self._fields(self.profiler.step_end())
            self.measured_steps.append(step)
            self._elapsed += dt
            if self._plain:
                self._last_overhead = max(0.0, dt - statistics.median(self._plain))
                self._spent += self._last_overhead
            self._last_was_measured = True
        else:
            self._elapsed += dt
            if self._seen_steps > 0:  # the first step is warm-up, not a typical step
                self._plain.append(dt)
            self._last_was_measured = False
        self._seen_steps += 1
        leak = self._update_leaks(step, fields.get("mem_allocated_mb"))
        if leak is not None:
            fields["leak"] = leak
        return fields

    def abandon(self) -> None:
        """Drop a step that will not end (no report); the next `step_begin` starts afresh."""
        if self.measuring:
            self.profiler.close()
        self.measuring = False
        self._phase = None
        self._step = None

    def close(self) -> None:
        """Stop tracking (idempotent)."""
        self.abandon()
        self.profiler.close()
        self._tracked = []

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _fields(rec: dict) -> dict:
        out = {"mem_allocated_mb": rec["mem_allocated_mb"], "mem_peak_mb": rec["mem_peak_mb"]}
        if rec["mem_reserved_mb"] is not None:
            out["mem_reserved_mb"] = rec["mem_reserved_mb"]
        for name, v in rec["phase_peaks"].items():
            out[f"mem_peak_{name}_mb"] = v
        out["mem_source"] = rec["source"]
        return out

    def _update_leaks(self, step: int, mem_mb: float | None) -> str | None:
        if self.leaks is None:
            return None
        self._tracked = [(s, r) for s, r in self._tracked if r() is not None]
        held = sum(1 for s, _ in self._tracked if s < step)
        mem_mb = mem_mb if self.source in LEAK_SOURCES else None
        self.leaks.update(step, mem_mb=mem_mb, graph_tensors=held)
        if self.leak_report is not None or not (held or (mem_mb is not None and step % LEAK_CHECK_EVERY == 0)):
            return None  # nothing held and no memory fit due: no growth to fit
        self.leak_report = self.leaks.report(holders=True)
        return None if self.leak_report is None else describe_leak(self.leak_report)


def describe_leak(report: dict) -> str:
    """One line for a `LeakDetector.report`: which series grow, how fast, and who holds the graphs."""
    parts = []
    for key in report["flagged"]:
        fit = report["series"][key]
        name = "step outputs still alive" if key == "graph_tensors" else key
        parts.append(f"{name} grow {fit['slope']:+.3g} {fit['unit']} over steps {fit['steps'][0]}–{fit['steps'][1]}")
    holders = [f"{h['name']} ({h['type']}{'' if h['len'] is None else ' of ' + str(h['len'])}, "
               f"{h['graph_tensors']} graph tensors)" for h in report.get("holders", [])[:3]]
    line = "; ".join(parts)
    return f"{line}; held by {', '.join(holders)}" if holders else line

