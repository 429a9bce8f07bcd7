"""A training step's peak memory predicted from shapes alone: the step runs on `meta` tensors, counted.

Signature (issue 19; backwards compatible, every earlier call still works)::

    predict_step_memory(model, inputs, targets=None, *, loss_fn=None, optimizer=None, amp_dtype=None,
                        grad_accum_steps=1, target="cuda", eval_inputs=None) -> MemoryPrediction

``inputs``: a tensor or a shape (one positional input), a tuple of them, or a dict of keyword inputs
(``model(pixel_values=...)``); ``loss_fn(output, *targets)`` may close over real tensors (labels);
``pred.device_memory(gpu_bytes=...)`` says what the card must hold (`device.device_memory`).

`predict_step_memory` copies the model onto the meta device (no weight is copied or allocated), runs forward,
loss, backward and the optimiser step on meta tensors, and counts every storage the ops create and free with
the same live-tensor tracker that measures CPU steps (`counting.CategoryTracker`). A ViT-B step at 448 px
takes seconds on a laptop.

How the step runs (what is modelled):

- The meta tensors are wrapped by torch's `FakeTensorMode` with device ``cpu``: every op dispatches exactly
  as on a CPU tensor (autocast's CPU op lists, the CPU fused-attention kernel, the model's own code paths)
  but computes nothing. On CPU the prediction therefore equals the measured peak (tests: within 2 %).
- Real tensors the step meets (labels a loss closes over, a plain tensor attribute of the model) are read as
  constants: the mode is built with ``allow_non_fake_inputs=True``, so torch converts each one, once, into a
  fake tensor of the same shape, dtype and strides as it reaches an op. This is exact for memory: such a
  tensor existed before the step (on a GPU it was moved there before the step), so it is not one of the
  step's allocations, in the prediction as in the measured reference; what ops make from it is counted.
  A value read from a real tensor (``y.max().item()``) is its real value. A real tensor that requires grad
  raises `MetaUnsupportedError` (its gradient would be fake): register it on the model or pass its module as
  ``loss_fn``. (Converting closure cells would miss tensors held in objects; a dispatch mode that fakifies
  arguments would re-implement what FakeTensorMode's converter already memoises.)
- ``target="cuda"`` adds what a GPU does differently, as far as we model it: (1) the caching allocator
  rounds every allocation up to 512 bytes (its smallest block; the allocator's ``max_memory_allocated``
  counts blocks); (2) CUDA autocast runs ``softmax``/``log_softmax`` with an fp32 output and
  ``layer_norm``/``group_norm`` in fp32 (CPU autocast leaves them in the input dtype); (3) torch's Adam/AdamW
  default to the multi-tensor (``foreach``) implementation on CUDA, whose temporaries span all parameters;
  (4) a model with an ``attention_tiling`` attribute (`dcal.DCAL`) runs its untiled GPU attention path.
  What the card holds beyond PyTorch's counters (CUDA context, segments, fragmentation, cuBLAS workspaces)
  is `device.device_memory`. The CUDA accuracy is unmeasured until `benchmarks/gpu_memory.py` runs on a GPU.
- Values a step reads back into Python (``bool(t)``, ``t.item()``) do not exist on meta. A bool made by
  ``any`` reads False and one made by ``all`` reads True (no anomaly: the checks pass); a number reads 1 (Adam
  divides by 1 − β^step). Each such read is listed in the result (``data_reads``); any other bool stops with
  `MetaUnsupportedError`.
- An op without a meta implementation, or whose output shape depends on values (``nonzero``), raises
  `MetaUnsupportedError` naming the op, the module that ran it (`counting.ModuleStack`; torch's
  `ModuleTracker` was tried and left: its backward hooks kept a block alive) and the phase.
"""
from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .counting import CATEGORIES, CategoryTracker, MetaUnsupportedError, ModuleStack, classify, idents
from .sources import MB
from .step import Batch, CudaAutocast, Step, default_loss, default_optimizer, gpu_code_paths

__all__ = ["predict_step_memory", "measure_step_memory", "MemoryPrediction", "PhasePeak", "MetaUnsupportedError",
           "CATEGORIES", "CUDA_BLOCK_BYTES", "TARGETS", "default_loss"]

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator's smallest block: every allocation is rounded up to it
TARGETS = ("cuda", "cpu")
PHASES = ("forward", "backward", "optimizer")


