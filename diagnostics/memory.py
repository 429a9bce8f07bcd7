"""Memory per step and per phase, leaks, and what attention maps cost: GPU first, an honest CPU fallback.

Sources, named in every report dict (``source``):

- ``"cuda"``: the caching allocator's counters (`torch.cuda.memory_allocated`, ``max_memory_allocated``
  with the peak reset per step and per phase, ``memory_reserved``).
- ``"cpu-dispatch"``: CPU tensor memory, counted exactly: a `TorchDispatchMode` sees every op's outputs
  (backward included), counts each new storage once, and a weak reference on the storage subtracts it the
  moment it is freed. Live bytes = storages alive at the start (a gc scan, or the model/optimiser given)
  plus those allocated since. Costs ~10 µs per op, so a trainer callback samples steps (`MemoryCallback`).
- ``"rss"``: the process resident set, sampled at step and phase boundaries. Not tensor memory: a last
  resort, labelled as such.

`torch.cuda.max_memory_allocated()` returns 0 on a machine without a GPU instead of failing; nothing here
calls it unless the source is ``"cuda"``. MB are 10^6 bytes.
"""
from __future__ import annotations

import functools
import gc
import math
import os
import statistics
import sys
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from dcal.callbacks import Callback

__all__ = [
    "MemoryProfiler", "MemoryCallback", "LeakDetector", "attention_memory",
    "count_graph_tensors", "find_graph_holders", "record_history", "oom_snapshot", "SOURCES",
]

MB = 1e6
SOURCES = ("cuda", "cpu-dispatch", "rss")


def _mb(n: float | None) -> float | None:
    return None if n is None else round(n / MB, 3)


# ============================================================================ CPU: live-storage tracker
def _dispatch_mode_class():
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:  # very old torch: no exact CPU source, "auto" falls back to "rss"
        return None
    return TorchDispatchMode


@functools.cache
def _aliased_returns(func) -> tuple[bool, ...]:
    """Per return of an op: True when it aliases an input (a view, an in-place or out= result)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return ()
    return tuple(r.alias_info is not None for r in schema.returns)


def _make_tracker_class():
    base = _dispatch_mode_class()
    if base is None:
        return None

    class _StorageTracker(base):
        """Counts the bytes of live CPU storages: those seeded plus those created while the mode is on."""

        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[int, weakref.ref]] = {}
            self.current = 0
            self.peak = 0
            self.phase_peak = 0

        def _freed(self, key: int, ref: weakref.ref) -> None:
            entry = self.live.get(key)
            if entry is not None and entry[1] is ref:
                del self.live[key]
                self.current -= entry[0]

        def add(self, t: Tensor, new: bool = True) -> None:
            if not t.is_cpu or t.layout is not torch.strided:
                return
            s = t.untyped_storage()
            key = s._cdata
            n = s.nbytes()
            entry = self.live.get(key)
            if entry is not None:
                if entry[0] == n:
                    return
                self.live[key] = (n, entry[1])  # resized in place (out= / resize_)
                self.current += n - entry[0]
            elif not new or n == 0:
                return
            else:
                self.live[key] = (n, weakref.ref(s, functools.partial(self._freed, key)))
                self.current += n
            if self.current > self.peak:
                self.peak = self.current
            if self.current > self.phase_peak:
                self.phase_peak = self.current

        def seed(self, tensors: Iterable[Tensor]) -> None:
            for t in tensors:
                self.add(t)

        def close(self) -> None:
            self.live.clear()  # the weak references die with it: no callback fires afterwards

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            aliased = _aliased_returns(func)
            if isinstance(out, Tensor):
                self.add(out, not (aliased and aliased[0]))
            elif isinstance(out, (tuple, list)):
                for i, o in enumerate(out):
                    if isinstance(o, Tensor):
                        self.add(o, not (i < len(aliased) and aliased[i]))
            return out

    return _StorageTracker


_StorageTracker = _make_tracker_class()


def _gc_tensors() -> Iterator[Tensor]:
    """Every plain tensor (and parameter, with its .grad) visible to Python's gc."""
    # type() rather than isinstance(): isinstance reads o.__class__, which some module proxies answer
    # with a deprecation warning.
    for o in gc.get_objects():
        cls = type(o)
        if cls is Tensor:
            yield o
        elif issubclass(cls, nn.Parameter):
            yield o
            if o.grad is not None:
                yield o.grad


