"""`MemoryCallback`: memory fields in every (sampled) step record of a `dcal.callbacks` trainer.

A thin user of `MemoryMonitor` (the engine `diagnostics.watch` uses too): it only maps the trainer's events
to steps and phases.
"""
from __future__ import annotations

import os

from dcal.callbacks import Callback

from .leaks import LeakDetector
from .monitor import MemoryMonitor
from .profiler import oom_snapshot

__all__ = ["MemoryCallback"]


class MemoryCallback(Callback):
    """Writes ``mem_allocated_mb``, ``mem_peak_mb``, ``mem_source`` (and ``mem_reserved_mb``,
    ``mem_peak_<phase>_mb`` for forward / backward / optimizer) into the step record, and ``leak`` once
    when step outputs (the loss) stay alive step after step.

    A step is measured from ``before_batch`` at micro-step 0 to ``after_step``, peaks reset per step; which
    steps are measured, and the leak check, are `MemoryMonitor`'s: on CUDA every `every`-th step; on CPU
    (the exact ``cpu-dispatch`` source costs ~10 µs per op) sampled so that the cumulative overhead stays
    within `max_overhead` of the training time. Unmeasured steps get no memory fields.

    Args:
        every: measure steps 1, 1 + every, 1 + 2·every, … (record numbers).
        source: passed to `MemoryProfiler`.
        max_overhead: fraction of step time the CPU tracker may cost (cumulative), or None.
        oom_snapshot: CUDA only: a path, or True for ``out_dir/oom_snapshot.pickle``, written on an OOM.
        leaks: a `LeakDetector`, True for the default one, False for none.

    Needs from the trainer: model, loss_fn, optimizer, device, step, micro_step, loss, record, log();
    out_dir when oom_snapshot is True.
    """

    order = 50  # before the metrics logger, which writes the record

    def __init__(self, every: int = 1, *, source: str = "auto", max_overhead: float | None = 0.02,
                 oom_snapshot: str | os.PathLike | bool = False, leaks: LeakDetector | bool = True):
        if every < 1:
            raise ValueError(f"MemoryCallback every must be >= 1, got {every}")
        if max_overhead is not None and not 0 < max_overhead < 1:
            raise ValueError(f"MemoryCallback max_overhead must be in (0, 1) or None, got {max_overhead}")
        self.every = every
        self.source = source
        self.max_overhead = max_overhead
        self.oom_snapshot = oom_snapshot
        self.leaks = leaks
        self.monitor: MemoryMonitor | None = None
        self._oom_ctx = None

    @property
    def profiler(self):
        return None if self.monitor is None else self.monitor.profiler

    @property
    def measured_steps(self) -> list[int]:
        return [] if self.monitor is None else self.monitor.measured_steps

    @property
    def sampled(self) -> bool:
        return self.monitor is not None and self.monitor.sampled

    # ------------------------------------------------------------------ events
    def before_fit(self, trainer) -> None:
        roots = [getattr(trainer, "model", None), getattr(trainer, "loss_fn", None), getattr(trainer, "optimizer", None)]
        self.monitor = MemoryMonitor(getattr(trainer, "device", None), source=self.source,
                                     baseline=[r for r in roots if r is not None], every=self.every,
                                     max_overhead=self.max_overhead, leaks=self.leaks)
        if self.oom_snapshot and self.monitor.source == "cuda":
            path = self.oom_snapshot
            if path is True:
                path = os.path.join(os.fspath(trainer.out_dir), "oom_snapshot.pickle")
            self._oom_ctx = oom_snapshot(path)
            self._oom_ctx.__enter__()
        elif self.oom_snapshot:
            trainer.log(f"MemoryCallback: oom_snapshot needs CUDA; not armed (source {self.monitor.source})")
        if self.monitor.sampled:
            trainer.log(f"MemoryCallback: source cpu-dispatch, steps sampled to keep the overhead within "
                        f"{self.max_overhead:.0%} of training time")

    def before_batch(self, trainer) -> None:
        if self.monitor is None:
            self.before_fit(trainer)
        if trainer.micro_step == 0:
            self.monitor.step_begin(trainer.step + 1)  # the number this step's record gets
        self.monitor.phase("forward")

    def after_loss(self, trainer) -> None:
        self.monitor.phase("backward")
        self.monitor.track(getattr(trainer, "loss", None))

    def after_backward(self, trainer) -> None:
        self.monitor.phase(None)

    def before_step(self, trainer) -> None:
        self.monitor.phase("optimizer")

    def after_step(self, trainer) -> None:
        if not self.monitor.in_step:
            return
        fields = self.monitor.step_end()
        if "leak" in fields:
            trainer.log(f"MemoryCallback: leak at step {trainer.record.get('step')}: {fields['leak']}")
        trainer.record.update(fields)

    def after_fit(self, trainer) -> None:
        self.close()

    def close(self) -> None:
        """Stop tracking and disarm the OOM snapshot (after_fit calls it; call it if a run raised)."""
        if self.monitor is not None:
            self.monitor.close()
        if self._oom_ctx is not None:
            ctx, self._oom_ctx = self._oom_ctx, None
            ctx.__exit__(None, None, None)
