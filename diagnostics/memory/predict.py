"""A training step's peak memory predicted from shapes alone: the step runs on `meta` tensors, counted.

`predict_step_memory` copies the model onto the meta device (no weight is copied or allocated), runs forward,
loss, backward and the optimiser step on meta tensors, and counts every storage the ops create and free with
the same live-tensor tracker that measures CPU steps (`tracker.StorageTracker`). A ViT-B step at 448 px
takes seconds on a laptop.

How the step runs (what is modelled):

- The meta tensors are wrapped by torch's `FakeTensorMode` with device ``cpu``: every op dispatches exactly
  as on a CPU tensor (autocast's CPU op lists, the CPU fused-attention kernel, the model's own code paths)
  but computes nothing. On CPU the prediction therefore equals the measured peak (tests: within 2 %).
- ``target="cuda"`` adds what a GPU does differently, as far as we model it: (1) the caching allocator
  rounds every allocation up to 512 bytes (its smallest block; the allocator's ``max_memory_allocated``
  counts blocks); (2) CUDA autocast runs ``softmax``/``log_softmax`` with an fp32 output and
  ``layer_norm``/``group_norm`` in fp32 (CPU autocast leaves them in the input dtype); (3) torch's Adam/AdamW
  default to the multi-tensor (``foreach``) implementation on CUDA, whose temporaries span all parameters;
  (4) `dcal.layers` tiles the attention weights on CPU only, so tiling is switched off. Not modelled: the
  fused-attention kernels' internal workspaces (a few MB), cuBLAS workspaces, the CUDA context, and
  fragmentation (see `fits_on_gpu` in `dcal_app.memory`). The CUDA accuracy is unverified until
  `benchmarks/gpu_memory.py` has run on a GPU.
- Values a step reads back into Python (``bool(t)``, ``t.item()``) do not exist on meta. A bool made by
  ``any`` reads False and one made by ``all`` reads True (no anomaly: the checks pass); a number reads 1 (Adam divides by 1 − β^step).
  Each such read is listed in the result (``data_reads``); any other bool stops with `MetaUnsupportedError`.
- An op without a meta implementation, or whose output shape depends on values (``nonzero``), raises
  `MetaUnsupportedError` naming the op, the module that ran it and the phase.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .sources import MB
from .tracker import StorageTracker

__all__ = ["predict_step_memory", "measure_step_memory", "MemoryPrediction", "PhasePeak", "MetaUnsupportedError",
           "CATEGORIES", "CUDA_BLOCK_BYTES", "TARGETS"]

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator's smallest block: every allocation is rounded up to it
TARGETS = ("cuda", "cpu")
PHASES = ("forward", "backward", "optimizer")
# What the bytes live at a peak are, in the order a storage is assigned (the first match wins).
CATEGORIES = ("parameters", "inputs", "optimizer_state", "gradients", "attention_maps", "activations", "transient")
_SOFTMAX_OPS = ("_softmax", "_safe_softmax", "softmax")


class MetaUnsupportedError(RuntimeError):
    """An op of the step could not run on meta tensors (no meta kernel, a value-dependent shape or branch)."""


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
    """

    train: dict[str, PhasePeak]
    eval: PhasePeak | None = None
    train_after_eval: dict[str, PhasePeak] | None = None
    target: str = "cuda"
    data_reads: list[str] = field(default_factory=list)

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
    def peak_phase(self) -> str:
        return max(self.train, key=lambda k: self.train[k].peak_bytes)

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


