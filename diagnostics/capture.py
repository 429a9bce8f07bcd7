"""Attention maps from any ViT: `capture_attention` records the softmax weights of attention modules through
forward hooks, on models this project did not build; `vit_rollout` turns them into a rollout.

How the weights are read. timm's `Attention` computes softmax(q·kᵀ·scale) and passes it through ``attn_drop``
only on its eager path. With ``fused_attn=True`` (timm's default wherever torch has SDPA) it calls
`F.scaled_dot_product_attention`, which never forms the weights, so a hook on ``attn_drop`` sees nothing
(vit-explain's failure). During a capture, each captured module with a ``fused_attn`` flag is switched to the
eager path (restored on exit, exceptions included), and the map is the input of its ``attn_drop``: the
model's own softmax, no second copy of its arithmetic. The eager path gives the same outputs as the fused
one (timm tests that parity; `tests/test_attention_viz.py` checks it here), at the memory cost of the
(B, H, N, N) weights while capturing. Recomputing softmax(q·kᵀ) from a hook on ``qkv`` instead would copy
timm's arithmetic and silently go wrong on variants with q/k norms, rotary embeddings or masks.

Hook points, per captured module: an ``nn.Dropout`` module's input (``attn_drop`` itself), an ``nn.Softmax``
module's output, or a module holding one of those as its child ``attn_drop`` (or an ``nn.Softmax`` child).
A module called several times in one forward (the predecessor's attention runs twice per block) gives one map
per call, keyed by call order, counted afresh at each forward of the model.

Built on `timm.utils.AttentionExtract` (``method="hook"``): its hooks (timm's `FeatureHooks`, forward
pre-hooks on the ``attn_drop`` inputs, forward hooks on the ``nn.Softmax`` outputs) collect the maps. What it
cannot serve by itself, and what this module adds around it:

* fused attention: AttentionExtract reads ``attn_drop``, which a fused timm model never calls (it would
  capture nothing); the ``fused_attn`` switch above stays here.
* one map per call: its hooks keep the last map of each module per forward (``get_output`` once, after the
  forward), so a module called twice would lose its first call; a hook placed after timm's on each hook point
  takes the map out right after every call, which also lets a capture span several forwards.
* the checks: the shape and row-sum check runs before timm's hook stores the map, so a malformed map fails
  naming the module and the call, not inside timm's hook.
* clean exit: AttentionExtract puts the model in eval (or train) mode when built and never removes its hooks;
  the mode of every module is restored at once, and its hooks are removed on exit.

Errors (`AttentionCaptureError`) name the module: no hook point; a captured module that recorded nothing
(it ran fused attention, or was not called); a map that is not (B, H, Nq, Nk) or whose rows do not sum to 1.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.utils import AttentionExtract
from torch import Tensor

from dcal.layers import attention_rollout
from dcal.model import DCAL, eval_mode

__all__ = ["capture_attention", "AttentionCapture", "AttentionCaptureError", "vit_rollout", "attention_rollout",
           "HEADS"]

HEADS = ("mean", "all")


def _row_tolerance(dtype: torch.dtype) -> float:
    """How far a row of softmax weights may sum from 1: rounding of N terms in the map's own precision
    (bf16 keeps 8 bits: a few 1e-2), never tighter than 1e-4 (fp32 sums of a few thousand terms)."""
    return max(1e-4, 16 * torch.finfo(dtype).eps)


class AttentionCaptureError(ValueError):
    """A capture that cannot give attention maps: the message names the module and what went wrong."""


def _hook_point(name: str, module: nn.Module) -> tuple[nn.Module, str]:
    """(the module to hook, "input" or "output") for a captured module, or raise naming it."""
    if isinstance(module, nn.Dropout):
        return module, "input"
    if isinstance(module, nn.Softmax):
        return module, "output"
    drop = getattr(module, "attn_drop", None)
    if isinstance(drop, nn.Module):
        return drop, "input"
    soft = next((m for m in module.children() if isinstance(m, nn.Softmax)), None)
    if soft is not None:
        return soft, "output"
    raise AttentionCaptureError(f"{name or '<model>'} ({type(module).__name__}): no attention weights to read: it "
                                "has no attn_drop and no nn.Softmax child (pass modules= naming the module whose "
                                "input is the softmax map, or an nn.Softmax module)")


def _looks_like_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and (
        isinstance(getattr(module, "attn_drop", None), nn.Module)
        or any(isinstance(m, nn.Softmax) for m in module.children()))


class AttentionCapture:
    """Records attention maps while active; a context manager, and a callable that runs one forward.

    Args:
        model: any ``nn.Module`` (a timm ViT with fused attention included).
        modules: which modules to capture: None (every module whose class name ends in ``Attention`` and
            that has an ``attn_drop`` or ``nn.Softmax`` child, e.g. timm's ``blocks.*.attn``), a glob on
            qualified names (``"blocks.*.attn"``), a list of names, or a predicate ``(name, module) -> bool``.
        select: which calls of each module to keep: None (all), an int (that call of each forward, from 0),
            or a predicate ``(name, call) -> bool``.
        heads: ``"mean"``: maps (B, Nq, Nk) averaged over heads, fp32; ``"all"``: (B, H, Nq, Nk).

    Attributes:
        maps: ``{name: [map of each kept call, in call order]}`` (modules in the order they first ran); maps
            of several forwards inside one capture are concatenated along the batch.
    """

    def __init__(self, model: nn.Module, modules: Any = None, select: Any = None, *, heads: str = "mean"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture_attention needs an nn.Module, got {type(model).__name__}")
        if heads not in HEADS:
            raise ValueError(f"capture_attention: heads must be one of {HEADS}, got {heads!r}")
        if not (select is None or isinstance(select, int) or callable(select)):
            raise TypeError(f"capture_attention: select must be None, an int or a predicate, got {type(select).__name__}")
        self.model = model
        self.heads = heads
        self.select = select
        self.targets = self._resolve(modules)
        self.maps: dict[str, list[Tensor]] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []
        self._fused: list[tuple[nn.Module, Any]] = []
        self._extracts: list[AttentionExtract] = []
        self._taken: dict[str, Tensor | None] = {}  # the map the guard checked, per captured module

    # ------------------------------------------------------------------ which modules
    def _resolve(self, modules: Any) -> list[tuple[str, nn.Module]]:
        named = list(self.model.named_modules())
        if modules is None:
            chosen = [(n, m) for n, m in named if _looks_like_attention(m)]
            what = "no module looks like attention (a class name ending in 'Attention' with an attn_drop or " \
                   "nn.Softmax child)"
        elif isinstance(modules, str):
            chosen = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, modules)]
            what = f"no module name matches {modules!r}"
        elif callable(modules):
            chosen = [(n, m) for n, m in named if modules(n, m)]
            what = "the predicate selected no module"
        elif isinstance(modules, Sequence):
            table = dict(named)
            missing = [n for n in modules if n not in table]
            if missing:
                raise AttentionCaptureError(f"capture_attention: no module named {missing} in "
                                            f"{type(self.model).__name__}")
            chosen = [(n, table[n]) for n in modules]
            what = "modules is empty"
        else:
            raise TypeError(f"capture_attention: modules must be None, a glob, a list of names or a predicate, "
                            f"got {type(modules).__name__}")
        if not chosen:
            raise AttentionCaptureError(f"capture_attention on {type(self.model).__name__}: {what}; pass modules=")
        for name, m in chosen:
            _hook_point(name, m)  # raises naming the module
        return chosen

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> AttentionCapture:
        if self._handles:
            raise RuntimeError("capture_attention is already active (it is not re-entrant)")
        self.maps, self._calls, self._taken = {}, {}, {}
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._new_forward))
            table = dict(self.model.named_modules())
            point_name = {id(m): n for n, m in self.model.named_modules()}
            points: dict[str, list[tuple[str, nn.Module]]] = {"input": [], "output": []}
            for name, m in self.targets:
                point, where = _hook_point(name, m)
                owner = m if point is not m else table.get(name.rpartition(".")[0], m)
                if hasattr(owner, "fused_attn"):
                    self._fused.append((owner, owner.fused_attn))
                    owner.fused_attn = False  # the eager path: the softmax weights exist and pass attn_drop
                # The check, before timm's hook stores the map (hooks run in the order they were added).
                if where == "input":
                    self._handles.append(point.register_forward_pre_hook(self._guard(name, where)))
                else:
                    self._handles.append(point.register_forward_hook(self._guard(name, where)))
                points[where].append((name, point))
            for where, items in points.items():
                if items:
                    self._extract(where, [point_name[id(pt)] for _, pt in items])
                for name, point in items:  # after timm's hook: take the map it stored for this call
                    self._handles.append(point.register_forward_hook(self._collector(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        if exc_type is None:
            self.check()
        return False

    def _extract(self, where: str, names: list[str]) -> None:
        """timm's AttentionExtract on the hook points `names`: its hooks collect the maps. It sets the model's
        train/eval mode when built: every module's mode is put back at once."""
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            extract = AttentionExtract(self.model, names=names, method="hook",
                                       hook_type="forward_pre" if where == "input" else "forward",
                                       mode="train" if self.model.training else "eval")
        finally:
            for m, training in modes:
                m.training = training
        if sorted(extract.names) != sorted(names):
            raise AttentionCaptureError(f"capture_attention: timm's AttentionExtract matched {extract.names} for "
                                        f"the hook points {names}")
        self._extracts.append(extract)

    def remove(self) -> None:
        """Remove every hook and restore ``fused_attn`` (idempotent; `__exit__` calls it)."""
        extracts, self._extracts = self._extracts, []
        for extract in extracts:
            for h in extract.hooks._handles:  # timm's FeatureHooks keeps its handles here and has no remove()
                h.remove()
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        fused, self._fused = self._fused, []
        for owner, flag in fused:
            owner.fused_attn = flag

    def check(self) -> None:
        """Raise naming every captured module that recorded no map."""
        empty = [n for n, _ in self.targets if not self.maps.get(n)]
        if not empty:
            return
        hint = (" A dcal.DCAL runs its attention stage by stage (attn.forward never runs): read its rollout from "
                "DCALOutput.rollout." if isinstance(self.model, DCAL) else "")
        raise AttentionCaptureError(f"capture_attention recorded nothing from {empty}: the module was not called, "
                                    "was called without eager attention (F.scaled_dot_product_attention forms no "
                                    f"weights), or select= kept none of its calls.{hint}")

    def __call__(self, *args, **kwargs) -> dict[str, list[Tensor]]:
        """One forward of the model on `args` in eval mode without gradients, under the capture; the maps."""
        with eval_mode(self.model), torch.no_grad(), self:
            self.model(*args, **kwargs)
        return self.maps

    # ------------------------------------------------------------------ hooks
    def _new_forward(self, module, args) -> None:
        self._calls = {}  # call order is counted per forward of the model
        return None

    def _guard(self, name: str, where: str) -> Callable:
        """Counts the calls and checks a kept map, before timm's hook stores it."""
        def guard(module, args, output=None):
            a = args[0] if where == "input" else output
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            self._taken[name] = self._validate(name, call, a) if self._keep(name, call) else None
            return None
        return guard

    def _collector(self, name: str) -> Callable:
        """Takes the map timm's hook stored for this call (its hooks keep one per module) and keeps it."""
        def collect(module, args, output):
            checked = self._taken.pop(name, None)
            stored = {}
            for extract in self._extracts:
                for dev in list(extract.hooks._feature_outputs):  # FeatureHooks keys its maps by device
                    stored.update(extract.hooks.get_output(dev))
            if checked is not None:
                a = next(iter(stored.values()), None)
                if a is not checked:
                    raise AttentionCaptureError(f"{name or '<model>'}: timm's AttentionExtract did not record the map "
                                                "this call passed (its hook did not run)")
                self._store(name, self._calls[name] - 1, self._reduce(a))
            return None
        return collect

    def _keep(self, name: str, call: int) -> bool:
        if self.select is None:
            return True
        if isinstance(self.select, int):
            return call == self.select
        return bool(self.select(name, call))

    def _validate(self, name: str, call: int, a: Any) -> Tensor:
        if not isinstance(a, Tensor) or a.dim() != 4 or not a.is_floating_point():
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise AttentionCaptureError(f"{name or '<model>'} (call {call}): expected softmax weights (B, H, Nq, Nk), "
                                        f"got {shape}")
        with torch.no_grad():
            err = (a.detach().float().sum(dim=-1) - 1.0).abs().max().item()
        if not err <= _row_tolerance(a.dtype):  # also catches NaN
            raise AttentionCaptureError(f"{name or '<model>'} (call {call}): map {tuple(a.shape)} is not softmax weights: its "
                                        f"rows sum to 1 ± {err:.3g} (tolerance {_row_tolerance(a.dtype):.3g} for "
                                        f"{a.dtype})")
        return a

    def _reduce(self, a: Tensor) -> Tensor:
        a = a.detach()
        return a.float().mean(dim=1) if self.heads == "mean" else a  # (B, Nq, Nk) or (B, H, Nq, Nk)

    def _store(self, name: str, call: int, a: Tensor) -> None:
        kept = self.maps.setdefault(name, [])
        slot = sum(1 for c in range(call) if self._keep(name, c))  # index among the kept calls
        if slot < len(kept):
            kept[slot] = torch.cat([kept[slot], a])  # another forward inside the same capture
        else:
            kept.append(a)

    # ------------------------------------------------------------------ rollout
    def rollout(self, residual: float = 0.5) -> Tensor:
        """(B, N): the CLS row of the attention rollout over the captured maps, in forward order
        (`dcal.attention_rollout`, O(L·N²)); needs one square head-mean map per module (``select=`` one call)."""
        if self.heads != "mean":
            raise AttentionCaptureError("rollout needs head-mean maps: capture with heads='mean'")
        self.check()
        several = {n: len(v) for n, v in self.maps.items() if len(v) != 1}
        if several:
            raise AttentionCaptureError(f"rollout needs one map per module; {several} kept several calls: capture "
                                        "with select=<call> (e.g. select=0)")
        names = list(self.maps)
        return attention_rollout([self.maps[n][0] for n in names], names, residual=residual)


def capture_attention(model: nn.Module, modules: Any = None, select: Any = None, *,
                      heads: str = "mean") -> AttentionCapture:
    """Record the attention maps of `model`'s attention modules: ``with capture_attention(vit) as cap:
    vit(x)`` then ``cap.maps`` / ``cap.rollout()``; or ``capture_attention(vit)(x)`` for one eval forward.
    See `AttentionCapture` for the arguments and the module docstring for how fused attention is handled."""
    return AttentionCapture(model, modules, select, heads=heads)


def vit_rollout(model: nn.Module, images: Tensor) -> Tensor:
    """A ``rollout_fn`` for `RolloutCallback` and `rollout_explorer` on a timm-style ViT: the CLS row of the
    rollout of every attention (first call of each), prefix tokens dropped: (B, P) patch scores."""
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(prefix, int):
        raise AttributeError(f"vit_rollout: {type(model).__name__} has no num_prefix_tokens (a timm "
                             "VisionTransformer has); write a rollout_fn for this model")
    cap = capture_attention(model, select=0)
    dev = next(model.parameters()).device
    cap(images.to(dev))
    return cap.rollout()[:, prefix:].float().cpu()  # (B, P)
