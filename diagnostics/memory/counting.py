"""Counting a step on meta tensors: the live-tensor tracker plus what each phase's peak is made of.

`CategoryTracker` extends `tracker.StorageTracker` with a snapshot of the live storages at each phase's peak,
the sets that classify them (`CATEGORIES`), the stand-in values for data a step reads back into Python, the
allocation trace the device-level estimate replays (`device.replay_allocator`), and errors that name the op,
the module (`ModuleStack`) and the phase.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .tracker import StorageTracker

__all__ = ["CategoryTracker", "ModuleStack", "MetaUnsupportedError", "CATEGORIES", "classify", "idents"]

# What the bytes live at a peak are, in the order a storage is assigned (the first match wins).
CATEGORIES = ("parameters", "inputs", "optimizer_state", "gradients", "attention_maps", "activations", "transient")
_SOFTMAX_OPS = ("_softmax", "_safe_softmax", "softmax")


class MetaUnsupportedError(RuntimeError):
    """An op of the step could not run on meta tensors (no meta kernel, a value-dependent shape or branch, a real
    tensor that needs a gradient)."""


class ModuleStack:
    """The qualified name (``Root.blocks.0.attn``) of the module whose forward is running: global forward
    hooks, removed on exit.

    Not torch's `torch.utils.module_tracker.ModuleTracker`, though it names modules the same way and also
    follows the backward: it registers a multi-grad hook on every module's inputs and outputs and keeps the
    handles until exit, which kept one more block alive in the demo preset's training step (512 B, seen by
    comparing the two), and a tracker must not change what it measures. Errors in backward therefore name
    the phase, not the module.
    """

    def __init__(self, root: nn.Module):
        root_name = type(root).__name__
        self.names = {id(m): f"{root_name}.{n}" if n else root_name for n, m in root.named_modules()}
        self.stack: list[str] = []
        self._handles: list = []

    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def __enter__(self) -> ModuleStack:
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


class CategoryTracker(StorageTracker):
    """The live-tensor tracker plus what a peak is made of: a snapshot of the live storages at each phase's
    peak (taken at the first free after a new peak, so it is exact), and sets of (storage, serial) ids for
    the storages that were saved for backward or made by a softmax, to classify the snapshots later.

    ``trace`` lists every allocation (``+bytes``) and free (``-serial``) in order, keyed by serial number,
    for the caching-allocator replay of `device.replay_allocator`.
    """

    def __init__(self, device_types: tuple[str, ...], round_to: int, modules: ModuleStack | None = None,
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
        self.trace: list[tuple[int, int]] = []  # (serial, bytes) on allocation, (serial, 0) on free
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
        self.trace.append((self._count, nbytes))
        name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
        if name in _SOFTMAX_OPS and t.dim() >= 3:
            self.attention.add((key, self._count))
        elif name in ("any", "all") and t.dtype is torch.bool:
            self.bool_origin[(key, self._count)] = name

    def on_free(self, key: int, nbytes: int) -> None:
        self.trace.append((self.serial[key], 0))

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

    def where(self) -> str:
        module = self.modules.current() if self.modules is not None else None
        return f"in module {module!r}" if module else "outside any module (e.g. in the loss or the optimiser)"

    def _read_scalar(self, t: Tensor):
        """A stand-in for a value the step reads back into Python (see predict's module docstring)."""
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        where = f"{self.where()}, {self.phase}"
        if not isinstance(t, FakeTensor):  # a real tensor the loss or the model holds: its value is known
            with unset_fake_temporarily():
                value = t.item()
            self.data_reads.append(f"item() of a real {tuple(t.shape)} tensor {where} -> {value}")
            return value
        ident = self.ident(t)
        origin = self.bool_origin.get(ident) if ident is not None else None
        if t.dtype is torch.bool:
            if origin is None:
                raise MetaUnsupportedError(
                    f"a Python branch on a tensor value (bool of a {tuple(t.shape)} tensor) {where}: a shapes-only "
                    f"run cannot decide it (only bools made by any() / all() are read, as False / True); make the "
                    f"branch depend on shapes or flags, or measure this step with measure_step_memory")
            value = origin == "all"
        else:
            value = 1.0 if t.dtype.is_floating_point else 1  # 1, not 0: e.g. Adam divides by 1 - beta^step
        self.data_reads.append(f"{'bool of ' + origin + '()' if origin else 'item()'} {where} -> {value}")
        return value

    def _check_real(self, func, args, kwargs) -> bool:
        """True when the op's tensor arguments are all real (none fake). A real tensor that needs a gradient
        cannot join a meta step (its .grad would be fake): it raises."""
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._pytree import tree_leaves

        tensors = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, Tensor)]
        for a in tensors:
            if not isinstance(a, FakeTensor) and a.device.type != "cpu":
                raise MetaUnsupportedError(
                    f"op {func} got a real {tuple(a.shape)} tensor on {a.device} {self.where()}, phase {self.phase}: "
                    f"the step runs on fake tensors of device cpu, so a captured tensor must be on the CPU. Keep "
                    f"it there (y.cpu()), or pass it as targets= (only its shape and dtype are read)")
            if not isinstance(a, FakeTensor) and a.requires_grad:
                raise MetaUnsupportedError(
                    f"op {func} got a real {tuple(a.shape)} tensor that requires grad {self.where()}, phase "
                    f"{self.phase}: it is neither a parameter of the model nor of loss_fn. Register it on the "
                    f"model (nn.Parameter), or pass the module that owns it as loss_fn (an nn.Module)")
        return bool(tensors) and not any(isinstance(a, FakeTensor) for a in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.stand_ins:
            if func is torch.ops.aten._local_scalar_dense.default:
                return self._read_scalar(args[0])
            if self._check_real(func, args, kwargs):
                # Every tensor argument is a real constant (labels): the op runs for real, so values and
                # value-dependent shapes derived from them (y.max(), bincount(y)) are exact; outputs are counted.
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                with unset_fake_temporarily():
                    return self.track_outputs(func, func(*args, **(kwargs or {})))
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except MetaUnsupportedError:
            raise
        except Exception as e:
            if _is_meta_failure(e):
                raise MetaUnsupportedError(f"op {func} could not run on meta tensors {self.where()}, phase "
                                           f"{self.phase}: {type(e).__name__}: {e}. Compute it outside the step, "
                                           f"or measure this step with measure_step_memory") from e
            raise


def _is_meta_failure(e: Exception) -> bool:
    """True for the errors that mean "this op cannot run without data", not a bug in the user's step."""
    from torch._subclasses import fake_tensor as ft

    kinds = tuple(k for k in (getattr(ft, "DataDependentOutputException", None),
                              getattr(ft, "DynamicOutputShapeException", None),
                              getattr(ft, "UnsupportedOperatorException", None)) if k is not None)
    return isinstance(e, kinds + (NotImplementedError,)) or "meta" in str(e).lower()


def classify(snapshot: list, groups: dict[str, set]) -> dict[str, int]:
    """Bytes per `CATEGORIES` entry of a snapshot; a storage goes to the first group that holds its id."""
    comp = dict.fromkeys(CATEGORIES, 0)
    for key, serial, n in snapshot:
        ident = (key, serial)
        cat = next((c for c in CATEGORIES[:-1] if ident in groups.get(c, ())), "transient")
        comp[cat] += n
    return comp


def idents(tracker: CategoryTracker, tensors) -> set:
    return {i for i in (tracker.ident(t) for t in tensors if isinstance(t, Tensor)) if i is not None}
