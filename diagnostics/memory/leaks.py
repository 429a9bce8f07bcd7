"""Leaks: tensors that keep autograd graphs alive (`count_graph_tensors`, `find_graph_holders`) and
memory that grows step after step (`LeakDetector`)."""
from __future__ import annotations

import gc
import math
import os
import sys
from collections import deque
from typing import Any

from torch import Tensor

from ..stats import fit_growth

__all__ = ["LeakDetector", "count_graph_tensors", "find_graph_holders"]


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


class LeakDetector:
    """Flags memory (or graph-holding tensors) that grows step after step once warm-up is over.

    Feed it every step (or every N steps) with `update`; `report` fits a least-squares slope (`diagnostics.stats.fit_growth`)
    over the last `window` updates of each series and flags a series whose slope is at least its threshold and that grew
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
        """Slope, t statistic, growth fraction and range of each series with at least 3 points after warm-up.

        The fit is `diagnostics.stats.fit_growth`, the one growth statistic the doctor uses too; a series
        is flagged when its slope reaches its threshold and it rose in `min_growth_fraction` of intervals.
        """
        out = {}
        for key, pts in self.series.items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            fit = fit_growth(xs, ys) if len(pts) >= 3 else None
            if fit is None:  # fewer than 3 points, or all at one step: no slope is defined
                continue
            out[key] = {
                "slope": fit.slope, "unit": self.UNITS[key], "t_stat": fit.t_stat, "growth": fit.growth,
                "growth_fraction": fit.growth_fraction, "n": fit.n, "steps": (xs[0], xs[-1]),
                "first": ys[0], "last": ys[-1],
                "flagged": fit.slope >= self.thresholds[key] and fit.growth_fraction >= self.min_growth_fraction,
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
