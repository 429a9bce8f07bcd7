"""The run doctor: reads a run folder and says what went wrong, with the numbers.

`diagnose(run_dir)` returns a list of `Finding`s. It needs only metrics.jsonl; config.yaml, when present,
adds the checks that need it (the LR rule, the optimiser, the clamp bounds, the warm-up length). Each check
is a small function of a `RunLog` that returns a `Finding` or None; the thresholds are module constants,
each with the reason for its value.

`main(argv)` is the ``dcal doctor RUN_DIR [--json] [--html FILE]`` command: exit status 1 when a finding is
an error, 0 otherwise, 2 when the run folder cannot be read.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dcal.schedule import global_batch_size, lr_for_rule

from .curves import (
    BRANCHES,
    CHANCE_LOSS_FRACTION,
    CHANCE_W_TOLERANCE,
    plot_curves,
    plot_lr_schedule,
    plot_uncertainty,
    uncertainty_reading,
    uncertainty_state,
)
from .runlog import METRICS_FILE, RunLog, RunLogError, config_get, load_run

__all__ = ["Finding", "SEVERITIES", "CODES", "diagnose", "diagnose_log", "summarize", "format_text",
           "format_summary", "to_json", "write_html", "main"]

SEVERITIES = ("error", "warning", "info")
CODES = ("nonfinite", "chance-level", "uncertainty-at-chance", "uncertainty-clamped", "accuracy-collapse",
         "memory-growth", "selection-static", "lr-rule", "coupled-weight-decay", "truncated-log", "empty-log")

# --- thresholds, each with its reason

# The late window for "is it still at chance?": the last third of the run, or after the LR warm-up if that
# ends later. Early steps are at chance by construction.
LATE_FRACTION = 2 / 3
# Accuracy at or under 1.5/C is chance: a small eval set puts a uniform guess anywhere in about 0.5–1.5/C.
CHANCE_ACC_FACTOR = 1.5
# Accuracy below half of its best, to the end of the run, is a collapse (the seed's 15.38 % → 1.17 %) rather
# than noise, which moves accuracy by a few points.
COLLAPSE_FRACTION = 0.5
# A w_i held at a clamp bound (within this) for at least max(5 steps, 5 % of the run) is pinned.
BOUND_ATOL = 1e-6
PINNED_MIN_STEPS, PINNED_MIN_FRACTION = 5, 0.05
# Without the config: w exactly constant at a round value (a multiple of ½ other than the init 0) for at
# least max(20 steps, 10 % of the run) — no optimiser leaves a parameter exactly still that long.
FROZEN_MIN_STEPS, FROZEN_MIN_FRACTION = 20, 0.10
# Memory: fit mem_allocated_mb after the first 10 % of steps (allocator and cache warm-up); growth counts
# when the slope is > 5 standard errors above 0 and the fitted growth is > 5 MB and > 10 % of the start.
# Growth of half the starting memory or more is an error: a tensor kept alive per step grows without bound.
MEM_SKIP_FRACTION, MEM_MIN_POINTS, MEM_T_STAT = 0.10, 10, 5.0
MEM_MIN_GROWTH_MB, MEM_MIN_GROWTH_FRACTION, MEM_ERROR_FRACTION = 5.0, 0.10, 0.5
# Jaccard overlap of the selected token sets across images: ≥ 0.9 means the same tokens for every image
# (a uniform rollout makes top-k pick a fixed set); natural images give far lower overlap.
STATIC_JACCARD = 0.9
# The reference LR is DeiT's 5e-4·global_batch/512; the paper's other reading (per-GPU batch on 4 GPUs)
# is 4× that, so only a ratio beyond 4 (either way) is a different rule rather than a different reading.
LR_RULE_RATIO = 4.0


@dataclass
class Finding:
    """One thing the doctor found: a public `code`, a `severity`, a message with the numbers, and the
    numbers themselves in `evidence` (JSON-serialisable)."""

    code: str
    severity: str
    message: str
    evidence: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding severity must be one of {SEVERITIES}, got {self.severity!r}")
        self.evidence = _jsonable(self.evidence)

    def to_dict(self) -> dict:
        return asdict(self)


def _jsonable(x):
    """Evidence → plain JSON: numpy scalars to Python, non-finite floats to the strings "nan"/"inf"."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray, pd.Series)):
        return [_jsonable(v) for v in list(x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        x = float(x)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if x is None or isinstance(x, str):
        return x
    return str(x)


# --- helpers over a RunLog

_LABEL = {"sa": "SA", "glca": "GLCA", "pwca": "PWCA", "fused": "fused"}


def _finite(s: pd.Series) -> pd.Series:
    if not pd.api.types.is_numeric_dtype(s):
        s = pd.to_numeric(s, errors="coerce")
    return s[np.isfinite(s)]


def _has_values(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and len(_finite(df[col])) > 0


def _branch_enabled(config: dict | None, branch: str) -> bool | None:
    """config model.<branch> read as on/off: a bool, a dict's ``enabled``, a count of blocks; None if absent."""
    value = config_get(config, "model", branch)
    if isinstance(value, dict):
        return bool(value.get("enabled", True))
    if isinstance(value, (bool, numbers.Number)):
        return bool(value)
    return None


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else None


def _late_start(log: RunLog) -> float | None:
    """First step of the late window: the last third of the run, or the end of warm-up if later; None when
    there are no records or the run ended within its warm-up."""
    frames = [df["step"] for df in (log.steps, log.evals) if "step" in df.columns and len(df)]
    if not frames:
        return None
    steps = pd.concat(frames)
    first, last = float(steps.min()), float(steps.max())
    warmup = _int_or_none(config_get(log.config, "derived", "warmup_steps")) or 0
    if warmup >= last:
        return None  # the run never left warm-up (a smoke test): being at chance says nothing yet
    return max(float(warmup), first + LATE_FRACTION * (last - first))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# --- the checks: each takes the RunLog (and what earlier checks found) and returns a Finding or None

def _check_empty(log: RunLog, C) -> Finding | None:
    if log.steps.empty and log.evals.empty:
        return Finding("empty-log", "warning", f"{METRICS_FILE} holds no step or eval record: nothing to "
                       "diagnose (the run stopped before its first optimiser step?)", {"path": str(log.path)})
    return None


def _check_truncated(log: RunLog, C) -> Finding | None:
    if log.warnings:
        return Finding("truncated-log", "warning", "; ".join(log.warnings), {"warnings": log.warnings})
    return None


def _nonfinite_flag(v) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    if isinstance(v, (numbers.Number, str, list, tuple, dict)):
        return bool(v)
    return True


def _check_nonfinite(log: RunLog, C) -> Finding | None:
    hits = {}  # column → (first step, count, first value)
    for source, df in (("step", log.steps), ("eval", log.evals)):
        if df.empty or "step" not in df.columns:
            continue
        cols = ["loss", "grad_norm"] + [f"{k}_{b}" for b in BRANCHES for k in ("loss", "w")]
        if source == "eval":
            cols = ["loss_sa"]
        for col in cols:
            if col not in df.columns or not pd.api.types.is_numeric_dtype(df[col]):
                continue
            values = df[col].to_numpy(dtype=float)
            # A null is non-finite where a number was expected: in a loss of a branch the config turns on
            # (or, without that, in any column that logged a number at some step).
            branch = col.partition("_")[2] if col.startswith("loss_") else None
            expected = _branch_enabled(log.config, branch) if branch in ("glca", "pwca") else None
            if expected is None:
                expected = bool(np.isfinite(values).any()) or col in ("loss", "loss_sa")
            bad = np.isinf(values) | (np.isnan(values) & expected)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                name = col if source == "step" else f"eval/{col}"
                hits[name] = {"first_step": int(df["step"].iloc[i]), "count": int(bad.sum()),
                              "first_value": values[i] if not np.isnan(values[i]) else "null/nan"}
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
    parts = [f"{c} = {h['first_value']} at step {h['first_step']} ({h['count']} records)" for c, h in hits.items()]
    if flagged:
        parts.append(f"the trainer marked step {flagged['first_step']} non-finite ({flagged['value']}; "
                     f"{flagged['count']} steps)")
    return Finding("nonfinite", "error", f"non-finite values from step {first}: " + "; ".join(parts),
                   {"first_step": first, "columns": hits, "nonfinite_field": flagged})


def _check_chance(log: RunLog, C) -> Finding | None:
    start = _late_start(log)
    if not C or start is None:
        return None
    lnC, acc_chance = math.log(C), CHANCE_ACC_FACTOR / C
    losses, accs = {}, {}
    if "step" in log.steps.columns:
        late = log.steps[log.steps["step"] >= start]
        for b in BRANCHES:
            col = f"loss_{b}"
            if _has_values(late, col):
                med = float(_finite(late[col]).median())
                if med >= CHANCE_LOSS_FRACTION * lnC:
                    losses[b] = med
    if "step" in log.evals.columns:
        late = log.evals[log.evals["step"] >= start]
        for col in ("acc_sa", "acc_glca", "acc_fused"):
            if _has_values(late, col):
                best = float(_finite(late[col]).max())
                if best <= acc_chance:
                    accs[col.partition("_")[2]] = best
    if not losses and not accs:
        return None
    parts = [f"{_LABEL[b]} loss {_fmt(v)} (median) ≥ {CHANCE_LOSS_FRACTION:g}·ln C = "
             f"{_fmt(CHANCE_LOSS_FRACTION * lnC)}" for b, v in losses.items()]
    parts += [f"{_LABEL[b]} accuracy at most {_fmt(v)} ≤ {CHANCE_ACC_FACTOR:g}/C = {_fmt(acc_chance)}"
              for b, v in accs.items()]
    return Finding("chance-level", "error",
                   f"after warm-up (steps ≥ {start:.0f}), with C = {C} (ln C = {lnC:.2f}): " + "; ".join(parts)
                   + ": these branches are not learning",
                   {"num_classes": C, "ln_c": lnC, "window_start_step": start, "loss_median": losses,
                    "acc_max": accs, "chance_accuracy_threshold": acc_chance})


def _check_uncertainty_at_chance(log: RunLog, C) -> Finding | None:
    st = uncertainty_state(log.steps, C) if C else None
    if not st or not st["weights_at_chance"]:
        return None
    # w that never moved from an init that happens to equal log ln C (C ≈ 15 with init 0) says nothing.
    still = all(v["w_range"] < 0.05 for v in st["branches"].values())
    if still:
        return None
    if st["losses_at_chance"] is False:
        return None  # the weights lag behind losses that have left chance: the loss checks tell the story
    weights = {b: v["effective_weight"] for b, v in st["branches"].items()}
    evidence = {"num_classes": C, "chance_weight": st["chance_weight"], "chance_w": st["chance_w"],
                "w": {b: v["w"] for b, v in st["branches"].items()}, "effective_weight": weights,
                "loss": {b: v["loss"] for b, v in st["branches"].items()}, "tolerance_w": CHANCE_W_TOLERANCE}
    ws = ", ".join(f"{_LABEL[b]} {w:.3f}" for b, w in weights.items())
    if st["losses_at_chance"]:
        return Finding("uncertainty-at-chance", "error",
                       f"effective weights ½·e^(−w) = {ws} ≈ ½/ln C = {st['chance_weight']:.3f} (C = {C}): "
                       f"at the optimum w = log L, so every branch loss is ≈ ln C = {math.log(C):.2f}: every "
                       "branch at chance. The weights are a symptom, not the cause; bounds or a new init "
                       "will not fix it", evidence)
    return Finding("uncertainty-at-chance", "warning",
                   f"effective weights ½·e^(−w) = {ws} ≈ ½/ln C = {st['chance_weight']:.3f} (C = {C}): at "
                   "equilibrium that means every branch at chance (the branch losses were not logged to confirm)",
                   evidence)


def _longest_streak(mask: np.ndarray) -> tuple[int, int]:
    """(length, start index) of the longest run of True."""
    best, best_start, run, start = 0, 0, 0, 0
    for i, m in enumerate(mask):
        if m:
            if run == 0:
                start = i
            run += 1
            if run > best:
                best, best_start = run, start
        else:
            run = 0
    return best, best_start


def _check_clamped(log: RunLog, C) -> Finding | None:
    steps = log.steps
    if steps.empty or "step" not in steps.columns:
        return None
    n = len(steps)
    has_key = isinstance(config_get(log.config, "train"), dict) and "uncertainty_bounds" in log.config["train"]
    bounds = config_get(log.config, "train", "uncertainty_bounds")
    if has_key and bounds is None:
        return None  # the config says there is no clamp
    pinned = {}
    for b in BRANCHES:
        col = f"w_{b}"
        if not _has_values(steps, col):
            continue
        w = steps[col].to_numpy(dtype=float)
        if bounds is not None:
            lo, hi = float(bounds[0]), float(bounds[1])
            for name, at in (("lower", w <= lo + BOUND_ATOL), ("upper", w >= hi - BOUND_ATOL)):
                length, i = _longest_streak(at)
                if length >= max(PINNED_MIN_STEPS, PINNED_MIN_FRACTION * n):
                    pinned[b] = {"bound": name, "value": lo if name == "lower" else hi, "streak_steps": length,
                                 "from_step": int(steps["step"].iloc[i]), "steps_at_bound": int(at.sum())}
        else:
            same = np.zeros(n, dtype=bool)
            same[1:] = np.abs(np.diff(w)) <= BOUND_ATOL
            length, i = _longest_streak(same)
            i = max(0, i - 1)  # the streak starts at the value the next ones equal
            v = w[i]
            if (length + 1 >= max(FROZEN_MIN_STEPS, FROZEN_MIN_FRACTION * n) and abs(v) > BOUND_ATOL
                    and abs(2 * v - round(2 * v)) <= BOUND_ATOL):
                pinned[b] = {"bound": "inferred", "value": float(round(2 * v) / 2), "streak_steps": length + 1,
                             "from_step": int(steps["step"].iloc[i]), "steps_at_bound": length + 1}
    if not pinned:
        return None
    st = uncertainty_state(steps, C) or {"branches": {}}
    parts = []
    for b, p in pinned.items():
        eq = st["branches"].get(b, {}).get("equilibrium_w")
        p["equilibrium_w"] = eq
        where = (f"the {p['bound']} bound {_fmt(p['value'])}" if p["bound"] != "inferred"
                 else f"exactly {_fmt(p['value'])} (a clamp bound, inferred: no config)")
        parts.append(f"w_{b} sits at {where} for {p['streak_steps']} consecutive steps from step {p['from_step']} "
                     f"({p['streak_steps'] / n:.0%} of the run)"
                     + (f", its equilibrium log L_{b} = {eq:.2f}" if eq is not None else ""))
    return Finding("uncertainty-clamped", "warning",
                   "; ".join(parts) + ". A clamp holds w away from its optimum log L and zeroes its gradient",
                   {"bounds": bounds, "pinned": pinned, "steps": n})


def _check_collapse(log: RunLog, C) -> Finding | None:
    ev = log.evals
    if ev.empty or "step" not in ev.columns:
        return None
    floor = CHANCE_ACC_FACTOR / C if C else 0.0
    collapsed = {}
    for col in ("acc_fused", "acc_sa", "acc_glca"):
        if not _has_values(ev, col):
            continue
        s = ev.loc[np.isfinite(ev[col]), ["step", col]]
        a = s[col].to_numpy()
        i_best = int(np.argmax(a))
        best = float(a[i_best])
        if best <= floor:
            continue  # never above chance: nothing to collapse from
        below = a < COLLAPSE_FRACTION * best
        tail = np.flatnonzero(~below)
        j = int(tail[-1]) + 1 if len(tail) else 0  # first index of the final run of "below half"
        if j < len(a) and j > i_best:
            collapsed[col.partition("_")[2]] = {
                "best": best, "best_step": int(s["step"].iloc[i_best]), "final": float(a[-1]),
                "collapse_step": int(s["step"].iloc[j]), "evals_below": int(len(a) - j)}
    if not collapsed:
        return None
    parts = [f"{_LABEL[b]} accuracy fell from its best {c['best']:.2%} (step {c['best_step']}) to "
             f"{c['final']:.2%} at the end, below half of the best from step {c['collapse_step']} on "
             f"({c['evals_below']} evals)" for b, c in collapsed.items()]
    return Finding("accuracy-collapse", "error", "; ".join(parts), {"branches": collapsed, "num_classes": C})


def _check_memory(log: RunLog, C) -> Finding | None:
    st = log.steps
    if "mem_allocated_mb" not in st.columns or "step" not in st.columns:
        return None
    df = st.loc[np.isfinite(pd.to_numeric(st["mem_allocated_mb"], errors="coerce")), ["step", "mem_allocated_mb"]]
    df = df.iloc[max(2, int(MEM_SKIP_FRACTION * len(df))):]
    if len(df) < MEM_MIN_POINTS:
        return None
    x, y = df["step"].to_numpy(dtype=float), df["mem_allocated_mb"].to_numpy(dtype=float)
    if np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    sigma = float(np.sqrt((resid ** 2).sum() / max(1, len(x) - 2)))
    se = sigma / float(np.sqrt(((x - x.mean()) ** 2).sum()))
    t = math.inf if se == 0 else slope / se
    start = float(slope * x[0] + intercept)
    growth = float(slope * (x[-1] - x[0]))
    base = start if start > 0 else float(y.mean())
    if not (slope > 0 and t >= MEM_T_STAT and growth > MEM_MIN_GROWTH_MB and growth > MEM_MIN_GROWTH_FRACTION * base):
        return None
    severity = "error" if growth >= MEM_ERROR_FRACTION * base else "warning"
    return Finding("memory-growth", severity,
                   f"allocated memory grows by {slope:.3g} MB per step after warm-up (steps {int(x[0])}–"
                   f"{int(x[-1])}): {start:.0f} → {start + growth:.0f} MB (+{growth:.0f} MB, "
                   f"+{growth / base:.0%}; t = {t:.1f}). Live tensors are kept from step to step (a loss "
                   "stored with its graph, kept attention maps); empty_cache() cannot free them",
                   {"slope_mb_per_step": float(slope), "start_mb": start, "growth_mb": growth,
                    "growth_fraction": growth / base, "t_stat": t, "first_step": int(x[0]), "last_step": int(x[-1]),
                    "points": len(x), "mb_per_1000_steps": float(slope * 1000)})


def _check_selection(log: RunLog, C) -> Finding | None:
    ev = log.evals
    if not _has_values(ev, "selection_jaccard"):
        return None
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


def _check_lr_rule(log: RunLog, C) -> Finding | None:
    cfg = log.config
    if cfg is None:
        return None
    g = _int_or_none(config_get(cfg, "derived", "global_batch"))
    if g is None:
        b = _int_or_none(config_get(cfg, "train", "batch_size"))
        if b is None:
            return None
        g = global_batch_size(b, _int_or_none(config_get(cfg, "train", "grad_accum_steps")) or 1,
                              _int_or_none(config_get(cfg, "derived", "world_size")) or 1)
    lr = config_get(cfg, "derived", "lr")
    logged = float(_finite(log.steps["lr"]).max()) if _has_values(log.steps, "lr") else None
    source = "config derived.lr"
    if not isinstance(lr, numbers.Number):
        lr, source = logged, "the step records' peak lr"
    if lr is None or lr <= 0:
        return None
    ref = lr_for_rule("linear", batch_size=g)
    ratio = lr / ref
    if 1 / LR_RULE_RATIO <= ratio <= LR_RULE_RATIO * (1 + 1e-9):
        return None
    rule, base = config_get(cfg, "train", "lr_rule"), config_get(cfg, "train", "base_lr")
    how = f"{ratio:.3g}× above" if ratio > 1 else f"{1 / ratio:.3g}× below"
    settings = [f"global batch {g}"] + ([f"train.lr_rule = {rule!r}"] if rule else []) + (
        [f"train.base_lr = {base:g}"] if isinstance(base, numbers.Number) and base != 5e-4 else [])
    return Finding("lr-rule", "warning",
                   f"peak LR {lr:.3g} ({source}) is {how} DeiT's linear rule 5e-4·global_batch/512 = {ref:.3g} "
                   f"({', '.join(settings)}); the paper's two readings of its batch differ by {LR_RULE_RATIO:g}×, "
                   "so this is another rule, not another reading",
                   {"lr": lr, "lr_source": source, "reference_lr": ref, "ratio": ratio, "global_batch": g,
                    "lr_rule": rule, "base_lr": base, "logged_peak_lr": logged})


def _check_coupled_wd(log: RunLog, C, collapsed: bool) -> Finding | None:
    if config_get(log.config, "train", "optimizer") != "adam_l2":
        return None
    wd = config_get(log.config, "train", "weight_decay")
    if isinstance(wd, numbers.Number) and wd <= 0:
        return None
    lr = config_get(log.config, "derived", "lr")
    msg = (f"train.optimizer = 'adam_l2': Adam with coupled L2 weight decay {wd} adds wd·θ to the gradient, "
           "which Adam normalises, so weights with small gradients shrink by about lr per step and a pretrained "
           "backbone erodes; AdamW decouples the decay")
    if collapsed:
        msg += ". The accuracy collapse in this run is what that erosion looks like"
    return Finding("coupled-weight-decay", "error" if collapsed else "warning", msg,
                   {"optimizer": "adam_l2", "weight_decay": wd, "lr": lr, "accuracy_collapsed": collapsed})


# --- the doctor

def diagnose_log(log: RunLog) -> list[Finding]:
    """Every finding this `RunLog` supports, errors first."""
    C = log.num_classes
    findings = [_check_empty(log, C), _check_truncated(log, C)]
    if not (log.steps.empty and log.evals.empty):
        findings += [check(log, C) for check in (_check_nonfinite, _check_chance, _check_uncertainty_at_chance,
                                                  _check_clamped, _check_collapse, _check_memory,
                                                  _check_selection, _check_lr_rule)]
        collapsed = any(f is not None and f.code == "accuracy-collapse" for f in findings)
        findings.append(_check_coupled_wd(log, C, collapsed))
    findings = [f for f in findings if f is not None]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def diagnose(run_dir: str | Path | RunLog) -> list[Finding]:
    """Read a run folder (metrics.jsonl, and config.yaml when present) and return its findings.

    Raises `FileNotFoundError` without a metrics file and `RunLogError` for a malformed one.
    """
    return diagnose_log(run_dir if isinstance(run_dir, RunLog) else load_run(run_dir))


def summarize(log: RunLog) -> dict:
    """Steps, evals, final and best accuracies, final branch losses, uncertainty reading."""
    st, ev = log.steps, log.evals
    out: dict = {"run": str(log.path), "config": log.config is not None, "num_classes": log.num_classes,
                 "steps_logged": len(st), "evals_logged": len(ev)}
    if "step" in st.columns and len(st):
        out["last_step"] = int(st["step"].max())
    if "epoch" in st.columns and len(st):
        out["last_epoch"] = int(_finite(st["epoch"]).max()) if _has_values(st, "epoch") else None
    out["final_accuracy"], out["best_accuracy"] = {}, {}
    for col in ("acc_sa", "acc_glca", "acc_fused"):
        if _has_values(ev, col):
            s = ev.loc[np.isfinite(ev[col])]
            i = int(np.argmax(s[col].to_numpy()))
            out["final_accuracy"][col] = float(s[col].iloc[-1])
            out["best_accuracy"][col] = {"value": float(s[col].iloc[i]),
                                         "step": int(s["step"].iloc[i]) if "step" in s else None}
    out["final_loss"] = {b: float(_finite(st[f"loss_{b}"]).iloc[-max(1, len(st) // 10):].mean())
                         for b in BRANCHES if _has_values(st, f"loss_{b}")}
    out["uncertainty"] = uncertainty_reading(st, log.num_classes) if len(st) else None
    return _jsonable(out)


def format_summary(summary: dict) -> str:
    lines = [f"run: {summary['run']}" + ("" if summary.get("config") else "  (no config.yaml)")]
    n = f"{summary['steps_logged']} step records"
    if "last_step" in summary:
        n += f" (last step {summary['last_step']}" + (f", epoch {summary['last_epoch']}" if summary.get("last_epoch")
                                                       is not None else "") + ")"
    n += f", {summary['evals_logged']} evals" + (f", C = {summary['num_classes']}" if summary["num_classes"] else "")
    lines.append("  " + n)
    if summary["final_accuracy"]:
        acc = ", ".join(f"{_LABEL[k[4:]]} {v:.2%}" for k, v in summary["final_accuracy"].items())
        best = ", ".join(f"{_LABEL[k[4:]]} {v['value']:.2%} (step {v['step']})" for k, v in summary["best_accuracy"].items())
        lines += [f"  final accuracy: {acc}", f"  best accuracy:  {best}"]
    if summary["final_loss"]:
        lines.append("  final losses: " + ", ".join(f"{_LABEL[b]} {v:.3f}" for b, v in summary["final_loss"].items()))
    if summary.get("uncertainty"):
        lines.append(f"  uncertainty: {summary['uncertainty']}")
    return "\n".join(lines)


def format_text(findings: Sequence[Finding], summary: dict | None = None) -> str:
    """Findings as text, one per paragraph, with a count line (and the summary first, when given)."""
    lines = [format_summary(summary), ""] if summary else []
    if not findings:
        lines.append("no findings: nothing in this run looks wrong")
        return "\n".join(lines)
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    lines.append("findings: " + ", ".join(f"{c} {s}{'s' if c != 1 else ''}" for s, c in counts.items() if c))
    for f in findings:
        lines.append(f"  [{f.severity}] {f.code}: {f.message}")
    return "\n".join(lines)


def to_json(findings: Sequence[Finding], indent: int | None = 2) -> str:
    """JSON text: a list of ``{"code", "severity", "message", "evidence"}``."""
    return json.dumps([f.to_dict() for f in findings], indent=indent, ensure_ascii=False, allow_nan=False)


# --- the HTML report

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _lr_figure(log: RunLog):
    if "step" not in log.steps.columns or not _has_values(log.steps, "lr"):
        raise ValueError("no lr in the step records")
    g = _int_or_none(config_get(log.config, "derived", "global_batch"))
    return plot_lr_schedule(log.steps["lr"].to_numpy(dtype=float), steps=log.steps["step"].to_numpy(),
                            warmup_steps=_int_or_none(config_get(log.config, "derived", "warmup_steps")),
                            reference_lr=lr_for_rule("linear", batch_size=g) if g else None)


def _figures(log: RunLog) -> list[tuple[str, str | None, str]]:
    """(title, base64 PNG or None, note) for each plot of the report; a plot the log cannot feed is a note."""
    out = []
    makers = [("losses and accuracies", plot_curves), ("uncertainty weights", plot_uncertainty),
              ("learning rate (as logged)", _lr_figure)]
    for title, make in makers:
        try:
            fig = make(log)
        except (ValueError, TypeError) as e:
            out.append((title, None, str(e)))
            continue
        out.append((title, _png(fig), ""))
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
tr.error td:first-child{background:#f8d7da}tr.warning td:first-child{background:#fff3cd}tr.info td:first-child{background:#d1ecf1}
pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}code{font-size:90%}"""


def write_html(run_dir: str | Path | RunLog, findings: Sequence[Finding], path: str | Path) -> Path:
    """A self-contained HTML report: summary, findings, the plots (embedded PNG), the config."""
    log = run_dir if isinstance(run_dir, RunLog) else load_run(run_dir)
    esc = html.escape
    summary = summarize(log)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dcal doctor: {esc(log.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>dcal doctor: {esc(log.name)}</h1>", f"<pre>{esc(format_summary(summary))}</pre>", "<h2>Findings</h2>"]
    if findings:
        parts.append("<table><tr><th>severity</th><th>code</th><th>message</th><th>evidence</th></tr>")
        for f in findings:
            parts.append(f"<tr class='{esc(f.severity)}'><td>{esc(f.severity)}</td><td><code>{esc(f.code)}</code></td>"
                         f"<td>{esc(f.message)}</td><td><pre>{esc(json.dumps(f.evidence, indent=1))}</pre></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No findings: nothing in this run looks wrong.</p>")
    parts.append("<h2>Plots</h2>")
    for title, png, note in _figures(log):
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(f'<img src="data:image/png;base64,{png}" alt="{esc(title)}"/>' if png
                     else f"<p><em>not drawn: {esc(note)}</em></p>")
    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{esc(yaml.safe_dump(log.config, sort_keys=False))}</pre>" if log.config
                 else "<p><em>no config.yaml in this run folder</em></p>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# --- the command

def main(argv: Sequence[str] | None = None) -> int:
    """``dcal doctor RUN_DIR [--json] [--html FILE]``: 1 when a finding is an error, 0 otherwise, 2 when the
    run folder cannot be read."""
    parser = argparse.ArgumentParser(prog="dcal doctor", description="Find out why a training run went wrong.")
    parser.add_argument("run_dir", help=f"a run folder (holding {METRICS_FILE}, and config.yaml when present)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON (a list of objects)")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report to FILE")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on bad arguments; hand back its status
        return int(e.code or 0)
    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        print(f"dcal doctor: {run_dir} does not exist", file=sys.stderr)
        return 2
    try:
        log = load_run(run_dir)
    except (FileNotFoundError, RunLogError, OSError) as e:
        print(f"dcal doctor: cannot read the run folder: {e}", file=sys.stderr)
        return 2
    findings = diagnose_log(log)
    if args.json:
        print(to_json(findings))
    else:
        print(format_text(findings, summarize(log)))
    if args.html:
        try:
            out = write_html(log, findings, args.html)
        except OSError as e:
            print(f"dcal doctor: cannot write the HTML report: {e}", file=sys.stderr)
            return 2
        print(f"dcal doctor: wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 1 if any(f.severity == "error" for f in findings) else 0
