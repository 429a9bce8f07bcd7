"""A/B timing: alternate the two callables pair by pair, report medians and interquartile ranges.

`clock` is what a call is timed with: `time.perf_counter` (wall, the default; needed on CUDA, whose work
is not CPU time) or `time.process_time` (this process's CPU time: on a CPU shared with other jobs it leaves
out the time the scheduler gives to them, which wall time counts and which varies from call to call).

Warm-up: besides a fixed number of untimed calls, `ab_timing(..., steady=N)` keeps calling A and B (at most N
more pairs) until neither call faults in `STEADY_FAULTS` or more new pages (Unix: `getrusage` minor faults).
Until the heap has grown to what a step needs, a call pays for faulting in its memory: measured, a DCAL
training step at deit-tiny 224 px b8 faulted in 115k, 32k and 22k pages in its first three calls (1.6 s and
1.4 s against 1.2 s once steady; the SA step: 77k, then none), which put 2.5-2.7 on those pairs' ratio
against 2.1-2.2 steady. A run trains for thousands of steps, so the rows compare steady steps.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

try:
    import resource
except ImportError:  # Windows: no page-fault counts, the fixed warm-up only
    resource = None

__all__ = ["ab_timing", "timing", "quantiles", "page_faults", "STEADY_FAULTS"]

STEADY_FAULTS = 1000  # minor page faults (4 MiB of 4 KiB pages) below which a call counts as steady


def page_faults() -> int | None:
    """Minor page faults of this process so far (None where `resource` is missing)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faults_of(fn: Callable[[], object]) -> int | None:
    before = page_faults()
    fn()
    return None if before is None else page_faults() - before


def quantiles(xs: list[float]) -> dict[str, float]:
    """Median and interquartile range of `xs` (inclusive quartiles; one sample gives IQR 0)."""
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "iqr": 0.0}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


def _timed(fn: Callable[[], object], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    t = clock()
    fn()
    sync()
    return clock() - t


def ab_timing(fn_a: Callable[[], object], fn_b: Callable[[], object], *, repeats: int, warmup: int = 1,
              steady: int = 0, budget_s: float | None = None, min_repeats: int = 3,
              sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time `fn_a` and `fn_b` in `repeats` adjacent pairs, alternating AB / BA to cancel drift.

    Args:
        repeats: number of pairs (fewer if `budget_s` seconds run out first, but at least `min_repeats`).
        warmup: untimed calls of each before the first pair.
        steady: then up to this many more untimed pairs, until neither call faults in `STEADY_FAULTS` or
            more pages (see the module docstring; no effect without `resource`).
        sync: called before and after each timed call (``torch.cuda.synchronize`` on CUDA).
        clock: what each call is timed with (see the module docstring); the budget is always wall time.

    Returns:
        ``{"a": quantiles of A seconds, "b": ..., "ratio": quantiles of the per-pair B/A ratios,
        "pairs": n, "a_s": [...], "b_s": [...], "warmup_faults": [(A, B) page faults of each warm-up pair]}``.
    """
    faults = [(_faults_of(fn_a), _faults_of(fn_b)) for _ in range(warmup)]
    for _ in range(steady if resource is not None else 0):
        if faults and max(faults[-1]) < STEADY_FAULTS:
            break
        faults.append((_faults_of(fn_a), _faults_of(fn_b)))
    sync()
    a_s: list[float] = []
    b_s: list[float] = []
    start = time.perf_counter()
    for i in range(repeats):
        if i % 2 == 0:
            a_s.append(_timed(fn_a, sync, clock))
            b_s.append(_timed(fn_b, sync, clock))
        else:
            b_s.append(_timed(fn_b, sync, clock))
            a_s.append(_timed(fn_a, sync, clock))
        if budget_s is not None and i + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    ratios = [b / a for a, b in zip(a_s, b_s)]
    return {"a": quantiles(a_s), "b": quantiles(b_s), "ratio": quantiles(ratios), "pairs": len(ratios),
            "a_s": a_s, "b_s": b_s, "warmup_faults": faults}


def timing(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
           sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median and IQR of `repeats` timed calls of `fn` alone."""
    for _ in range(warmup):
        fn()
    ts = [_timed(fn, sync, clock) for _ in range(repeats)]
    return {**quantiles(ts), "n": len(ts), "s": ts}