@dataclass
class PhasePeak:
    """The peak of one phase and what the live bytes were at that moment (bytes per `CATEGORIES` entry)."""

    peak_bytes: int
    composition: dict[str, int]

    def as_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "composition": dict(self.composition)}


@dataclass
class MemoryPrediction:
    """Predicted (or, from `measure_step_memory`, measured) peaks of a training step, per phase.

    ``train``: forward / backward / optimizer peaks, each the max over the first two optimiser steps (the
    first allocates the optimiser state, the second runs with it). ``eval`` and ``train_after_eval``: the
    evaluation step (no_grad) and the first training step after it, when evaluation was asked for.
    ``trace``: every allocation and free in order (`counting.CategoryTracker.trace`), which
    `device_memory` replays through a model of the CUDA caching allocator.
    """

    train: dict[str, PhasePeak]
    eval: PhasePeak | None = None
    train_after_eval: dict[str, PhasePeak] | None = None
    target: str = "cuda"
    data_reads: list[str] = field(default_factory=list)
    trace: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @property
    def peak_bytes(self) -> int:
        """The training step's peak (max over phases)."""
        return max(p.peak_bytes for p in self.train.values())

    @property
    def eval_peak_bytes(self) -> int | None:
        return None if self.eval is None else self.eval.peak_bytes

    @property
    def train_after_eval_peak_bytes(self) -> int | None:
        if self.train_after_eval is None:
            return None
        return max(p.peak_bytes for p in self.train_after_eval.values())

    @property
    def worst_bytes(self) -> int:
        """The highest of the training, evaluation and after-evaluation peaks."""
        return max(v for v in (self.peak_bytes, self.eval_peak_bytes, self.train_after_eval_peak_bytes)
                   if v is not None)

    @property
    def peak_phase(self) -> str:
        return max(self.train, key=lambda k: self.train[k].peak_bytes)

    def device_memory(self, **kw):
        """What the card must hold for this step: `device.device_memory(self, **kw)`."""
        from .device import device_memory

        return device_memory(self, **kw)

    def table(self):
        """A pandas DataFrame: one row per (step, phase), columns peak and each category, in MB."""
        import pandas as pd

        rows = []
        for step, phases in (("train", self.train), ("eval", None if self.eval is None else {"forward": self.eval}),
                             ("train_after_eval", self.train_after_eval)):
            for name, p in (phases or {}).items():
                rows.append({"step": step, "phase": name, "peak_mb": p.peak_bytes / MB,
                             **{c: p.composition.get(c, 0) / MB for c in CATEGORIES}})
        return pd.DataFrame(rows).set_index(["step", "phase"])

    def as_dict(self) -> dict:
        return {
            "target": self.target, "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase,
            "train": {k: v.as_dict() for k, v in self.train.items()},
            "eval": None if self.eval is None else self.eval.as_dict(),
            "train_after_eval": None if self.train_after_eval is None else
            {k: v.as_dict() for k, v in self.train_after_eval.items()},
            "data_reads": list(self.data_reads),
        }


# ============================================================================ inputs
def _is_shape(x: Any) -> bool:
    return isinstance(x, (torch.Size, tuple, list)) and bool(x) and all(isinstance(i, int) for i in x)


