"""`watch`: the toolkit on a hand-written training loop, attached with one call.

    with diagnostics.watch(model, optimizer, loss_fn=criterion, out_dir="runs/mine", scaler=scaler,
                           replay=replay) as w:
        for x, y in loader:                      # the loop is the user's, unchanged
            ...

It attaches through public PyTorch hooks only, and its exit removes every one of them:

=====================================  ==========================================================================
hook                                   what it means for the watch
=====================================  ==========================================================================
``model`` forward pre-hook             a micro-batch starts (the first forward after a backward or a step; a
                                       forward under ``torch.no_grad()`` is an evaluation and is ignored)
``model`` forward hook                 without a criterion, the output's finite check (a scalar is the loss)
``loss_fn`` forward hook               the loss terms of the micro-batch (its output; its inputs when they are
                                       a list of branch losses, as `dcal.UncertaintyLoss` takes) and its
                                       labels (its arguments that carry no gradient)
a hook on the loss (and the output)    the backward starts
``optimizer`` step pre-hook            the backward is over: tier-1 checks, gradient norm, learning rate
``optimizer`` step post-hook           the step is done: its record is complete
=====================================  ==========================================================================

What it runs is the same machinery the `dcal.train.Trainer`'s callbacks use: `FiniteGuard` (tier-1 finite
checks on the loss terms, w and the gradient norm, one sync per step; tier 2 through ``replay``),
`MemoryMonitor` (the memory profiler with forward / backward / optimizer phases, sampled on CPU, and the
leak detector) and `dcal.metrics_log.MetricsLogger` (``metrics.jsonl``: ``step`` records with the run
record's names, an ``end`` record). With ``out_dir`` the folder is a run folder: `dcal doctor`, the plots
and the run explorer read it.

Gradient accumulation: the micro-batches between two optimiser steps are one step; its record holds their
mean loss terms. GradScaler: a step the scaler skips never calls ``optimizer.step``; the watch sees the
scale drop at the next micro-batch (or at exit) and writes the step as ``skipped: true, skip_reason:
"amp-overflow"``, not as a fault (until `MAX_OVERFLOWS_IN_A_ROW` in a row). Until the first real step shows
how many micro-batches a step has, the scale is read (one host sync) at each micro-batch after a backward.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import yaml
from torch import Tensor

from dcal.metrics_log import METRICS_FILE, MetricsLogger, end_record

from .memory.monitor import MemoryMonitor
from .nonfinite import (
    AMP_OVERFLOW,
    MAX_OVERFLOWS_IN_A_ROW,
    FiniteGuard,
    NonFiniteError,
    _loss_weights,
    scaler_enabled,
)

__all__ = ["watch", "Watch", "MicroBatch", "LeakWarning", "NonFiniteWarning", "MEMORY_OVERHEAD",
           "MAX_OVERFLOWS_IN_A_ROW"]

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
# The memory profiler's share of the step time (cumulative, CPU sampling): 2 %, leaving room under the
# 3 % the whole watch may cost for the hooks, the gradient norm and the one sync per step.
MEMORY_OVERHEAD = 0.02
# Step records kept in memory (`Watch.records`); metrics.jsonl holds them all.
RECORDS_KEPT = 1000
MODES = ("raise", "warn")


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


def _optimizer_name(opt: torch.optim.Optimizer) -> str:
    """The run record's name: ``adamw``; ``adam_l2`` for Adam with coupled weight decay (the seed's)."""
    name = type(opt).__name__.lower()
    decay = max(float(g.get("weight_decay", 0.0) or 0.0) for g in opt.param_groups)
    if name == "adam":
        if any(g.get("decoupled_weight_decay") for g in opt.param_groups):
            return "adamw"
        return "adam_l2" if decay > 0 else "adam"
    return name


def _default_keys(model: nn.Module, loss_fn: Any) -> dict[str, str]:
    """For a `dcal.DCAL` with a `dcal.UncertaintyLoss`: ``loss1``/``w1``... → ``loss_sa``/``w_sa``..."""
    from dcal.loss import UncertaintyLoss
    from dcal.model import DCAL

    if not isinstance(model, DCAL) or not isinstance(loss_fn, UncertaintyLoss):
        return {}
    branches = [b for b, on in (("sa", True), ("glca", model.glca is not None), ("pwca", model.pwca_enabled)) if on]
    keys = {}
    for i, b in enumerate(branches):
        keys[f"loss{i + 1}"] = f"loss_{b}"
        keys[f"w{i + 1}"] = f"w_{b}"
    return keys


# ----------------------------------------------------------------------------- the watch
class Watch:
    """The context manager `watch` returns; see the module docstring for what it attaches.

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
        self._logger: MetricsLogger | None = None
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
            if self._logger is not None:
                failure = exc if exc is not None else err
                self._write_config()
                self._logger.after_fit(_Records(end_record=end_record(
                    "completed" if failure is None else "crashed", self.step, None, failure)))
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
        if self._logger is not None:
            self._logger.after_fit(_Records())  # closes the file (idempotent)
            self._logger = None
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
        self._write(_floats(rec), eval_record=True)

    def set_batch(self, batch: Any) -> None:
        """Give ``replay`` this object (e.g. the loader's batch) for the current micro-batch; only needed when
        the labels never reach the hooked criterion. Call it after the micro-batch's first forward."""
        if self._micro is None:
            raise RuntimeError("watch.set_batch: no micro-batch is running (call it after the model's forward)")
        self._micro["batch"] = batch

    # ------------------------------------------------------------------ state
    def _reset_step(self) -> None:
        self._in_step = False
        self._phase: str | None = None  # None, "forward", "backward", "optimizer"
        self._micro: dict | None = None
        self._n_micro = 0
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._logged: dict[str, Any] = {}
        self._step_values: dict[str, Any] = {}
        self._scale_begin: float | None = None

    def _live(self) -> bool:
        return self._active and torch.is_grad_enabled() and not self._guard.replaying

    def _begin_step(self) -> None:
        self._flush()
        self._in_step = True
        self._guard.begin_step()
        if scaler_enabled(self.scaler):
            self._scale_begin = float(self.scaler.get_scale())
        if self._monitor is not None:
            self._monitor.step_begin(self.step + 1)

    def _set_phase(self, name: str | None) -> None:
        self._phase = name
        if self._monitor is not None:
            self._monitor.phase(name)

    # ------------------------------------------------------------------ hooks
    def _on_forward_pre(self, module, args, kwargs) -> None:
        if not self._live() or self._phase == "forward":
            return None  # evaluation, replay, or another forward of the same micro-batch
        if self._phase == "backward":
            self._close_skipped_step()
        if not self._in_step:
            self._begin_step()
        self._n_micro += 1
        self._micro = {"args": args, "kwargs": kwargs, "targets": (), "batch": None, "terms": {},
                       "rng": self._rng_state() if self.replay is not None else None}
        if self._batch_size is None and args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            self._batch_size = int(args[0].shape[0])
        self._set_phase("forward")
        return None

    def _on_model_output(self, module, args, kwargs, output) -> None:
        if not self._live() or self._micro is None:
            return None
        graph = _first_graph_tensor(output)
        if self.loss_fn is None:  # the output is all there is to check (and, when a scalar, the loss)
            scalars = _scalars(output)
            terms = {k: v for k, v in scalars.items() if v.numel() == 1}
            if not terms:  # not a loss: check the outputs cheaply (max |x| is non-finite iff one value is)
                terms = {f"output {k} (max |x|)": v.detach().abs().amax() for k, v in scalars.items()}
            self._micro["terms"].update(terms)
            self._track(graph)
        self._hook_backward(graph)  # also with a criterion: a loss computed without it still has a backward
        return None

    def _on_loss(self, module, args, kwargs, output) -> None:
        if not self._live() or self._micro is None or self._phase != "forward":
            return None
        self._micro["terms"].update({**_branch_losses(args), **_scalars(output)})
        if self.replay is not None:
            self._micro["targets"] = tuple(a for a in args if isinstance(a, Tensor) and not a.requires_grad)
        graph = _first_graph_tensor(output)
        self._track(graph)
        self._hook_backward(graph)
        return None

    def _track(self, t: Tensor | None) -> None:
        if t is not None and self._monitor is not None:
            self._monitor.track(t)  # a weak reference: the leak detector's

    def _hook_backward(self, t: Tensor | None) -> None:
        if t is not None:
            self._tensor_handles.append(t.register_hook(self._on_backward_start))

    def _on_backward_start(self, grad: Tensor) -> None:
        if self._active and self._phase == "forward" and not self._guard.replaying:
            self._finish_micro()
            self._set_phase("backward")
        return None

    def _finish_micro(self) -> None:
        mb = self._micro
        if mb is None:
            return
        self._micro = None
        terms = {self.keys.get(k, k): v.detach() for k, v in mb["terms"].items()}
        self._seen_names.update(mb["terms"])
        for k, v in terms.items():
            if v.numel() == 1 and "(max |x|)" not in k:
                self._sums[k] = self._sums[k] + v if k in self._sums else v.float().reshape(())
                self._counts[k] = self._counts.get(k, 0) + 1
        batch = None
        if self.replay is not None:
            batch = (MicroBatch(mb["args"], mb["kwargs"], mb["targets"], mb["batch"]), mb["rng"])
        self._guard.add_micro(terms, batch)

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        if not self._active or self._guard.replaying:
            return None
        if not self._in_step:
            self._begin_step()
        if self._phase == "forward":
            self._finish_micro()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = _grad_norm(params)
        w = _loss_weights(self.loss_fn)
        lr = optimizer.param_groups[0]["lr"]
        self._step_values = {"lr": float(lr), "grad_norm": grad_norm}
        self._peak_lr = max(self._peak_lr, float(lr))
        result = self._guard.check(self.step + 1, {"grad_norm": grad_norm, "w": None if w is None else w.detach()},
                                   scaler_skipped=False)
        if result.error is not None:
            self._fault(result.error)
            for p in params:  # mode "warn": no gradient, no update (the optimiser skips parameters without one)
                p.grad = None
            self._step_values.update(skipped=True, skip_reason="nonfinite")
        self._set_phase("optimizer")
        return None

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        if not self._active or self._guard.replaying or not self._in_step:
            return None
        self.accum = self._n_micro or self.accum
        self._end_step(self._step_values)
        return None

    # ------------------------------------------------------------------ steps the optimiser never took
    def _close_skipped_step(self, at_exit: bool = False) -> None:
        """A micro-batch starts (or the watch exits) after a backward with no optimiser step since: either the
        loop accumulates, or the step was skipped (the scaler's scale dropped, or the step was due)."""
        due = self.accum is None or self._n_micro >= self.accum
        if not self._in_step or not due:
            return
        if scaler_enabled(self.scaler):
            scale = float(self.scaler.get_scale())
            if scale < self._scale_begin:
                return self._skip(AMP_OVERFLOW)
        if self.accum is not None and not at_exit:
            return self._skip("optimizer.step not called")
        return None

    def _skip(self, reason: str) -> None:
        if self._phase == "forward":
            self._finish_micro()
        w = _loss_weights(self.loss_fn)
        result = self._guard.check(self.step + 1, {"w": None if w is None else w.detach()},
                                   scaler_skipped=reason == AMP_OVERFLOW)
        if result.error is not None:
            self._fault(result.error)
        values = {"lr": float(self.optimizer.param_groups[0]["lr"]), "skipped": True, "skip_reason": reason}
        self._end_step(values)

    def _fault(self, err: NonFiniteError) -> None:
        self.findings.append(err)
        if self.mode == "raise":
            raise err
        self._log_line(f"non-finite: {err}")
        warnings.warn(str(err), NonFiniteWarning, stacklevel=3)
        self._step_values["nonfinite"] = f"{err.module} ({err.phase})"

    # ------------------------------------------------------------------ records
    def _end_step(self, values: Mapping[str, Any]) -> None:
        self.step += 1
        rec: dict[str, Any] = {"kind": "step", "step": self.step}
        rec.update({k: s / self._counts[k] for k, s in self._sums.items()})
        w = _loss_weights(self.loss_fn)
        if w is not None:
            for i, v in enumerate(w.detach().reshape(-1)):
                self._seen_names.add(f"w{i + 1}")
                rec[self.keys.get(f"w{i + 1}", f"w{i + 1}")] = v
        rec.update(values)
        if "nonfinite" in self._step_values:
            rec["nonfinite"] = self._step_values["nonfinite"]
        rec["micro_batches"] = self._n_micro
        if self._scale_begin is not None:
            rec["loss_scale"] = self._scale_begin
        rec["time"] = round(time.perf_counter() - self._t_start, 4)
        if self._monitor is not None:
            fields = self._monitor.step_end()
            if "leak" in fields:
                self.leak_report = self._monitor.leak_report
                self._log_line(f"leak at step {self.step}: {fields['leak']}")
                warnings.warn(f"step {self.step}: {fields['leak']}", LeakWarning, stacklevel=4)
            rec.update(fields)
        rec.update(self._logged)
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles = []
        self._reset_step()
        # Written when the next step starts (or at exit), so that `log` after optimizer.step() lands here.
        self._pending = {k: v for k, v in rec.items() if v is not None}

    def _flush(self, check_keys: bool = True) -> None:
        rec, self._pending = self._pending, None
        if rec is None:
            return
        rec = _floats(rec)
        if rec["step"] == 1:
            if check_keys:
                self._check_keys()
            self._write_config()
        self.records.append(rec)
        self._write(rec)

    def _check_keys(self) -> None:
        unmatched = sorted(set(self.user_keys) - self._seen_names)
        if unmatched:
            raise KeyError(f"watch: keys {unmatched} match no name of the first step; the names seen were "
                           f"{sorted(self._seen_names)} (criterion outputs and inputs, w1.., logged fields)")

    def _write(self, rec: dict, eval_record: bool = False) -> None:
        if self._logger is None:
            return
        if eval_record:
            self._logger.after_eval(_Records(eval_record=rec))
        else:
            self._logger.after_step(_Records(record=rec))

    # ------------------------------------------------------------------ the run folder
    def _open_run(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.out_dir / METRICS_FILE
        if self.step == 0 and metrics.exists() and metrics.stat().st_size:
            raise FileExistsError(f"watch: {metrics} already holds a run; give another out_dir")
        self._logger = MetricsLogger(metrics)
        self._logger.before_fit(None)

    def _write_config(self) -> None:
        if self.out_dir is None:
            return
        with open(self.out_dir / CONFIG_FILE, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.config(), f, sort_keys=False)

    def config(self) -> dict:
        """What the watch knows of the run, in `dcal train`'s config.yaml layout (the doctor reads it)."""
        opt = self.optimizer
        model: dict[str, Any] = {"class": type(self.model).__name__,
                                 "parameters": sum(p.numel() for p in self.model.parameters())}
        from dcal.model import DCAL

        if isinstance(self.model, DCAL):
            model.update(glca=self.model.glca is not None, pwca=self.model.pwca_enabled)
        train: dict[str, Any] = {"optimizer": _optimizer_name(opt),
                                 "weight_decay": max(float(g.get("weight_decay", 0.0) or 0.0) for g in opt.param_groups)}
        if self._batch_size is not None:
            train["batch_size"] = self._batch_size
        if self.accum is not None:
            train["grad_accum_steps"] = self.accum
        if self.loss_fn is not None and hasattr(self.loss_fn, "bounds"):
            b = self.loss_fn.bounds
            train["uncertainty_bounds"] = None if b is None else [float(x) for x in b]
        derived: dict[str, Any] = {"lr": self._peak_lr or float(opt.param_groups[0]["lr"]), "world_size": 1}
        num_classes = getattr(self.model, "num_classes", None)
        if isinstance(num_classes, int) and num_classes > 0:
            derived["num_classes"] = num_classes
        if self._batch_size is not None and self.accum is not None:
            derived["global_batch"] = self._batch_size * self.accum
        return {"model": model, "train": train, "derived": derived,
                "watch": {"loss_fn": None if self.loss_fn is None else type(self.loss_fn).__name__,
                          "keys": dict(self.user_keys), "replay": self.replay is not None, "mode": self.mode,
                          "grad_scaler": scaler_enabled(self.scaler)}}

    def _log_line(self, message: str) -> None:
        if self.out_dir is not None:
            with open(self.out_dir / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(message + "\n")

    # ------------------------------------------------------------------ replay
    def _rng_state(self) -> tuple:
        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        return torch.get_rng_state(), cuda, dev

    def _run_replay(self, item: tuple) -> None:
        mb, (cpu, cuda, dev) = item
        with torch.random.fork_rng(devices=[dev] if cuda is not None else []):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, dev)
            self.replay(mb)


class _Records:
    """The attributes `MetricsLogger` reads from a trainer, for the records the watch writes."""

    def __init__(self, record: dict | None = None, eval_record: dict | None = None, end_record: dict | None = None):
        self.record, self.eval_record, self.end_record = record, eval_record, end_record


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, *, loss_fn: nn.Module | None = None,
          out_dir: str | Path | None = None, scaler: Any = None, keys: Mapping[str, str] | None = None,
          replay: Callable[[MicroBatch], Any] | None = None, mode: str = "raise", memory: bool = True) -> Watch:
    """Attach the finite checks, the memory profiler and the leak detector to a hand-written loop.

    Use it as ``with watch(model, optimizer, loss_fn=criterion, out_dir=...) as w:`` around the loop; see
    `Watch` for every argument and the module docstring for what each hook does.
    """
    return Watch(model, optimizer, loss_fn=loss_fn, out_dir=out_dir, scaler=scaler, keys=keys, replay=replay,
                 mode=mode, memory=memory)