# ============================================================================ counting with categories
class _CategoryTracker(StorageTracker):
    """The live-tensor tracker plus what a peak is made of: a snapshot of the live storages at each phase's
    peak (taken at the first free after a new peak, so it is exact), and sets of (storage, serial) ids for
    the storages that were saved for backward or made by a softmax, to classify the snapshots later."""

    def __init__(self, device_types: tuple[str, ...], round_to: int, modules: _ModuleStack | None = None,
                 stand_ins: bool = True):
        super().__init__(device_types, round_to)
        self.stand_ins = stand_ins
        self.serial: dict[int, int] = {}
        self._count = 0
        self.snapshot: list[tuple[int, int, int]] = []
        self._dirty = False
        self.attention: set[tuple[int, int]] = set()
        self.saved: set[tuple[int, int]] = set()
        self.bool_origin: dict[tuple[int, int], str] = {}
        self.data_reads: list[str] = []
        self.modules = modules
        self.phase = "setup"

    def ident(self, t: Tensor) -> tuple[int, int] | None:
        if t.device.type not in self.device_types or t.layout is not torch.strided:
            return None
        key = t.untyped_storage()._cdata
        return (key, self.serial[key]) if key in self.serial and key in self.live else None

    def on_new(self, key: int, nbytes: int, t: Tensor, func) -> None:
        self._count += 1
        self.serial[key] = self._count
        name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
        if name in _SOFTMAX_OPS and t.dim() >= 3:
            self.attention.add((key, self._count))
        elif name in ("any", "all") and t.dtype is torch.bool:
            self.bool_origin[(key, self._count)] = name

    def add(self, t: Tensor, new: bool = True, func=None) -> None:
        before = self.phase_peak
        super().add(t, new, func)
        if self.phase_peak > before:
            self._dirty = True

    def _freed(self, key: int, ref) -> None:
        if self._dirty:
            self.take_snapshot()
        super()._freed(key, ref)

    def take_snapshot(self) -> None:
        self.snapshot = [(k, self.serial.get(k, 0), n) for k, (n, _) in self.live.items()]
        self._dirty = False

    def begin_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peak = self.current
        self.take_snapshot()

    def end_phase(self) -> tuple[int, list]:
        if self._dirty:
            self.take_snapshot()
        return self.phase_peak, self.snapshot

    def _where(self) -> str:
        module = self.modules.current() if self.modules is not None else None
        return f"in module {module!r}" if module else "outside any module (e.g. in backward or the loss)"

    def _read_scalar(self, t: Tensor):
        """A stand-in for a value the step reads back into Python (see the module docstring)."""
        ident = self.ident(t)
        origin = self.bool_origin.get(ident) if ident is not None else None
        where = f"{self._where()}, {self.phase}"
        if t.dtype is torch.bool:
            if origin is None:
                raise MetaUnsupportedError(
                    f"a Python branch on a tensor value (bool of a {tuple(t.shape)} tensor) {where}: a shapes-only "
                    f"run cannot decide it (only bools made by any() / all() are read, as False / True)")
            value = origin == "all"
        else:
            value = 1.0 if t.dtype.is_floating_point else 1  # 1, not 0: e.g. Adam divides by 1 - beta^step
        self.data_reads.append(f"{'bool of ' + origin + '()' if origin else 'item()'} {where} -> {value}")
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.stand_ins and func is torch.ops.aten._local_scalar_dense.default:
            return self._read_scalar(args[0])
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except MetaUnsupportedError:
            raise
        except Exception as e:
            if _is_meta_failure(e):
                raise MetaUnsupportedError(f"op {func} could not run on meta tensors {self._where()}, phase "
                                           f"{self.phase}: {type(e).__name__}: {e}") from e
            raise


def _is_meta_failure(e: Exception) -> bool:
    """True for the errors that mean "this op cannot run without data", not a bug in the user's step."""
    from torch._subclasses import fake_tensor as ft

    kinds = tuple(k for k in (getattr(ft, "DataDependentOutputException", None),
                              getattr(ft, "DynamicOutputShapeException", None),
                              getattr(ft, "UnsupportedOperatorException", None)) if k is not None)
    return isinstance(e, kinds + (NotImplementedError,)) or "meta" in str(e).lower()