class _Shape:
    """A shape given in place of an input: a leaf for pytree (a torch.Size would be walked into)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _batch(inputs: Any, targets: Any, name: str = "inputs") -> Batch:
    """A `Batch` from what the caller gave: a tensor or a shape (one positional input), a tuple / list of them
    (positional inputs), or a dict (keyword inputs, ``model(**inputs)``); targets: a tensor, a shape, or a
    tuple of them (``loss_fn(output, *targets)``)."""
    def one(x):
        return _Shape(x) if _is_shape(x) else x

    if isinstance(inputs, Tensor) or _is_shape(inputs):
        args, kwargs = (one(inputs),), {}
    elif isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"predict_step_memory: {name} as a dict are keyword inputs; keys must be str, got {bad}")
        args, kwargs = (), {k: one(v) for k, v in inputs.items()}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(one(x) for x in inputs), {}
    else:
        raise TypeError(f"predict_step_memory: {name} must be a tensor, a shape, a tuple of them or a dict of keyword "
                        f"inputs, got {type(inputs).__name__}")
    if targets is None:
        tgt = ()
    elif isinstance(targets, Tensor) or _is_shape(targets):
        tgt = (one(targets),)
    elif isinstance(targets, (tuple, list)):
        tgt = tuple(one(t) for t in targets)
    else:
        raise TypeError(f"predict_step_memory: targets must be a tensor, a shape or a tuple of them, got "
                        f"{type(targets).__name__}")
    return Batch(args, kwargs, tgt)


def _materialise(batch: Batch, mode, fake: bool) -> Batch:
    """A fresh copy of the batch: meta (fake, device cpu) tensors when predicting, clones when measuring; a
    shape becomes a float32 tensor (random when measuring). Nested containers are followed; other values pass."""
    from torch.utils._pytree import tree_map

    def make(x):
        if isinstance(x, _Shape):
            if fake:
                with mode:
                    return torch.empty(x.shape, dtype=torch.float32)
            return torch.randn(x.shape)
        if isinstance(x, Tensor):
            if fake:
                with mode:
                    return torch.empty(x.shape, dtype=x.dtype)
            return x.clone()
        return x

    return Batch(*tree_map(make, (batch.args, batch.kwargs, batch.targets)))


def _meta_copy(module: nn.Module, mode) -> nn.Module:
    """A copy of `module` whose parameters and buffers are meta (fake) tensors: no weight is copied."""
    memo: dict[int, Any] = {}

    def fake(t: Tensor) -> Tensor:
        with mode:
            return torch.empty(t.shape, dtype=t.dtype)

    for p in module.parameters():
        memo[id(p)] = nn.Parameter(fake(p.detach()), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = fake(b)
    return copy.deepcopy(module, memo)


# ============================================================================ the run
def _run(model, batch: Batch, eval_batch: Batch | None, loss_fn, optimizer, amp_dtype, grad_accum_steps, target,
         fake: bool) -> MemoryPrediction:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # allow_non_fake_inputs: a real tensor the loss closes over (labels) or the model holds as a plain
    # attribute reaches an op as it is; FakeTensorMode converts it to a fake with the same shape, dtype and
    # strides (memoised, so once per tensor). Like on a GPU run where it was created before the step, it is
    # not a new allocation of the step; the measured reference does not count it either.
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        model = _meta_copy(model, mode)
        if isinstance(loss_fn, nn.Module):
            loss_fn = _meta_copy(loss_fn, mode)
    batch = _materialise(batch, mode, fake) if fake else batch
    loss_fn = loss_fn if loss_fn is not None else default_loss
    modules = ModuleStack(model)
    tracker = CategoryTracker(("cpu",), CUDA_BLOCK_BYTES if target == "cuda" else 1, modules, stand_ins=fake)
    cuda = target == "cuda" and fake

    def pack(t: Tensor) -> Tensor:
        tracker.saved.add(tracker.ident(t))
        # detach: an alias of the same storage without the grad_fn. Returning `t` itself would make an op's
        # saved output refer back to its own graph node: a cycle that only gc frees (a leak the step lacks).
        return t.detach()

    saved_hook = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with mode, modules, saved_hook, (CudaAutocast() if cuda else contextlib.nullcontext()), \
            (gpu_code_paths(model) if cuda else contextlib.nullcontext()):
        opt = (optimizer or default_optimizer)(model, loss_fn)
        if cuda:
            for g in opt.param_groups:  # torch's CUDA default for Adam/AdamW/SGD: the multi-tensor path
                if g.get("foreach", False) is None:
                    g["foreach"] = True
        params = [*model.parameters(), *model.buffers(),
                  *(loss_fn.parameters() if isinstance(loss_fn, nn.Module) else [])]
        tracker.seed(params)
        tracker.seed(batch.tensors())
        groups = {"parameters": idents(tracker, params), "inputs": idents(tracker, batch.tensors())}
        step = Step(model, loss_fn, opt, amp_dtype, grad_accum_steps, "cpu", tracker)
        with tracker:
            step.train(batch, first=True)
            step.train(batch)
            train, step.peaks = step.peaks, {}
            groups["optimizer_state"] = idents(tracker, _optimizer_tensors(opt))
            if eval_batch is not None:
                # The evaluation batch exists only while evaluating: made here, freed after.
                ev = _materialise(eval_batch, mode, fake)
                groups["inputs"] |= idents(tracker, ev.tensors())
                step.evaluate(ev)
                del ev
                evaluated, step.peaks = step.peaks, {}
                gc.collect()
                step.train(batch)
                after = step.peaks
        groups.update(attention_maps=tracker.attention, activations=tracker.saved - {None}, gradients=step.grad_ids)

    def peaks(d):
        return {k: PhasePeak(p, classify(s, groups)) for k, (p, s) in d.items()}

    tracker.close()
    return MemoryPrediction(train=peaks(train),
                            eval=None if eval_batch is None else peaks(evaluated)["eval"],
                            train_after_eval=None if eval_batch is None else peaks(after),
                            target=target, data_reads=tracker.data_reads, trace=tracker.trace)


def _optimizer_tensors(opt: torch.optim.Optimizer):
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                yield v


# ============================================================================ public API
def predict_step_memory(model: nn.Module, inputs: Any, targets: Any = None, *,
                        loss_fn: Callable | nn.Module | None = None,
                        optimizer: Callable[[nn.Module, Any], torch.optim.Optimizer] | None = None,
                        amp_dtype: torch.dtype | None = None, grad_accum_steps: int = 1, target: str = "cuda",
                        eval_inputs: Any = None) -> MemoryPrediction:
    """Predict the peak memory of a training step (and optionally an evaluation step) from shapes alone.

    The model is copied onto meta tensors (its own weights are neither copied nor touched), and two
    optimiser steps run under the live-tensor tracker; see the module docstring for what is modelled.

    Args:
        model: any `nn.Module` (real, or built under ``with torch.device("meta")``). Gradient checkpointing
            is the model's own (``model.set_grad_checkpointing()`` for timm): the step runs what it runs.
        inputs: the forward's inputs: a tensor or a shape (float32) for one positional input; a tuple or list
            of them for several; a dict for keyword inputs (``model(**inputs)``). Only shapes and dtypes are read.
        targets: the loss's extra arguments, ``loss_fn(output, *targets)``: a tensor, a shape or a tuple of
            them (counted as inputs of the step).
        loss_fn: ``loss_fn(output, *targets) -> scalar``. It may close over real tensors (labels, class
            weights): they are read as constants (module docstring). An `nn.Module` has its parameters copied
            to meta too. Default `default_loss` (cross-entropy; for a DCALOutput, over the branches).
        optimizer: ``optimizer(model, loss_fn) -> Optimizer`` built on the meta copy; default AdamW.
        amp_dtype: None (fp32), ``torch.float16`` or ``torch.bfloat16``: the forward runs under autocast.
        grad_accum_steps: micro-batches per optimiser step (the second one runs with gradients alive).
        target: ``"cuda"`` (allocator rounding and CUDA-only code paths, module docstring) or ``"cpu"``.
        eval_inputs: when given (same forms as `inputs`), also an evaluation step (eval mode, no_grad) and
            the first training step after it.

    Returns:
        `MemoryPrediction`: ``peak_bytes`` (PyTorch-allocated), per-phase `PhasePeak` with the composition by
        `CATEGORIES`; ``device_memory(gpu_bytes=...)`` adds what the card must hold (`device.device_memory`).

    Raises:
        MetaUnsupportedError naming the op, module and phase that cannot run on meta tensors, and what to change.
    """
    if target not in TARGETS:
        raise ValueError(f"predict_step_memory: target must be one of {TARGETS}, got {target!r}")
    _check_common(model, amp_dtype, grad_accum_steps)
    return _run(model, _batch(inputs, targets), None if eval_inputs is None else _batch(eval_inputs, None,
                                                                                         "eval_inputs"),
                loss_fn, optimizer, amp_dtype, grad_accum_steps, target, fake=True)


def measure_step_memory(model: nn.Module, inputs: Any, targets: Any = None, *, loss_fn=None, optimizer=None,
                        amp_dtype: torch.dtype | None = None, grad_accum_steps: int = 1,
                        eval_inputs: Any = None) -> MemoryPrediction:
    """The same steps as `predict_step_memory` run for real on CPU tensors and measured by the tracker:
    the reference the prediction is tested against. Changes `model` (two optimiser steps)."""
    _check_common(model, amp_dtype, grad_accum_steps)
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("measure_step_memory measures CPU tensors: move the model to CPU")
    batch = _materialise(_batch(inputs, targets), None, fake=False)
    ev = None if eval_inputs is None else _batch(eval_inputs, None, "eval_inputs")
    return _run(model, batch, ev, loss_fn, optimizer, amp_dtype, grad_accum_steps, "cpu", fake=False)


def _check_common(model: nn.Module, amp_dtype, grad_accum_steps: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"predict_step_memory: model must be an nn.Module, got {type(model).__name__}")
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
