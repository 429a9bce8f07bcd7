"""A/B timing: alternate the two callables pair by pair, report medians and interquartile ranges."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["ab_timing", "timing", "quantiles"]


def quantiles(xs: list[float]) -> dict[str, float]:
    """Median and interquartile range of `xs` (inclusive quartiles; one sample gives IQR 0)."""
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "iqr": 0.0}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def ab_timing(fn_a: Callable[[], object], fn_b: Callable[[], object], *, repeats: int, warmup: int = 1,
              budget_s: float | None = None, min_repeats: int = 3,
              sync: Callable[[], None] = lambda: None) -> dict:
    """Time `fn_a` and `fn_b` in `repeats` adjacent pairs, alternating AB / BA to cancel drift.

    Args:
        repeats: number of pairs (fewer if `budget_s` seconds run out first, but at least `min_repeats`).
        warmup: untimed calls of each before the first pair.
        sync: called before and after each timed call (``torch.cuda.synchronize`` on CUDA).

    Returns:
        ``{"a": quantiles of A seconds, "b": ..., "ratio": quantiles of the per-pair B/A ratios,
        "pairs": n, "a_s": [...], "b_s": [...]}``.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    sync()
    a_s: list[float] = []
    b_s: list[float] = []
    start = time.perf_counter()
    for i in range(repeats):
        if i % 2 == 0:
            a_s.append(_timed(fn_a, sync))
            b_s.append(_timed(fn_b, sync))
        else:
            b_s.append(_timed(fn_b, sync))
            a_s.append(_timed(fn_a, sync))
        if budget_s is not None and i + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    ratios = [b / a for a, b in zip(a_s, b_s)]
    return {"a": quantiles(a_s), "b": quantiles(b_s), "ratio": quantiles(ratios), "pairs": len(ratios),
            "a_s": a_s, "b_s": b_s}


def timing(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
           sync: Callable[[], None] = lambda: None) -> dict:
    """Median and IQR of `repeats` timed calls of `fn` alone."""
    for _ in range(warmup):
        fn()
    ts = [_timed(fn, sync) for _ in range(repeats)]
    return {**quantiles(ts), "n": len(ts), "s": ts}