class _ModuleStack:
    """The qualified name of the module whose forward is running (global forward hooks, removed on exit)."""

    def __init__(self, root: nn.Module):
        self.names = {id(m): n or type(root).__name__ for n, m in root.named_modules()}
        self.stack: list[str] = []
        self._handles: list = []

    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def __enter__(self) -> _ModuleStack:
        from torch.nn.modules import module as mod

        def pre(m, args):
            self.stack.append(self.names.get(id(m), type(m).__name__))

        def post(m, args, out):
            if self.stack:
                self.stack.pop()

        self._handles = [mod.register_module_forward_pre_hook(pre),
                         mod.register_module_forward_hook(post, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ============================================================================ CUDA semantics on CPU-dispatched meta tensors
_FP32_OUT = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax}
_FP32_IN = {F.layer_norm, F.group_norm}


class _CudaAutocast(TorchFunctionMode):
    """CUDA autocast's fp32 ops that CPU autocast leaves in low precision (see the module docstring, (2))."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if torch.is_autocast_enabled("cpu") and args and isinstance(args[0], Tensor) and args[0].is_floating_point():
            if func in _FP32_OUT and kwargs.get("dtype") is None and args[0].dtype != torch.float32:
                kwargs["dtype"] = torch.float32  # CUDA's fp32_set_opt_dtype: fp32 output, no input copy
            elif func in _FP32_IN:
                args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
                kwargs = {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v
                          for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _gpu_code_paths() -> Iterator[None]:
    """Code that branches on ``device.type == "cpu"`` takes its GPU branch: `dcal.layers` tiles the attention
    weights only on CPU, so the tiling threshold is lifted while predicting for CUDA (restored after)."""
    layers = sys.modules.get("dcal.layers")
    if layers is None:  # the model is not DCAL's: nothing to switch
        yield
        return
    with layers.untiled_attention():
        yield


# ============================================================================ the step
def default_loss(output: Any) -> Tensor:
    """The loss used when none is given: for a `dcal.DCALOutput`, the sum of the cross-entropies of the
    branches present (what `dcal.UncertaintyLoss` weighs, its three scalars aside); for a (B, C) tensor,
    cross-entropy against random labels; for a tuple, its first element's. Labels are int64 (B,)."""
    logits = [getattr(output, f"{b}_logits") for b in ("sa", "glca", "pwca")] if hasattr(output, "sa_logits") else None
    if logits is None:
        first = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(first, Tensor) or first.dim() != 2:
            raise TypeError(f"predict_step_memory: the default loss needs (B, C) logits or a DCALOutput, got "
                            f"{type(output).__name__}; pass loss_fn")
        logits = [first]
    present = [z for z in logits if z is not None]
    y = torch.randint(0, present[0].shape[1], (present[0].shape[0],), device=present[0].device)
    return sum(F.cross_entropy(z.float(), y) for z in present)


def _default_optimizer(model: nn.Module, loss_fn: Any) -> torch.optim.Optimizer:
    params = list(model.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else [])
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)


def _autocast(amp_dtype: torch.dtype | None, device_type: str):
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device_type, dtype=amp_dtype)


class _Step:
    """forward + loss, backward (× micro-batches), optimiser step and zero_grad(set_to_none=True), with
    phases reported to `tracker` (a `_CategoryTracker` or None); the same code predicts and measures."""

    def __init__(self, model, loss_fn, optimizer, amp_dtype, grad_accum_steps, device_type, tracker):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.amp_dtype, self.accum, self.device_type, self.tracker = amp_dtype, grad_accum_steps, device_type, tracker
        self.peaks: dict[str, tuple[int, list]] = {}
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grad_ids: set = set()  # (storage, serial) of every tensor that was a .grad at a backward's end

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.tracker.begin_phase(name)
        yield
        peak, snap = self.tracker.end_phase()
        if peak >= self.peaks.get(name, (-1, None))[0]:
            self.peaks[name] = (peak, snap)

    def train(self, inputs: tuple, first: bool = False) -> None:
        self.model.train()
        # With accumulation, micro-batch 2 onwards runs its forward with the gradients alive; later ones repeat
        # it. The first step only has to create the optimiser state: one micro-batch (its peaks are lower).
        for _ in range(1 if first else min(self.accum, 2)):
            with self.phase("forward"):
                with _autocast(self.amp_dtype, self.device_type):
                    out = self.model(*inputs)
                loss = self.loss_fn(out)
                del out
            with self.phase("backward"):
                (loss / self.accum if self.accum > 1 else loss).backward()
                del loss
            self.grad_ids |= _idents(self.tracker, [p.grad for p in self.params])
        with self.phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, inputs: tuple) -> None:
        self.model.eval()
        with self.phase("eval"), torch.no_grad(), _autocast(self.amp_dtype, self.device_type):
            out = self.model(*inputs)
            del out


