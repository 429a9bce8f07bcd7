"""Checks on the records themselves: nothing logged, a cut-off log, non-finite values, memory that grows,
GLCA selecting the same tokens for every image."""
from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

from dcal.metrics_log import AMP_OVERFLOW  # torch-free (diagnostics.nonfinite re-exports it, with torch)

from ..runlog import METRICS_FILE, RunLog
from ..stats import BRANCHES, fit_growth, has_values
from .common import branch_enabled
from .findings import Finding
from .rules import (
    MEM_ERROR_FRACTION,
    MEM_MIN_GROWTH_FRACTION,
    MEM_MIN_GROWTH_MB,
    MEM_MIN_POINTS,
    MEM_SKIP_FRACTION,
    MEM_T_STAT,
    TRUNCATED_STEP_FRACTION,
)

__all__ = ["check_empty", "check_truncated", "check_nonfinite", "check_memory", "check_selection",
           "MEM_SKIP_FRACTION", "MEM_MIN_POINTS", "MEM_T_STAT", "MEM_MIN_GROWTH_MB", "MEM_MIN_GROWTH_FRACTION",
           "MEM_ERROR_FRACTION"]

def check_empty(log: RunLog, C) -> Finding | None:
    if log.steps.empty and log.evals.empty:
        what = METRICS_FILE if log.source is None else f"the {log.source.format} log"
        return Finding("empty-log", "warning", f"{what} holds no step or eval record: nothing to diagnose (the "
                       "run stopped before its first optimiser step?)", {"path": str(log.path)})
    return None


def check_truncated(log: RunLog, C) -> Finding | None:
    """A run folder's cut-off last line (the reader's warnings), or a log that stops before the length it
    states (``planned_epochs``/``planned_steps`` in its settings) with no completion line and no error."""
    if log.warnings:
        return Finding("truncated-log", "warning", "; ".join(log.warnings), {"warnings": log.warnings})
    if log.end is not None:  # it completed, or it crashed (then `crash`/`oom` say how)
        return None
    short = _short_of_plan(log)
    if short is None:
        return None
    what = "epoch" if "planned_epochs" in short else "step"
    return Finding("truncated-log", "warning",
                   f"the log stops at {what} {short['reached']:g} of the {short['planned']:g} it states, with no "
                   "completion line and no error: the run was stopped from outside (killed, out of time or "
                   "memory on the host, a closed notebook) or the log is incomplete; its last records are not how "
                   "the run ended", short)


def _last(log: RunLog, col: str) -> tuple[float, float] | None:
    """(first, last) value of `col` across the step and eval records."""
    values = pd.concat([pd.to_numeric(df[col], errors="coerce") for df in (log.steps, log.evals) if col in df.columns]
                       or [pd.Series(dtype=float)]).dropna()
    return (float(values.min()), float(values.max())) if len(values) else None


def _short_of_plan(log: RunLog) -> dict | None:
    settings = log.source.settings if log.source is not None else {}
    epochs, steps = settings.get("planned_epochs"), settings.get("planned_steps")
    epoch_col = "epoch" if any("epoch" in df.columns for df in (log.steps, log.evals)) else (
        "step" if log.step_unit == "epoch" else None)
    if isinstance(epochs, numbers.Number) and epochs > 0 and epoch_col and (span := _last(log, epoch_col)):
        first, reached = span
        counted_from = 0 if first < 1 else 1  # a log counts epochs from 0 (Lightning) or from 1 (Keras, mmengine)
        if reached < epochs - 1 + counted_from:
            return {"planned_epochs": epochs, "planned": epochs, "reached": reached, "counted_from": counted_from}
    if isinstance(steps, numbers.Number) and steps > 0 and log.step_unit == "step" and (span := _last(log, "step")):
        reached = span[1]
        all_steps = np.unique(np.concatenate([pd.to_numeric(df["step"], errors="coerce").dropna().to_numpy(dtype=float)
                                              for df in (log.steps, log.evals) if "step" in df.columns and len(df)]))
        interval = float(np.median(np.diff(all_steps))) if len(all_steps) > 1 else 0.0
        if steps - reached > max(interval, TRUNCATED_STEP_FRACTION * steps):
            return {"planned_steps": steps, "planned": steps, "reached": reached, "logging_interval": interval}
    return None


def _nonfinite_flag(v) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    if isinstance(v, (numbers.Number, str, list, tuple, dict)):
        return bool(v)
    return True


def _nonfinite_columns(log: RunLog) -> dict:
    """column → {first_step, count, first_value} for each loss/w/grad column with a non-finite value."""
    hits = {}
    for source, df in (("step", log.steps), ("eval", log.evals)):
        if df.empty or "step" not in df.columns:
            continue
        if source == "step" and "skip_reason" in df.columns:  # skipped by the GradScaler by design: not a fault
            df = df[df["skip_reason"] != AMP_OVERFLOW]
        cols = ["loss", "grad_norm"] + [f"{k}_{b}" for b in BRANCHES for k in ("loss", "w")]
        if source == "eval":
            cols = ["loss_sa", "val_loss"]
        for col in cols:
            if col not in df.columns or not pd.api.types.is_numeric_dtype(df[col]):
                continue
            values = df[col].to_numpy(dtype=float)
            # A null is non-finite where a number was expected: in a loss of a branch the config turns on
            # (or, without that, in any column that logged a number at some step).
            branch = col.partition("_")[2] if col.startswith("loss_") else None
            expected = branch_enabled(log.config, branch) if branch in ("glca", "pwca") else None
            if expected is None:
                expected = bool(np.isfinite(values).any()) or col in ("loss", "loss_sa")
            if log.source is not None:
                expected = False  # an imported log leaves out what it did not print (a NaN it wrote is marked)
            bad = np.isinf(values) | (np.isnan(values) & expected)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                name = col if source == "step" else f"eval/{col}"
                step = pd.to_numeric(df["step"], errors="coerce").iloc[i]
                hits[name] = {"first_step": int(step) if np.isfinite(step) else i, "count": int(bad.sum()),
                              "first_value": values[i] if not np.isnan(values[i]) else "null/nan"}
    return hits


