"""`Watch`, the context manager `diagnostics.watch` returns: its arguments, attaching and removing its hooks,
and what the loop calls (`log`, `log_eval`, `set_batch`)."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from dcal.runfolder import RunWriter

from ..memory.monitor import MemoryMonitor
from ..nonfinite import (
    FiniteGuard,
    NonFiniteError,
    scaler_enabled,
)
from .hooks import StepHooks
from .records import StepRecords
from .runconfig import _default_keys
from .values import MicroBatch, _floats

# The memory profiler's share of the step time (cumulative, CPU sampling): 2 %, leaving room under the
# 3 % the whole watch may cost for the hooks, the gradient norm and the one sync per step.
MEMORY_OVERHEAD = 0.02
# Step records kept in memory (`Watch.records`); metrics.jsonl holds them all.
RECORDS_KEPT = 1000
MODES = ("raise", "warn")


# ----------------------------------------------------------------------------- the watch
class Watch(StepHooks, StepRecords):
    """The context manager `watch` returns; see `diagnostics.watch` for what it attaches.

    Its hook handlers are `StepHooks`' (`diagnostics.watch.hooks`), its records and run folder `StepRecords`'.

    Args:
        model: the module the loop trains (any ``nn.Module``: a timm ViT, a `dcal.DCAL`, the user's own).
        optimizer: its ``torch.optim.Optimizer``.
        loss_fn: the criterion, an ``nn.Module`` (e.g. ``nn.CrossEntropyLoss()``, `dcal.UncertaintyLoss`):
            its output is the loss (a tuple's first tensor, a dict's entries by key), its inputs the branch
            losses when they come as a list, its weights ``weights()`` or ``log_vars`` the uncertainty
            weights w1, w2... None: the loss is the model's output when that is a scalar (or has a ``loss``
            entry); log it with `log` otherwise.
        out_dir: the run folder to write (metrics.jsonl, config.yaml, train.log); None writes nothing.
        scaler: the loop's `torch.amp.GradScaler`, or None.
        keys: the user's names → the run record's (``{"w1": "w_sa", "total": "loss"}``). Every key must
            match a name seen in the first step (a typo raises, naming what was seen).
        replay: ``replay(micro_batch)`` re-runs forward, loss and backward of one `MicroBatch` (under the
            RNG state it first ran with); tier 2 runs it under `NonFiniteDetector` to name the module. None:
            the error names the tier-1 term only.
        mode: ``"raise"`` a `NonFiniteError` (from ``optimizer.step``, before the update), or ``"warn"``:
            drop the gradients (the step changes nothing), warn, and mark the record.
        memory: run the memory profiler and leak detector.

    Attributes:
        step: steps recorded so far. records: the last `RECORDS_KEPT` step records. findings: the
        non-finite errors found. leak_report: the leak detector's report once it flagged, else None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, loss_fn: nn.Module | None = None,
                 out_dir: str | Path | None = None, scaler: Any = None, keys: Mapping[str, str] | None = None,
                 replay: Callable[[MicroBatch], Any] | None = None, mode: str = "raise", memory: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"watch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if loss_fn is not None and not isinstance(loss_fn, nn.Module):
            raise TypeError(f"watch: loss_fn must be an nn.Module (hooks attach to modules), got "
                            f"{type(loss_fn).__name__}; wrap a function in a module, or pass loss_fn=None and "
                            "log the loss with watch.log(loss=...)")
        if replay is not None and not callable(replay):
            raise TypeError(f"watch: replay must be a callable replay(micro_batch), got {type(replay).__name__}")
        if mode not in MODES:
            raise ValueError(f"watch: mode must be one of {MODES}, got {mode!r}")
        keys = dict(keys or {})
        bad = [(k, v) for k, v in keys.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"watch: keys must map names (str) to run-record names (str), got {bad}")
        scaler_enabled(scaler)  # validates the type
        self.model, self.optimizer, self.loss_fn, self.scaler = model, optimizer, loss_fn, scaler
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.user_keys = keys
        self.keys = {**_default_keys(model, loss_fn), **keys}
        self.replay = replay
        self.mode = mode
        self.memory = memory
        self.step = 0
        self.records: deque = deque(maxlen=RECORDS_KEPT)
        self.findings: list[NonFiniteError] = []
        self.leak_report: dict | None = None
        self.accum: int | None = None
        self._active = False
        self._handles: list[Any] = []
        self._tensor_handles: list[Any] = []
        self._guard: FiniteGuard | None = None
        self._monitor: MemoryMonitor | None = None
        self._run: RunWriter | None = None
        self._seen_names: set[str] = set()
        self._peak_lr = 0.0
        self._batch_size: int | None = None
        self._pending: dict | None = None  # the last step's record, written when the next step starts
        self._elapsed = 0.0
        self._reset_step()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Watch:
        if self._active:
            raise RuntimeError("watch is already active (it is not re-entrant)")
        self._guard = FiniteGuard(self.model, loss_fn=self.loss_fn, scaler=self.scaler,
                                  replay=None if self.replay is None else self._run_replay)
        try:
            self._open_run()
            if self.memory:
                dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
                self._monitor = MemoryMonitor(dev, baseline=[m for m in (self.model, self.loss_fn, self.optimizer)
                                                             if m is not None], max_overhead=MEMORY_OVERHEAD)
            self._attach()
        except BaseException:
            self._detach()
            raise
        self._active = True
        self._t_start = time.perf_counter() - self._elapsed
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        err = None
        try:
            if exc is None:
                try:  # the last step, if the scaler skipped it; the keys of a one-step run
                    if self._in_step and self._phase == "backward":
                        self._close_skipped_step(at_exit=True)
                    self._flush()
                except Exception as e:  # raised below, after the end record names it
                    err = e
            self._flush(check_keys=False)  # a typo in keys must not hide the loop's own exception
            self._elapsed = time.perf_counter() - self._t_start
            if self._run is not None:
                failure = exc if exc is not None else err
                self._write_config()
                self._run.write_end("completed" if failure is None else "crashed", self.step, None, failure)
        finally:
            self._detach()
        if err is not None:
            raise err
        return False

    def _attach(self) -> None:
        m, opt = self.model, self.optimizer
        self._handles.append(m.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._on_model_output, with_kwargs=True))
        if self.loss_fn is not None:
            self._handles.append(self.loss_fn.register_forward_hook(self._on_loss, with_kwargs=True))
        self._handles.append(opt.register_step_pre_hook(self._on_step_pre))
        self._handles.append(opt.register_step_post_hook(self._on_step_post))

    def _detach(self) -> None:
        handles, self._handles = self._handles + self._tensor_handles, []
        self._tensor_handles = []
        for h in handles:
            h.remove()
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._run is not None:
            self._run.close()
            self._run = None
        self._active = False
        self._reset_step()

    # ------------------------------------------------------------------ public
    def log(self, **fields: Any) -> None:
        """Add fields to the step record: during a step, to its record; between ``optimizer.step()`` and the
        next forward, to the record of the step just taken. Names go through `keys`."""
        target = self._pending if self._pending is not None and not self._in_step else self._logged
        for k, v in fields.items():
            self._seen_names.add(k)
            target[self.keys.get(k, k)] = v.detach() if isinstance(v, Tensor) else v

    def log_eval(self, **fields: Any) -> None:
        """Write an eval record (``kind: eval``) at the current step, e.g. ``log_eval(acc_sa=0.81)``."""
        self._flush()
        rec = {"kind": "eval", "step": self.step, **{self.keys.get(k, k): v for k, v in fields.items()}}
        self._write(_floats(rec))

    def set_batch(self, batch: Any) -> None:
        """Give ``replay`` this object (e.g. the loader's batch) for the current micro-batch; only needed when
        the labels never reach the hooked criterion. Call it after the micro-batch's first forward."""
        if self._micro is None:
            raise RuntimeError("watch.set_batch: no micro-batch is running (call it after the model's forward)")
        self._micro["batch"] = batch

def watch(model: nn.Module, optimizer: torch.optim.Optimizer, *, loss_fn: nn.Module | None = None,
          out_dir: str | Path | None = None, scaler: Any = None, keys: Mapping[str, str] | None = None,
          replay: Callable[[MicroBatch], Any] | None = None, mode: str = "raise", memory: bool = True) -> Watch:
    """Attach the finite checks, the memory profiler and the leak detector to a hand-written loop.

    Use it as ``with watch(model, optimizer, loss_fn=criterion, out_dir=...) as w:`` around the loop; see
    `Watch` for every argument and the module docstring for what each hook does.
    """
    return Watch(model, optimizer, loss_fn=loss_fn, out_dir=out_dir, scaler=scaler, keys=keys, replay=replay,
                 mode=mode, memory=memory)