def _classify(snapshot: list, groups: dict[str, set]) -> dict[str, int]:
    comp = dict.fromkeys(CATEGORIES, 0)
    for key, serial, n in snapshot:
        ident = (key, serial)
        cat = next((c for c in CATEGORIES[:-1] if ident in groups.get(c, ())), "transient")
        comp[cat] += n
    return comp


def _idents(tracker: _CategoryTracker, tensors) -> set:
    return {i for i in (tracker.ident(t) for t in tensors if isinstance(t, Tensor)) if i is not None}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> Iterator[Tensor]:
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                yield v


# ============================================================================ public API
def _as_tuple(inputs: Any) -> tuple:
    if isinstance(inputs, (Tensor, torch.Size)):
        return (inputs,)
    if isinstance(inputs, tuple) and inputs and all(isinstance(i, int) for i in inputs):
        return (inputs,)  # one shape
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise TypeError(f"predict_step_memory: inputs must be a tensor, a shape or a tuple of them, got {type(inputs).__name__}")


def _fake_like(x: Any, mode) -> Any:
    """A meta tensor (fake, device cpu) with `x`'s shape and dtype; a shape becomes a float32 tensor."""
    if isinstance(x, Tensor):
        with mode:
            return torch.empty(x.shape, dtype=x.dtype)
    if isinstance(x, (torch.Size, tuple, list)) and all(isinstance(i, int) for i in x):
        with mode:
            return torch.empty(tuple(x), dtype=torch.float32)
    return x  # a non-tensor argument (a flag, None) passes unchanged


def _materialise(x: Any, mode, fake: bool) -> Any:
    """A fresh batch tensor like `x` (a tensor or a shape): meta when predicting, random when measuring."""
    if fake:
        return _fake_like(x, mode)
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, (torch.Size, tuple, list)) and all(isinstance(i, int) for i in x):
        return torch.randn(tuple(x))
    return x


