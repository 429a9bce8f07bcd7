"""Checks on how the run moved: uncertainty weights crawling at the optimiser's speed limit far from
their equilibrium (`uncertainty-lag`), and a training loss that rises at a flat or falling LR while
accuracy falls (`loss-rising`)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..runlog import RunLog
from ..stats import BRANCHES, finite, fit_growth, has_values
from .common import acc_label, loss_label
from .findings import Finding
from .rules import (
    ACC_FALL_FRACTION,
    LAG_MIN_GAP,
    LAG_MIN_RECORDS,
    LAG_SAME_DIRECTION,
    LAG_SPEED_RANGE,
    LR_FLAT_TOLERANCE,
    RISE_MIN_FRACTION,
    RISE_MIN_RECORDS,
    RISE_MIN_RUN_FRACTION,
    RISE_SMOOTH_DIVISOR,
    RISE_T_STAT,
)

__all__ = ["check_uncertainty_lag", "check_loss_rising", "lag_skipped_reason", "LAG_MIN_RECORDS",
           "LAG_SPEED_RANGE", "LAG_SAME_DIRECTION", "LAG_MIN_GAP", "RISE_MIN_RECORDS", "RISE_MIN_FRACTION",
           "RISE_T_STAT", "RISE_MIN_RUN_FRACTION", "LR_FLAT_TOLERANCE", "ACC_FALL_FRACTION"]

def _optimiser_steps(log: RunLog) -> float | None:
    """Optimiser steps per unit of ``step``: 1 for step records, steps per epoch for epoch records."""
    if log.step_unit == "step":
        return 1.0
    if log.step_unit == "epoch":
        return log.steps_per_epoch
    return None


def lag_skipped_reason(log: RunLog) -> str | None:
    """Why `uncertainty-lag` cannot be checked on a log that has the weights, or None."""
    st = log.steps
    if not any(has_values(st, f"w_{b}") for b in BRANCHES):
        return None
    if not has_values(st, "lr"):
        return "the learning rate is not logged"
    if _optimiser_steps(log) is None:
        return ("the log has one record per epoch and the number of optimiser steps per epoch is unknown "
                "(pass --steps-per-epoch N)" if log.step_unit == "epoch" else
                "the records have no epoch or step index")
    return None


def _branch_lag(df: pd.DataFrame, b: str, per_unit: float) -> dict | None:
    cols = ["step", f"w_{b}", "lr", f"loss_{b}"]
    if any(c not in df.columns for c in cols):
        return None
    d = df[cols].apply(pd.to_numeric, errors="coerce").dropna(subset=["step", f"w_{b}", "lr"])
    if len(d) < LAG_MIN_RECORDS or not has_values(d, f"loss_{b}"):
        return None
    x, w, lr = (d[c].to_numpy(dtype=float) for c in ("step", f"w_{b}", "lr"))
    steps = np.diff(x) * per_unit
    lr_mid = lr[1:] if per_unit != 1.0 else (lr[1:] + lr[:-1]) / 2  # an epoch's LR is printed with it
    limit = lr_mid * steps
    ok = limit > 0
    if ok.sum() < LAG_MIN_RECORDS - 1:
        return None
    dw = np.diff(w)[ok]
    speed = np.abs(dw) / limit[ok]
    loss = float(finite(d[f"loss_{b}"]).iloc[-1])
    if loss <= 0:
        return None
    gap = math.log(loss) - w[-1]
    toward = np.sign(dw) == np.sign(gap)
    return {"w_first": w[0], "w_last": w[-1], "first": x[0], "last": x[-1], "dw_per_unit": (w[-1] - w[0]) / (x[-1] - x[0]),
            "speed_median": float(np.median(speed)), "speed_overall": abs(w[-1] - w[0]) / float(limit[ok].sum()),
            "toward_fraction": float(toward.mean()), "loss": loss, "equilibrium_w": math.log(loss), "gap": gap,
            "lr_last": lr[-1], "steps_to_equilibrium": abs(gap) / lr[-1] if lr[-1] > 0 else math.inf}


def check_uncertainty_lag(log: RunLog, C) -> Finding | None:
    """w_i moving at ≈ lr per optimiser step (Adam's limit) while still far from log L_i: the weights are
    alike because they are slow, not because the losses are."""
    per_unit = _optimiser_steps(log)
    if per_unit is None or lag_skipped_reason(log) is not None:
        return None
    lags = {b: r for b in BRANCHES if (r := _branch_lag(log.steps, b, per_unit)) is not None}
    lo, hi = LAG_SPEED_RANGE
    lagging = {b: r for b, r in lags.items() if lo <= r["speed_median"] <= hi and abs(r["gap"]) >= LAG_MIN_GAP
               and r["toward_fraction"] >= LAG_SAME_DIRECTION}
    if not lagging:
        return None
    unit = log.step_unit
    ws = [r["w_last"] for r in lagging.values()]
    first = next(iter(lagging.values()))
    per = f"per {unit}" if unit == "epoch" else "per step"
    parts = [f"w_{b} {r['w_first']:.4g} → {r['w_last']:.4g} ({r['dw_per_unit']:+.3g} {per} = "
             f"{r['speed_median']:.2f} × lr per optimiser step; equilibrium log L_{b} = {r['equilibrium_w']:.3g}, "
             f"{abs(r['gap']):.3g} away)" for b, r in lagging.items()]
    steps_left = max(r["steps_to_equilibrium"] for r in lagging.values())
    assumed = (f"; assumed {log.steps_per_epoch_source}" if unit == "epoch" and log.steps_per_epoch_source else "")
    more = f"≈ {steps_left:,.0f} more optimiser steps" + (
        f" (≈ {steps_left / log.steps_per_epoch:,.0f} epochs)" if unit == "epoch" and log.steps_per_epoch else "")
    together = (f"; the {len(ws)} weights are within {max(ws) - min(ws):.2g} of each other" if len(ws) > 1 else "")
    msg = (f"the uncertainty weights move at Adam's speed limit (≈ lr per optimiser step), far from their "
           f"equilibrium w_i = log L_i, over {unit}s {first['first']:.0f}–{first['last']:.0f}: " + "; ".join(parts)
           + f"{together}. At the last lr {first['lr_last']:.3g} they need {more} to get there. They are alike "
           "because they are slow, not because the branch losses are; ½·e^(−w) does not read as ½/L_i "
           f"(nor ½/ln C as chance) until they arrive{assumed}")
    return Finding("uncertainty-lag", "warning", msg,
                   {"branches": lagging, "step_unit": unit, "steps_per_epoch": log.steps_per_epoch,
                    "steps_per_epoch_source": log.steps_per_epoch_source, "speed_range": LAG_SPEED_RANGE,
                    "min_gap": LAG_MIN_GAP})


# --- loss-rising

def _rising_stretch(df: pd.DataFrame, col: str) -> dict | None:
    d = df[["step", col]].apply(pd.to_numeric, errors="coerce").dropna()
    d = d[np.isfinite(d[col])]
    if len(d) < RISE_MIN_RECORDS:
        return None
    window = max(1, len(d) // RISE_SMOOTH_DIVISOR)
    smooth = d[col].rolling(window, min_periods=1).mean().to_numpy()
    i = int(np.argmin(smooth))
    stretch = d.iloc[i:]
    if len(stretch) < max(RISE_MIN_RECORDS, RISE_MIN_RUN_FRACTION * len(d)):
        return None
    fit = fit_growth(stretch["step"].to_numpy(dtype=float), stretch[col].to_numpy(dtype=float))
    low, end = float(smooth[i]), float(smooth[-1])
    if fit is None or fit.slope <= 0 or fit.t_stat < RISE_T_STAT or end < (1 + RISE_MIN_FRACTION) * low:
        return None
    return {"from_step": float(stretch["step"].iloc[0]), "to_step": float(stretch["step"].iloc[-1]),
            "min": low, "end": end, "rise_fraction": end / low - 1, "t_stat": fit.t_stat, "records": len(stretch)}


def _lr_over(log: RunLog, start: float, end: float) -> dict | None:
    if not has_values(log.steps, "lr"):
        return None
    s = log.steps[(log.steps["step"] >= start) & (log.steps["step"] <= end)]
    lr = finite(s["lr"])
    if lr.empty:
        return None
    return {"start": float(lr.iloc[0]), "max": float(lr.max()), "end": float(lr.iloc[-1]),
            "flat_or_falling": float(lr.max()) <= (1 + LR_FLAT_TOLERANCE) * float(lr.iloc[0])}


def _accuracies_over(log: RunLog, start: float) -> dict:
    """Each accuracy logged: its value at the first record at or after `start`, and at the end."""
    out = {}
    for df in (log.steps, log.evals):
        for col in [c for c in df.columns if "acc" in str(c) and "top5" not in str(c)]:
            s = df[df["step"] >= start] if "step" in df.columns else df.iloc[0:0]
            v = finite(s[col]) if col in s.columns else pd.Series(dtype=float)
            if len(v) >= 2:
                out[col] = {"start": float(v.iloc[0]), "end": float(v.iloc[-1]),
                            "fell": float(v.iloc[-1]) <= ACC_FALL_FRACTION * float(v.iloc[0])}
    return out


def check_loss_rising(log: RunLog, C) -> Finding | None:
    """The training loss rises over a stretch where the LR is flat or falling while accuracy falls: what a
    regulariser eroding the weights (coupled weight decay) looks like."""
    st = log.steps
    if st.empty or "step" not in st.columns:
        return None
    branch_cols = [f"loss_{b}" for b in BRANCHES if has_values(st, f"loss_{b}")]
    weighted = any(has_values(st, f"w_{b}") for b in BRANCHES)
    # Under uncertainty weighting the total holds the w_i terms: it is not a data loss, the branches are.
    cols = branch_cols or ([] if weighted else [c for c in ("loss",) if has_values(st, c)])
    rising = {c: r for c in cols if (r := _rising_stretch(st, c)) is not None}
    if not rising:
        return None
    start = min(r["from_step"] for r in rising.values())
    end = max(r["to_step"] for r in rising.values())
    lr = _lr_over(log, start, end)
    if lr is not None and not lr["flat_or_falling"]:
        return None
    accs = _accuracies_over(log, start)
    if accs and not any(a["fell"] for a in accs.values()):
        return None  # loss up, accuracy not down: over-confidence, not erosion
    unit = log.step_unit
    parts = [f"{loss_label(c)} {r['min']:.4g} → {r['end']:.4g} (+{r['rise_fraction']:.1%}, "
             f"t = {r['t_stat']:.1f}) over {unit}s {r['from_step']:.0f}–{r['to_step']:.0f}" for c, r in rising.items()]
    lr_text = ("the LR is not logged" if lr is None else
               f"the LR {'is flat' if lr['end'] >= lr['start'] * (1 - LR_FLAT_TOLERANCE) else 'falls'} "
               f"({lr['start']:.3g} → {lr['end']:.3g})")
    fell = {c: a for c, a in accs.items() if a["fell"]}
    acc_text = ("accuracy is not logged" if not accs else "accuracy falls: " + ", ".join(
        f"{acc_label(c)} {a['start']:.2%} → {a['end']:.2%}" for c, a in fell.items()))
    return Finding("loss-rising", "warning",
                   "the training loss rises while " + lr_text + " and " + acc_text + ": " + "; ".join(parts)
                   + ". A loss that climbs at a steady or falling LR is not the LR's doing: a regulariser eroding "
                   "the weights (coupled L2 weight decay under Adam shrinks every weight by ≈ lr per step) is the "
                   "usual cause",
                   {"losses": rising, "lr": lr, "accuracies": accs, "step_unit": unit})