def check_nonfinite(log: RunLog, C) -> Finding | None:
    hits = _nonfinite_columns(log)
    flagged = None
    if "nonfinite" in log.steps.columns and "step" in log.steps.columns:
        marks = log.steps["nonfinite"].map(_nonfinite_flag)
        if marks.any():
            i = int(np.flatnonzero(marks.to_numpy())[0])
            flagged = {"first_step": int(log.steps["step"].iloc[i]), "count": int(marks.sum()),
                       "value": log.steps["nonfinite"].iloc[i]}
    if not hits and not flagged:
        return None
    first = min([h["first_step"] for h in hits.values()] + ([flagged["first_step"]] if flagged else []))
    unit = log.step_unit
    parts = [f"{c} = {h['first_value']} at {unit} {h['first_step']} ({h['count']} records)" for c, h in hits.items()]
    if flagged and log.source is None:
        parts.append(f"the trainer marked step {flagged['first_step']} non-finite ({flagged['value']}; "
                     f"{flagged['count']} steps)")
    elif flagged:
        parts.append(f"the log wrote nan for {flagged['value']} at {unit} {flagged['first_step']} "
                     f"({flagged['count']} records)")
    return Finding("nonfinite", "error", f"non-finite values from {unit} {first}: " + "; ".join(parts),
                   {"first_step": first, "columns": hits, "nonfinite_field": flagged})


def check_memory(log: RunLog, C) -> Finding | None:
    """Allocated memory that grows step after step, by `diagnostics.stats.fit_growth` (the statistic the
    `LeakDetector` uses too)."""
    st = log.steps
    if "mem_allocated_mb" not in st.columns or "step" not in st.columns:
        return None
    df = st.loc[np.isfinite(pd.to_numeric(st["mem_allocated_mb"], errors="coerce")), ["step", "mem_allocated_mb"]]
    df = df.iloc[max(2, int(MEM_SKIP_FRACTION * len(df))):]
    if len(df) < MEM_MIN_POINTS:
        return None
    fit = fit_growth(df["step"].to_numpy(dtype=float), df["mem_allocated_mb"].to_numpy(dtype=float))
    if fit is None:
        return None
    base = fit.start if fit.start > 0 else float(df["mem_allocated_mb"].mean())
    if not (fit.slope > 0 and fit.t_stat >= MEM_T_STAT and fit.growth > MEM_MIN_GROWTH_MB
            and fit.growth > MEM_MIN_GROWTH_FRACTION * base):
        return None
    severity = "error" if fit.growth >= MEM_ERROR_FRACTION * base else "warning"
    x0, x1 = int(fit.first_step), int(fit.last_step)
    return Finding("memory-growth", severity,
                   f"allocated memory grows by {fit.slope:.3g} MB per step after warm-up (steps {x0}–{x1}): "
                   f"{fit.start:.0f} → {fit.start + fit.growth:.0f} MB (+{fit.growth:.0f} MB, "
                   f"+{fit.growth / base:.0%}; t = {fit.t_stat:.1f}). Live tensors are kept from step to step (a "
                   "loss stored with its graph, kept attention maps); empty_cache() cannot free them",
                   {"slope_mb_per_step": fit.slope, "start_mb": fit.start, "growth_mb": fit.growth,
                    "growth_fraction": fit.growth / base, "t_stat": fit.t_stat, "first_step": x0, "last_step": x1,
                    "points": fit.n, "rising_fraction": fit.growth_fraction, "mb_per_1000_steps": fit.slope * 1000})


def check_selection(log: RunLog, C) -> Finding | None:
    ev = log.evals
    if not has_values(ev, "selection_jaccard"):
        return None
    from ..selection import STATIC_JACCARD  # torch: only for a run that logged its GLCA selection

    s = ev.loc[np.isfinite(ev["selection_jaccard"])]
    last = s.iloc[-1]
    jac = float(last["selection_jaccard"])
    if jac < STATIC_JACCARD:
        return None
    evidence = {"selection_jaccard": jac, "step": int(last["step"]) if "step" in s else None,
                "evals_static": int((s["selection_jaccard"] >= STATIC_JACCARD).sum()), "evals": len(s)}
    extra = ""
    for col in ("part_hit", "part_hit_chance", "distractor_hit"):
        if col in s.columns and pd.notna(last[col]):
            evidence[col] = float(last[col])
    if "part_hit" in evidence and "part_hit_chance" in evidence:
        extra = f"; part hit-rate {evidence['part_hit']:.3f} against chance {evidence['part_hit_chance']:.3f}"
    return Finding("selection-static", "error",
                   f"GLCA selects the same tokens for every image: selection Jaccard {jac:.3f} ≥ {STATIC_JACCARD:g} "
                   f"at step {evidence['step']}{extra}. A uniform (fallback) rollout makes top-k pick a fixed set",
                   evidence)