def _meta_copy(module: nn.Module, mode) -> nn.Module:
    """A copy of `module` whose parameters and buffers are meta (fake) tensors: no weight is copied."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(_fake_like(p.detach(), mode), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = _fake_like(b, mode)
    return copy.deepcopy(module, memo)


def _run(model, inputs, eval_inputs, loss_fn, optimizer, amp_dtype, grad_accum_steps, target, fake: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    if fake:
        model = _meta_copy(model, mode)
        if isinstance(loss_fn, nn.Module):
            loss_fn = _meta_copy(loss_fn, mode)
        inputs = tuple(_fake_like(x, mode) for x in inputs)
    loss_fn = loss_fn if loss_fn is not None else default_loss
    modules = _ModuleStack(model)
    tracker = _CategoryTracker(("cpu",), CUDA_BLOCK_BYTES if target == "cuda" else 1, modules, stand_ins=fake)
    cuda = target == "cuda" and fake
    def pack(t: Tensor) -> Tensor:
        tracker.saved.add(tracker.ident(t))
        # detach: an alias of the same storage without the grad_fn. Returning `t` itself would make an op's
        # saved output refer back to its own graph node: a cycle that only gc frees (a leak the step lacks).
        return t.detach()

    saved_hook = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with mode, modules, saved_hook, (_CudaAutocast() if cuda else contextlib.nullcontext()), \
            (_gpu_code_paths() if cuda else contextlib.nullcontext()):
        opt = (optimizer or _default_optimizer)(model, loss_fn)
        if cuda:
            for g in opt.param_groups:  # torch's CUDA default for Adam/AdamW/SGD: the multi-tensor path
                if g.get("foreach", False) is None:
                    g["foreach"] = True
        params = [*model.parameters(), *model.buffers(),
                  *(loss_fn.parameters() if isinstance(loss_fn, nn.Module) else [])]
        tracker.seed(params)
        tracker.seed(x for x in inputs if isinstance(x, Tensor))
        groups = {"parameters": _idents(tracker, params), "inputs": _idents(tracker, inputs)}
        step = _Step(model, loss_fn, opt, amp_dtype, grad_accum_steps, "cpu", tracker)
        with tracker:
            step.train(inputs, first=True)
            step.train(inputs)
            train, step.peaks = step.peaks, {}
            groups["optimizer_state"] = _idents(tracker, _optimizer_tensors(opt))
            if eval_inputs is not None:
                # The evaluation batch exists only while evaluating: made here, freed after.
                batch = tuple(_materialise(x, mode, fake) for x in eval_inputs)
                groups["inputs"] |= _idents(tracker, batch)
                step.evaluate(batch)
                del batch
                evaluated, step.peaks = step.peaks, {}
                gc.collect()
                step.train(inputs)
                after = step.peaks
        groups.update(attention_maps=tracker.attention, activations=tracker.saved - {None}, gradients=step.grad_ids)

    def peaks(d):
        return {k: PhasePeak(p, _classify(s, groups)) for k, (p, s) in d.items()}

    tracker.close()
    return MemoryPrediction(train=peaks(train),
                            eval=None if eval_inputs is None else peaks(evaluated)["eval"],
                            train_after_eval=None if eval_inputs is None else peaks(after),
                            target=target, data_reads=tracker.data_reads)


def predict_step_memory(model: nn.Module, inputs: Any, *, loss_fn: Callable | nn.Module | None = None,
                        optimizer: Callable[[nn.Module, Any], torch.optim.Optimizer] | None = None,
                        amp_dtype: torch.dtype | None = None, grad_accum_steps: int = 1, target: str = "cuda",
                        eval_inputs: Any = None) -> MemoryPrediction:
    """Predict the peak memory of a training step (and optionally an evaluation step) from shapes alone.

    The model is copied onto meta tensors (its own weights are neither copied nor touched), and two
    optimiser steps run under the live-tensor tracker; see the module docstring for what is modelled.

    Args:
        model: any `nn.Module` (real, or built under ``with torch.device("meta")``).
        inputs: the forward's positional arguments: tensors (only shape and dtype are used) or shapes
            (float32), one or a tuple.
        loss_fn: ``loss_fn(output) -> scalar``; an `nn.Module` has its parameters copied to meta too.
            Default `default_loss` (DCALOutput: sum of the branches' cross-entropies; logits: CE).
        optimizer: ``optimizer(model, loss_fn) -> Optimizer`` built on the meta copy; default AdamW.
        amp_dtype: None (fp32), ``torch.float16`` or ``torch.bfloat16``: the forward runs under autocast.
        grad_accum_steps: micro-batches per optimiser step (the second one runs with gradients alive).
        target: ``"cuda"`` (allocator rounding and CUDA-only code paths, module docstring) or ``"cpu"``.
        eval_inputs: when given, also an evaluation step (eval mode, no_grad) on these inputs and the
            first training step after it.

    Returns:
        `MemoryPrediction`: ``peak_bytes``, per-phase `PhasePeak` with the composition by `CATEGORIES`.

    Raises:
        MetaUnsupportedError naming the op, module and phase that cannot run on meta tensors.
    """
    if target not in TARGETS:
        raise ValueError(f"predict_step_memory: target must be one of {TARGETS}, got {target!r}")
    _check_common(model, amp_dtype, grad_accum_steps)
    return _run(model, _as_tuple(inputs), None if eval_inputs is None else _as_tuple(eval_inputs), loss_fn,
                optimizer, amp_dtype, grad_accum_steps, target, fake=True)


def measure_step_memory(model: nn.Module, inputs: Sequence[Tensor] | Tensor, *, loss_fn=None, optimizer=None,
                        amp_dtype: torch.dtype | None = None, grad_accum_steps: int = 1,
                        eval_inputs: Any = None) -> MemoryPrediction:
    """The same steps as `predict_step_memory` run for real on CPU tensors and measured by the tracker:
    the reference the prediction is tested against. Changes `model` (two optimiser steps)."""
    _check_common(model, amp_dtype, grad_accum_steps)
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("measure_step_memory measures CPU tensors: move the model to CPU")
    return _run(model, _as_tuple(inputs), None if eval_inputs is None else _as_tuple(eval_inputs), loss_fn,
                optimizer, amp_dtype, grad_accum_steps, "cpu", fake=False)


def _check_common(model: nn.Module, amp_dtype, grad_accum_steps: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"predict_step_memory: model must be an nn.Module, got {type(model).__name__}")
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