def _root_tensors(roots: Any) -> Iterator[Tensor]:
    """Tensors held by modules (parameters, their grads, buffers), optimisers (state) or given directly."""
    if roots is None:
        return
    if isinstance(roots, Tensor):
        yield roots
    elif isinstance(roots, nn.Module):
        for p in roots.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from roots.buffers()
    elif isinstance(roots, torch.optim.Optimizer):
        for state in roots.state.values():
            for v in state.values():
                if isinstance(v, Tensor):
                    yield v
    elif isinstance(roots, Mapping):
        for v in roots.values():
            yield from _root_tensors(v)
    elif isinstance(roots, Iterable) and not isinstance(roots, (str, bytes)):
        for r in roots:
            yield from _root_tensors(r)
    else:
        raise TypeError(f"memory baseline: cannot find tensors in a {type(roots).__name__}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ============================================================================ profiler
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
        self.source = self._resolve(source)
        self.baseline = baseline
        self.history: list[dict] = []
        self._tracker = None
        self._tracking = False
        self._in_step = False
        self._phase: str | None = None
        self._phase_peaks: dict[str, int] = {}
        self._step_peak = 0
        self._seeded = False

    def _resolve(self, source: str) -> str:
        dev = self.device.type
        if source == "auto":
            if dev == "cuda":
                source = "cuda"
            elif dev == "cpu":
                source = "cpu-dispatch" if _StorageTracker is not None else "rss"
            else:
                raise ValueError(f"MemoryProfiler: no memory source for device {self.device} (use source='rss')")
        if source not in SOURCES:
            raise ValueError(f"MemoryProfiler source must be 'auto' or one of {SOURCES}, got {source!r}")
        if source == "cuda" and (dev != "cuda" or not torch.cuda.is_available()):
            raise RuntimeError(f"MemoryProfiler source='cuda' needs a CUDA device (device={self.device}, "
                               f"cuda available: {torch.cuda.is_available()})")
        if source == "cpu-dispatch" and (dev != "cpu" or _StorageTracker is None):
            raise RuntimeError(f"MemoryProfiler source='cpu-dispatch' counts CPU tensors only (device={self.device})")
        if source == "rss" and not os.path.exists("/proc/self/statm"):
            raise RuntimeError("MemoryProfiler source='rss' reads /proc/self/statm, which this system lacks")
        return source

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
        return torch.cuda.max_memory_allocated(self.device)

    def _cuda_reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

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
                self._tracker = _StorageTracker()
            if not self._seeded:
                if isinstance(self.baseline, str):
                    if self.baseline != "gc":
                        raise ValueError(f"MemoryProfiler baseline must be 'gc', None or tensors, got {self.baseline!r}")
                    self._tracker.seed(_gc_tensors())
                    self._seeded = True
                elif self.baseline is None:
                    self._seeded = True
            if not self._seeded:  # modules / optimisers: re-read each step (new grads, new optimiser state)
                self._tracker.seed(_root_tensors(self.baseline))
            self._tracker.peak = self._tracker.current
            self._start_mode()
        else:
            self._step_peak = _rss_bytes()

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
            self._phase_rss = _rss_bytes()
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
            peak = max(self._phase_rss, _rss_bytes())
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
            allocated = _rss_bytes()
            peak = max(self._step_peak, allocated)
        rec = {
            "mem_allocated_mb": _mb(allocated),
            "mem_reserved_mb": _mb(reserved),
            "mem_peak_mb": _mb(peak),
            "phase_peaks": {k: _mb(v) for k, v in self._phase_peaks.items()},
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


# ============================================================================ CUDA snapshots
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


# ============================================================================ leaks
def count_graph_tensors() -> int:
    """Live tensors that hold an autograd graph (``grad_fn is not None``), by a gc scan (~0.1 s)."""
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Tensor) and o.grad_fn is not None)


