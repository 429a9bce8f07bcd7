"""What `diagnostics.watch` costs a hand-written loop: a DCAL training step with and without it, side by side.

A and B are two copies of the same step (same weights, same batch) in one process: A plain, B inside one
``watch(model, optimizer, loss_fn=UncertaintyLoss, out_dir=tmp)`` that stays active for all of B's calls, as
it would around a loop. Timed in alternating pairs (`timing.ab_timing`). Two numbers, because the memory
profiler samples steps on CPU: the median per-pair ratio (a typical step: the hooks, the one sync, the
gradient norm, the records) and the ratio of total times over all pairs (everything, the sampled memory
steps included, amortised as they are in a run).
"""
from __future__ import annotations

import tempfile

import torch

from .cases import Case, make_train_step
from .timing import ab_timing, quantiles

__all__ = ["bench_watch", "WATCH_TARGET", "WATCH_MIN_PAIRS"]

# The budget: the whole watch within 3 % of a step.
WATCH_TARGET = 1.03
# The memory profiler needs 3 timed plain steps and one probe before it settles to its 2 % budget: fewer
# pairs than this would time the probe alone and report the start-up, not the run.
WATCH_MIN_PAIRS = 40


def bench_watch(case: Case, pairs: int, device: torch.device, row) -> list[dict]:
    """Rows ``watch/<case>`` (median per-pair ratio) and ``watch-amortised/<case>`` (ratio of total times),
    built with `row` (`benchmarks.run.row`), over at least `WATCH_MIN_PAIRS` pairs."""
    name = f"watch/{case.name}"
    try:
        from diagnostics.watch import watch
    except ImportError as e:
        return [{"name": name, "what": "diagnostics.watch per step", "skipped": True, "note": f"skipped: {e}"}]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    plain = make_train_step(case, device, dcal_branches=True)
    watched = make_train_step(case, device, dcal_branches=True)
    pairs = max(pairs, WATCH_MIN_PAIRS)
    with tempfile.TemporaryDirectory() as tmp, \
            watch(watched.model, watched.optimizer, loss_fn=watched.loss_fn, out_dir=tmp) as w:
        t = ab_timing(plain, watched, repeats=pairs, sync=sync)
        measured = len(w._monitor.measured_steps) if w._monitor is not None else 0
        steps = w.step
    total = sum(t["b_s"]) / sum(t["a_s"])
    what = f"training step in a hand-written loop, with diagnostics.watch vs without, {case.label}"
    note = (f"{steps} watched steps, {measured} with memory measured (sampled on CPU); ratio of total times "
            f"{total:.3f}")
    one = {"median": total, "q1": total, "q3": total, "iqr": 0.0}
    return [
        row(name, what, "plain step", "+ watch", t["a"], t["b"], t["ratio"], pairs=t["pairs"], target=WATCH_TARGET,
            note=note),
        row(f"watch-amortised/{case.name}", what + " (ratio of total times)", "plain steps", "+ watch",
            quantiles(t["a_s"]), quantiles(t["b_s"]), one, pairs=t["pairs"], target=WATCH_TARGET, note=note),
    ]
