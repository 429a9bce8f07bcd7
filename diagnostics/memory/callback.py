"""`MemoryCallback`: memory fields in every (sampled) step record of a `dcal.callbacks` trainer."""
from __future__ import annotations

import os
import statistics
import time
from collections import deque

from dcal.callbacks import Callback

from .profiler import MemoryProfiler, oom_snapshot

__all__ = ["MemoryCallback"]


class MemoryCallback(Callback):
    """Writes ``mem_allocated_mb``, ``mem_peak_mb``, ``mem_source`` (and ``mem_reserved_mb``,
    ``mem_peak_<phase>_mb`` for forward / backward / optimizer) into the step record.

    A step is measured from ``before_batch`` at micro-step 0 to ``after_step``, peaks reset per step. On
    CUDA every `every`-th step is measured (a few host-side counter reads). On CPU the exact source
    (``cpu-dispatch``) costs ~10 µs per op, far more than 2% of a small model's step, so steps are sampled:
    after one plain step, one measured step probes the cost; later steps are measured only while the
    cumulative overhead stays within `max_overhead` of the elapsed training time. Unmeasured steps get no
    memory fields (no stale or made-up numbers). ``max_overhead=None`` measures every `every`-th step.

    Args:
        every: measure steps whose index is a multiple of `every`.
        source: passed to `MemoryProfiler`.
        max_overhead: fraction of step time the CPU tracker may cost (cumulative), or None.
        oom_snapshot: CUDA only: a path, or True for ``out_dir/oom_snapshot.pickle``, written on an OOM.

    Needs from the trainer: model, loss_fn, optimizer, device, step, micro_step, record, log(); out_dir
    when oom_snapshot is True.
    """

    order = 50  # before the metrics logger, which writes the record

    def __init__(self, every: int = 1, *, source: str = "auto", max_overhead: float | None = 0.02,
                 oom_snapshot: str | os.PathLike | bool = False):
        if every < 1:
            raise ValueError(f"MemoryCallback every must be >= 1, got {every}")
        if max_overhead is not None and not 0 < max_overhead < 1:
            raise ValueError(f"MemoryCallback max_overhead must be in (0, 1) or None, got {max_overhead}")
        self.every = every
        self.source = source
        self.max_overhead = max_overhead
        self.oom_snapshot = oom_snapshot
        self.profiler: MemoryProfiler | None = None
        self.measured_steps: list[int] = []
        self._measuring = False
        self._t0: float | None = None
        self._plain: deque = deque(maxlen=20)
        self._elapsed = 0.0
        self._spent = 0.0
        self._last_overhead: float | None = None
        self._last_was_measured = False
        self._seen_steps = 0
        self._oom_ctx = None

    # ------------------------------------------------------------------ scheduling
    @property
    def sampled(self) -> bool:
        return self.profiler is not None and self.profiler.source == "cpu-dispatch" and self.max_overhead is not None

    def _due(self, step: int) -> bool:
        if step % self.every:
            return False
        if not self.sampled:
            return True
        if len(self._plain) < 3 or self._last_was_measured:
            return False  # time plain steps first, and between measured ones, to know what a step costs
        if self._last_overhead is None:
            return True  # the probe
        return self._spent + self._last_overhead <= self.max_overhead * self._elapsed

    # ------------------------------------------------------------------ events
    def before_fit(self, trainer) -> None:
        roots = [getattr(trainer, "model", None), getattr(trainer, "loss_fn", None), getattr(trainer, "optimizer", None)]
        self.profiler = MemoryProfiler(getattr(trainer, "device", None), self.source,
                                       baseline=[r for r in roots if r is not None])
        if self.oom_snapshot and self.profiler.source == "cuda":
            path = self.oom_snapshot
            if path is True:
                path = os.path.join(os.fspath(trainer.out_dir), "oom_snapshot.pickle")
            self._oom_ctx = oom_snapshot(path)
            self._oom_ctx.__enter__()
        elif self.oom_snapshot:
            trainer.log(f"MemoryCallback: oom_snapshot needs CUDA; not armed (source {self.profiler.source})")
        if self.sampled:
            trainer.log(f"MemoryCallback: source cpu-dispatch, steps sampled to keep the overhead within "
                        f"{self.max_overhead:.0%} of training time")

    def before_batch(self, trainer) -> None:
        if self.profiler is None:
            self.before_fit(trainer)
        prof = self.profiler
        if trainer.micro_step == 0:
            if self._measuring:  # the last step never reached after_step (skipped): drop it
                prof.close()
                self._measuring = False
            self._t0 = time.perf_counter()
            self._measuring = self._due(trainer.step)
            if self._measuring:
                prof.step_begin()
        if self._measuring:
            prof.phase_begin("forward")

    def after_loss(self, trainer) -> None:
        if self._measuring:
            self.profiler.phase_end()
            self.profiler.phase_begin("backward")

    def after_backward(self, trainer) -> None:
        if self._measuring:
            self.profiler.phase_end()

    def before_step(self, trainer) -> None:
        if self._measuring:
            self.profiler.phase_begin("optimizer")

    def after_step(self, trainer) -> None:
        dt = None if self._t0 is None else time.perf_counter() - self._t0
        if self._measuring:
            self._measuring = False
            rec = self.profiler.step_end()
            out = trainer.record
            self.measured_steps.append(out.get("step", trainer.step))
            out["mem_allocated_mb"] = rec["mem_allocated_mb"]
            out["mem_peak_mb"] = rec["mem_peak_mb"]
            if rec["mem_reserved_mb"] is not None:
                out["mem_reserved_mb"] = rec["mem_reserved_mb"]
            for name, v in rec["phase_peaks"].items():
                out[f"mem_peak_{name}_mb"] = v
            out["mem_source"] = rec["source"]
            if dt is not None:
                self._elapsed += dt
                if self._plain:
                    self._last_overhead = max(0.0, dt - statistics.median(self._plain))
                    self._spent += self._last_overhead
            self._last_was_measured = True
        elif dt is not None:
            self._elapsed += dt
            if self._seen_steps > 0:  # the first step is warm-up, not a typical step
                self._plain.append(dt)
            self._last_was_measured = False
        self._seen_steps += 1
        self._t0 = None

    def after_fit(self, trainer) -> None:
        self.close()

    def close(self) -> None:
        """Stop tracking and disarm the OOM snapshot (after_fit calls it; call it if a run raised)."""
        if self.profiler is not None:
            self.profiler.close()
        self._measuring = False
        if self._oom_ctx is not None:
            ctx, self._oom_ctx = self._oom_ctx, None
            ctx.__exit__(None, None, None)