def _name_container(obj: Any, frames: list, ignore: set[int]) -> str:
    """Where `obj` is bound: a variable in a frame, a module global, an attribute, a dict key."""
    for f in frames:
        for k, v in f.f_locals.items():
            if v is obj:
                return f"{k} (local variable in {f.f_code.co_name}, {os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"
        for k, v in f.f_globals.items():
            if v is obj:
                return f"{f.f_globals.get('__name__', '?')}.{k} (global)"
    for r in gc.get_referrers(obj):
        if id(r) in ignore or r is frames:
            continue
        if isinstance(r, dict):
            key = next((k for k, v in r.items() if v is obj), None)
            if key is None:
                continue
            if "__name__" in r and "__builtins__" in r:
                return f"{r['__name__']}.{key} (global)"
            owner = next((o for o in gc.get_referrers(r) if getattr(o, "__dict__", None) is r), None)
            return f"{type(owner).__name__}.{key} (attribute)" if owner is not None else f"dict[{key!r}]"
        d = getattr(r, "__dict__", None)
        if isinstance(d, dict):
            key = next((k for k, v in d.items() if v is obj), None)
            if key is not None:
                return f"{type(r).__name__}.{key} (attribute)"
    return "(no name found)"


def find_graph_holders(max_tensors: int = 16) -> list[dict]:
    """Which containers keep graph-holding tensors alive: the classic is ``losses.append(loss)``.

    Samples up to `max_tensors` live tensors with a ``grad_fn``, finds the lists / dicts / sets / objects
    that refer to them, and names each by a variable in the caller's frames, a module global or an
    attribute. Returns ``[{type, len, graph_tensors, name}]``, most graph tensors first. Costs a few gc
    scans (~0.1 s each): call it when a leak is suspected, not every step.
    """
    objs = gc.get_objects()
    graph = [o for o in objs if issubclass(type(o), Tensor) and o.grad_fn is not None]
    del objs
    if not graph:
        return []
    stride = max(1, len(graph) // max_tensors)
    sample = graph[::stride][:max_tensors]
    frames = []
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename != __file__:
            frames.append(f)
        f = f.f_back
    ignore = {id(graph), id(sample), id(frames), id(sys._getframe())}
    holders: dict[int, Any] = {}
    for r in gc.get_referrers(*sample):
        if id(r) in ignore or isinstance(r, (Tensor, type(sys._getframe()))):
            continue
        if isinstance(r, (list, dict, set, deque)) or isinstance(getattr(r, "__dict__", None), dict):
            holders[id(r)] = r
    out = []
    for r in holders.values():
        items = r.values() if isinstance(r, dict) else (r if isinstance(r, (list, set, deque)) else vars(r).values())
        n_graph = sum(1 for v in items if isinstance(v, Tensor) and v.grad_fn is not None)
        out.append({
            "type": type(r).__name__,
            "len": len(r) if isinstance(r, (list, dict, set, deque)) else None,
            "graph_tensors": n_graph,
            "name": _name_container(r, frames, ignore | {id(holders)}),
        })
    del graph, sample, holders, frames
    out.sort(key=lambda h: -h["graph_tensors"])
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


class LeakDetector:
    """Flags memory (or graph-holding tensors) that grows step after step once warm-up is over.

    Feed it every step (or every N steps) with `update`; `report` fits a least-squares slope over the last
    `window` updates of each series and flags a series whose slope is at least its threshold and that grew
    in at least `min_growth_fraction` of the intervals (a leak grows steadily; a clean loop is flat).

    Args:
        warmup: updates ignored at the start (optimiser state, caches and the first graphs are allocated then).
        window: the number of most recent updates fitted.
        min_mb_per_step, min_tensors_per_step: slope thresholds for ``mem_mb`` and ``graph_tensors``.
        min_growth_fraction: fraction of intervals that must grow.
    """

    UNITS = {"mem_mb": "MB/step", "graph_tensors": "tensors/step"}

    def __init__(self, warmup: int = 3, window: int = 50, *, min_mb_per_step: float = 0.01,
                 min_tensors_per_step: float = 0.5, min_growth_fraction: float = 0.8):
        if warmup < 0 or window < 3:
            raise ValueError(f"LeakDetector needs warmup >= 0 and window >= 3, got warmup={warmup}, window={window}")
        self.warmup = warmup
        self.window = window
        self.thresholds = {"mem_mb": min_mb_per_step, "graph_tensors": min_tensors_per_step}
        self.min_growth_fraction = min_growth_fraction
        self.series: dict[str, deque] = {k: deque(maxlen=window) for k in self.UNITS}
        self._seen = 0

    def update(self, step: int, mem_mb: float | None = None, graph_tensors: int | None = None) -> None:
        """Add one observation; `graph_tensors` is e.g. `count_graph_tensors()` (sample it every N steps)."""
        if mem_mb is None and graph_tensors is None:
            raise ValueError("LeakDetector.update needs mem_mb and/or graph_tensors")
        self._seen += 1
        if self._seen <= self.warmup:
            return
        for key, v in (("mem_mb", mem_mb), ("graph_tensors", graph_tensors)):
            if v is not None:
                if not math.isfinite(v):
                    raise ValueError(f"LeakDetector.update: {key}={v} at step {step} is not finite")
                self.series[key].append((step, float(v)))

    def fits(self) -> dict[str, dict]:
        """Slope, growth fraction and range of each series with at least 3 points after warm-up."""
        out = {}
        for key, pts in self.series.items():
            if len(pts) < 3:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            grew = sum(b > a for a, b in zip(ys, ys[1:])) / (len(ys) - 1)
            slope = _slope(xs, ys)
            out[key] = {
                "slope": slope, "unit": self.UNITS[key], "growth_fraction": grew, "n": len(pts),
                "steps": (xs[0], xs[-1]), "first": ys[0], "last": ys[-1],
                "flagged": slope >= self.thresholds[key] and grew >= self.min_growth_fraction,
            }
        return out

    def report(self, holders: bool = True) -> dict | None:
        """None when nothing grows; else ``{flagged: [series], series: fits(), holders: [...]}``.

        `holders` runs `find_graph_holders` when the graph-tensor count grows (a few gc scans)."""
        fits = self.fits()
        flagged = [k for k, v in fits.items() if v["flagged"]]
        if not flagged:
            return None
        rep = {"flagged": flagged, "series": fits, "holders": []}
        if holders and "graph_tensors" in flagged:
            rep["holders"] = find_graph_holders()
        return rep


# ============================================================================ attention memory estimate
_DIM_KEYS = ("num_heads", "depth", "patch_size", "num_prefix_tokens")


@functools.lru_cache(maxsize=32)
def _timm_dims(name: str) -> dict:
    """Dims of a timm ViT, read from an instance built on the meta device (no weights allocated)."""
    import timm
    if not timm.is_model(name):
        raise ValueError(f"attention_memory: unknown timm model {name!r}; pass the dims explicitly")
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    blocks = getattr(net, "blocks", None)
    if blocks is None or not hasattr(net, "patch_embed"):
        raise ValueError(f"attention_memory: {name!r} is not a timm VisionTransformer; pass the dims explicitly")
    return {"num_heads": blocks[0].attn.num_heads, "depth": len(blocks),
            "patch_size": tuple(net.patch_embed.patch_size)[0], "num_prefix_tokens": net.num_prefix_tokens,
            "embed_dim": net.embed_dim}


def attention_memory(backbone: str | Mapping[str, int], img_size: int, batch_size: int, *, dtype_bytes: int = 4,
                     glca_ratio: float = 0.1, num_heads: int | None = None, depth: int | None = None,
                     patch_size: int | None = None, num_prefix_tokens: int | None = None):
    """Bytes of the attention maps a DCAL training step keeps, per component, as a pandas DataFrame.

    Counts the B·H·Nq·Nk score maps that *eager* attention (softmax, then ``attn @ v``) keeps for backward,
    N = patches + prefix tokens: SA (L layers, N×N), GLCA (1 layer, (1+k)×N), PWCA (L layers, N×2N), plus
    the fp32 head-mean maps kept until the rollout (L × B·N·N). The seed system's design adds a second SA
    pass for image 2 (L × B·H·N·N) and forms the rollout as full (B, N, N) matrix products (a running
    product and a fused map per layer live at once, L·B·N³ multiply-adds). `dcal.layers` uses fused SDPA
    for the differentiable path, which keeps no score map at all; the table is what eager attention costs.

    Args:
        backbone: a timm model name (dims read from a meta-device instance) or a dict with ``num_heads``,
            ``depth``, ``patch_size`` (and optionally ``num_prefix_tokens``, default 1).
        img_size: square input side in pixels.
        dtype_bytes: bytes per score element (4 fp32, 2 fp16/bf16); the rollout maps are fp32 regardless.
        glca_ratio: R, k = max(1, floor(R·P)) local queries.
        num_heads, depth, patch_size, num_prefix_tokens: override the backbone's.

    Returns:
        DataFrame indexed by component with columns ``layers``, ``map`` (shape), ``mb``, ``dcal`` and
        ``seed`` (whether the design has it), then rows ``total_dcal`` and ``total_seed``;
        ``df.attrs`` holds the resolved dims (N, P, k, H, L, B).
    """
    import pandas as pd

    dims = dict(_timm_dims(backbone)) if isinstance(backbone, str) else dict(backbone)
    for key, v in (("num_heads", num_heads), ("depth", depth), ("patch_size", patch_size),
                   ("num_prefix_tokens", num_prefix_tokens)):
        if v is not None:
            dims[key] = v
    dims.setdefault("num_prefix_tokens", 1)
    missing = [k for k in _DIM_KEYS if dims.get(k) is None]
    if missing:
        raise ValueError(f"attention_memory: missing dims {missing} for backbone {backbone!r}")
    H, L, p, prefix = int(dims["num_heads"]), int(dims["depth"]), int(dims["patch_size"]), int(dims["num_prefix_tokens"])
    if img_size % p:
        raise ValueError(f"attention_memory: img_size {img_size} is not divisible by patch_size {p}")
    B = int(batch_size)
    P = (img_size // p) ** 2
    N = P + prefix
    k = max(1, math.floor(glca_ratio * P))
    rows = [
        # component, layers, map, elements per layer, bytes per element, dcal, seed
        ("sa", L, "B·H·N·N", B * H * N * N, dtype_bytes, True, True),
        ("glca", 1, "B·H·(1+k)·N", B * H * (1 + k) * N, dtype_bytes, True, True),
        ("pwca", L, "B·H·N·2N", B * H * N * 2 * N, dtype_bytes, True, True),
        ("rollout_maps", L, "B·N·N fp32", B * N * N, 4, True, False),
        ("seed_sa_image2", L, "B·H·N·N", B * H * N * N, dtype_bytes, False, True),
        ("seed_rollout_products", 2, "B·N·N fp32 (L·B·N³ MACs)", B * N * N, 4, False, True),
    ]
    df = pd.DataFrame(
        [{"component": c, "layers": n, "map": m, "mb": n * e * b / MB, "dcal": d, "seed": s}
         for c, n, m, e, b, d, s in rows]).set_index("component")
    totals = pd.DataFrame([
        {"component": "total_dcal", "layers": None, "map": "", "mb": df.loc[df.dcal, "mb"].sum(), "dcal": True, "seed": False},
        {"component": "total_seed", "layers": None, "map": "", "mb": df.loc[df.seed, "mb"].sum(), "dcal": False, "seed": True},
    ]).set_index("component")
    out = pd.concat([df, totals])
    out.attrs.update({"N": N, "P": P, "k": k, "H": H, "L": L, "B": B, "patch_size": p, "dtype_bytes": dtype_bytes})
    return out


# ============================================================================ trainer callback
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
