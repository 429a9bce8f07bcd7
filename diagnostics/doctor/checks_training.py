"""Checks any classifier's curves support, whatever trained it: the validation loss climbing while the
training loss falls (`overfitting`), accuracy lost and not won back (`accuracy-regression`), a loss that
blows up (`divergence`) and one that swings without a trend (`unstable`). Thresholds: `rules`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..runlog import RunLog
from ..stats import fit_growth
from .checks_learning import ACCURACY_COLUMNS, COLLAPSE_FRACTION
from .common import acc_label, data_losses, fmt, late_start, loss_label, series
from .findings import Finding
from .rules import (
    CHANCE_ACC_FACTOR,
    DIVERGENCE_GROWTH_FACTOR,
    DIVERGENCE_LNC_FACTOR,
    DIVERGENCE_MIN_RECORDS,
    DIVERGENCE_T_STAT,
    OVERFIT_ACC_STILL_GAINS,
    OVERFIT_GAP_MIN,
    OVERFIT_GAP_WIDENING,
    OVERFIT_MIN_EVALS,
    OVERFIT_MIN_RISE_FRACTION,
    OVERFIT_MIN_RISE_SCALE,
    OVERFIT_TRAIN_FALL,
    OVERFIT_VAL_STALL,
    REGRESSION_MIN_DROP,
    REGRESSION_MIN_EVALS,
    REGRESSION_MIN_FRACTION,
    UNSTABLE_MIN_RECORDS,
    UNSTABLE_SIGN_CHANGES,
    UNSTABLE_SWING,
    UNSTABLE_T_STAT,
)

__all__ = ["check_overfitting", "check_accuracy_regression", "check_divergence", "check_unstable"]


def _value_at(d: pd.DataFrame, col: str, step: float) -> float | None:
    """`col` at the last record at or before `step` (the first one when none is before)."""
    if d.empty:
        return None
    before = d[d["step"] <= step]
    return float((before if len(before) else d)[col].iloc[-1 if len(before) else 0])


# --- overfitting

def _loss_overfit(log: RunLog, C) -> dict | None:
    val = series(log.evals, "val_loss")
    losses = data_losses(log.steps)
    if len(val) < OVERFIT_MIN_EVALS + 1 or not losses:
        return None
    train = series(log.steps, losses[0])
    i = int(np.argmin(val["val_loss"].to_numpy()))
    after = val.iloc[i:]
    if len(after) - 1 < OVERFIT_MIN_EVALS or train.empty:
        return None
    low, first = float(after["val_loss"].iloc[0]), float(val["val_loss"].iloc[0])
    end = float(val["val_loss"].iloc[-OVERFIT_MIN_EVALS:].median())
    scale = math.log(C) if C else first
    rise = end - low
    if end < (1 + OVERFIT_MIN_RISE_FRACTION) * low or rise < OVERFIT_MIN_RISE_SCALE * scale:
        return None
    min_step, last_step = float(after["step"].iloc[0]), float(val["step"].iloc[-1])
    t_at, t_end = _value_at(train, losses[0], min_step), float(train[losses[0]].iloc[-1])
    if t_at is None or t_end > OVERFIT_TRAIN_FALL * t_at:
        return None
    acc = series(log.evals, "val_acc")
    acc_at = _value_at(acc, "val_acc", min_step)
    acc_end = float(acc["val_acc"].iloc[-OVERFIT_MIN_EVALS:].median()) if len(acc) else None
    if acc_at is not None and acc_end - acc_at >= OVERFIT_ACC_STILL_GAINS:
        return None  # held-out accuracy still climbs: over-confidence, and stopping at the minimum would cost it
    return {"rule": "validation loss rising", "train_loss_column": losses[0], "val_loss_min": low,
            "val_loss_min_step": min_step, "val_loss_end": end, "val_loss_first": first, "val_loss_last_step": last_step,
            "rise": rise, "rise_fraction": end / low - 1 if low > 0 else math.inf, "scale": scale, "scale_is": "ln C" if C else "first val_loss",
            "train_loss_at_min": t_at, "train_loss_end": t_end, "evals_after_min": len(after) - 1,
            "val_acc_at_min": acc_at, "val_acc_end": acc_end}


def _gap_overfit(log: RunLog) -> dict | None:
    """Without a validation loss: train − validation accuracy, at the same steps."""
    tr, va = series(log.steps, "train_acc"), series(log.evals, "val_acc")
    both = pd.merge(tr, va, on="step")
    if len(both) < 2 * OVERFIT_MIN_EVALS:
        return None
    gap = (both["train_acc"] - both["val_acc"]).to_numpy()
    half = len(both) // 2
    gap_first, gap_end = float(np.median(gap[:half])), float(np.median(gap[-OVERFIT_MIN_EVALS:]))
    val_first_best = float(both["val_acc"].iloc[:half].max())
    val_end = float(both["val_acc"].iloc[-OVERFIT_MIN_EVALS:].median())
    if gap_end < OVERFIT_GAP_MIN or gap_end - gap_first < OVERFIT_GAP_WIDENING or \
            val_end - val_first_best >= OVERFIT_VAL_STALL:
        return None
    return {"rule": "train/validation accuracy gap widening", "gap_first_half": gap_first, "gap_end": gap_end,
            "val_acc_first_half_best": val_first_best, "val_acc_end": val_end,
            "train_acc_end": float(both["train_acc"].iloc[-OVERFIT_MIN_EVALS:].median()),
            "from_step": float(both["step"].iloc[half]), "last_step": float(both["step"].iloc[-1])}


def check_overfitting(log: RunLog, C) -> Finding | None:
    """The validation loss climbs for several evaluations while the training loss keeps falling (or, with no
    validation loss, the train/validation accuracy gap widens while validation accuracy stalls)."""
    unit = log.step_unit
    r = _loss_overfit(log, C)
    if r is not None:
        msg = (f"the validation loss rises from its minimum {fmt(r['val_loss_min'])} ({unit} "
               f"{r['val_loss_min_step']:.0f}) to {fmt(r['val_loss_end'])} (median of the last {OVERFIT_MIN_EVALS} "
               f"evaluations, +{r['rise_fraction']:.0%}, {r['evals_after_min']} evaluations after the minimum) while "
               f"the {loss_label(r['train_loss_column'])} falls from {fmt(r['train_loss_at_min'])} to "
               f"{fmt(r['train_loss_end'])}: the model fits the training set ever better and the held-out set worse. "
               "Stop at the minimum (early stopping, the best checkpoint) or regularise more (augmentation, "
               "weight decay, a smaller model)")
    elif series(log.evals, "val_loss").empty and (r := _gap_overfit(log)) is not None:  # no val loss to read
        msg = (f"training accuracy pulls away from validation accuracy: the gap widens from {r['gap_first_half']:.2f} "
               f"(first half, median) to {r['gap_end']:.2f} (last {OVERFIT_MIN_EVALS} evaluations: train "
               f"{r['train_acc_end']:.2%}, validation {r['val_acc_end']:.2%}) while validation accuracy gains nothing "
               f"over its first-half best {r['val_acc_first_half_best']:.2%}: the model memorises the training set")
    else:
        return None
    return Finding("overfitting", "warning", msg, {**r, "num_classes": C, "step_unit": unit})


# --- accuracy-regression

def check_accuracy_regression(log: RunLog, C) -> Finding | None:
    """Validation accuracy that ends (its last few evaluations) a stated margin below its best and stays there,
    without falling to half of it (that is `accuracy-collapse`)."""
    floor = CHANCE_ACC_FACTOR / C if C else 0.0
    found = {}
    for col in ACCURACY_COLUMNS:
        d = series(log.evals, col)
        if len(d) < REGRESSION_MIN_EVALS + 1:
            continue
        a = d[col].to_numpy()
        # The best *level*: the median of 3 consecutive evaluations, so one lucky evaluation is not a best.
        held = d[col].rolling(3, center=True, min_periods=1).median().to_numpy()
        i_best = int(np.argmax(held))
        best, final, peak = float(held[i_best]), float(a[-1]), float(a.max())
        line = best - max(REGRESSION_MIN_DROP, REGRESSION_MIN_FRACTION * best)
        tail = a[-REGRESSION_MIN_EVALS:]
        if best <= floor or i_best >= len(a) - REGRESSION_MIN_EVALS or not (tail < line).all():
            continue
        if final < COLLAPSE_FRACTION * peak:
            continue  # `accuracy-collapse` says it
        below = np.flatnonzero(a[i_best:] >= line)  # the last evaluation still at the best's level
        since = i_best + int(below[-1]) + 1
        found[col] = {"column": col, "best": best, "best_single": peak, "best_step": float(d["step"].iloc[i_best]),
                      "final": final,
                      "drop": best - final, "drop_fraction": (best - final) / best, "line": line,
                      "below_from_step": float(d["step"].iloc[since]), "evals_below": int(len(a) - since),
                      "lowest_after_best": float(a[i_best:].min())}
    if not found:
        return None
    unit = log.step_unit
    parts = []
    for r in found.values():
        text = (f"{acc_label(r['column'])} accuracy ends at {r['final']:.2%}, {100 * r['drop']:.1f} points "
                f"({r['drop_fraction']:.0%}) below its best level {r['best']:.2%} (median of 3 evaluations around "
                f"{unit} {r['best_step']:.0f}; best single evaluation {r['best_single']:.2%}); it fell "
                f"to {r['lowest_after_best']:.2%} and has stayed below {r['line']:.2%} since {unit} "
                f"{r['below_from_step']:.0f} ({r['evals_below']} evaluations)")
        loss = data_losses(log.steps)
        if loss:
            tr = series(log.steps, loss[0])
            at_best, after = _value_at(tr, loss[0], r["best_step"]), tr[tr["step"] > r["best_step"]][loss[0]]
            if at_best is not None and len(after):
                peak_step = float(tr.loc[after.idxmax(), "step"])
                r["train_loss_at_best"], r["train_loss_max_after"] = at_best, float(after.max())
                text += (f"; the {loss_label(loss[0])} was {fmt(at_best)} at the best and jumped to "
                         f"{fmt(float(after.max()))} ({unit} {peak_step:.0f})")
                lr = series(log.steps, "lr")
                lr0, lr1 = _value_at(lr, "lr", r["best_step"]), _value_at(lr, "lr", peak_step)
                if lr0 is not None and lr1 is not None:
                    r["lr_at_best"], r["lr_at_loss_peak"] = lr0, lr1
                    text += f" while the LR {'rose' if lr1 > lr0 else 'did not rise'} ({lr0:.3g} → {lr1:.3g})"
        parts.append(text)
    return Finding("accuracy-regression", "warning",
                   "; ".join(parts) + ". The run lost what it had learned and did not win it back: keep the best "
                   "checkpoint, and look at what changed at the drop (a resume from a checkpoint, the data, a schedule)",
                   {"columns": found, "num_classes": C, "step_unit": unit, "min_drop": REGRESSION_MIN_DROP,
                    "min_drop_fraction": REGRESSION_MIN_FRACTION, "min_evals": REGRESSION_MIN_EVALS})


# --- divergence

def _growth(d: pd.DataFrame, col: str, C) -> dict | None:
    v = d[col].to_numpy(dtype=float)
    if len(v) < DIVERGENCE_MIN_RECORDS or (v <= 0).any():
        return None
    i = int(np.argmin(v))
    if len(v) - i < DIVERGENCE_MIN_RECORDS or v[-1] < DIVERGENCE_GROWTH_FACTOR * v[i]:
        return None
    if v[-1] < (math.log(C) if C else v[0]):
        return None  # still below a uniform guess (or the untrained start): a small loss that grew, not a blow-up
    fit = fit_growth(d["step"].to_numpy(dtype=float)[i:], np.log(v[i:]))
    if fit is None or fit.slope <= 0 or fit.t_stat < DIVERGENCE_T_STAT:
        return None
    return {"rule": "geometric growth", "min": float(v[i]), "min_step": float(d["step"].iloc[i]), "end": float(v[-1]),
            "factor": float(v[-1] / v[i]), "t_stat": fit.t_stat, "records": int(len(v) - i)}


def check_divergence(log: RunLog, C) -> Finding | None:
    """A loss (training or validation) whose late median is ten times ln C or more, or that grows
    geometrically to ten times its minimum."""
    start = late_start(log)
    found = {}
    for df, col in [(log.steps, c) for c in data_losses(log.steps)] + [(log.evals, "val_loss")]:
        d = series(df, col)
        if d.empty:
            continue
        late = d[d["step"] >= start][col] if start is not None else d[col].iloc[0:0]
        if C and len(late) and float(late.median()) >= DIVERGENCE_LNC_FACTOR * math.log(C):
            found[col] = {"rule": "far above ln C", "late_median": float(late.median()),
                          "times_ln_c": float(late.median()) / math.log(C), "window_start_step": start}
        elif (g := _growth(d, col, C)) is not None:
            found[col] = g
    if not found:
        return None
    unit = log.step_unit
    parts = []
    for col, r in found.items():
        if r["rule"] == "far above ln C":
            parts.append(f"the {loss_label(col)} sits at {fmt(r['late_median'])} (median, {unit}s ≥ "
                         f"{r['window_start_step']:.4g}), {r['times_ln_c']:.3g}× ln C = {math.log(C):.3g} (the loss of "
                         "a uniform guess)")
        else:
            parts.append(f"the {loss_label(col)} grows geometrically from {fmt(r['min'])} ({unit} {r['min_step']:.0f}) "
                         f"to {fmt(r['end'])} ({r['factor']:.3g}×, t = {r['t_stat']:.1f} on log loss)")
    return Finding("divergence", "error",
                   "; ".join(parts) + ": the outputs blew up (a too-high LR, no gradient clipping, fp16 overflow, "
                   "or unnormalised inputs)", {"losses": found, "num_classes": C, "step_unit": unit})


# --- unstable

def _oscillation(d: pd.DataFrame, col: str, C) -> dict | None:
    half = d.iloc[len(d) // 2:]
    v = half[col].to_numpy(dtype=float)
    dv = np.diff(v)
    scale = math.log(C)
    if len(dv) < 2 or float(np.median(v)) >= DIVERGENCE_LNC_FACTOR * scale:
        return None  # swings of a loss that blew up are `divergence`
    swing = float(np.median(np.abs(dv)))
    signs = np.sign(dv[dv != 0])
    flips = float((signs[1:] != signs[:-1]).mean()) if len(signs) > 1 else 0.0
    fit = fit_growth(half["step"].to_numpy(dtype=float), v)
    t = 0.0 if fit is None else fit.t_stat
    if swing < UNSTABLE_SWING * scale or flips < UNSTABLE_SIGN_CHANGES or abs(t) >= UNSTABLE_T_STAT:
        return None
    return {"median_swing": swing, "scale": scale, "scale_is": "ln C", "sign_changes": flips,
            "t_stat": t, "min": float(v.min()), "max": float(v.max()), "from_step": float(half["step"].iloc[0]),
            "to_step": float(half["step"].iloc[-1]), "records": int(len(v))}


def check_unstable(log: RunLog, C) -> Finding | None:
    """A per-epoch training loss that, over the second half of the run, swings up and down by 0.05·ln C from
    epoch to epoch with no trend: the optimisation is not settling."""
    if not C:
        return None  # the swing is measured against ln C: without it a low, noisy loss would read as unstable
    # The training loss averaged over each epoch: a per-step loss swings with each mini-batch, and a
    # validation loss with the few thousand images it is measured on, by design.
    if log.step_unit not in ("epoch", "record"):
        return None
    found = {}
    for col in data_losses(log.steps):
        d = series(log.steps, col)
        if len(d) >= UNSTABLE_MIN_RECORDS and (r := _oscillation(d, col, C)) is not None:
            found[col] = r
    if not found:
        return None
    unit = log.step_unit
    parts = [f"the {loss_label(c)} swings between {fmt(r['min'])} and {fmt(r['max'])} over {unit}s "
             f"{r['from_step']:.0f}–{r['to_step']:.0f} (median step-to-step change {fmt(r['median_swing'])} = "
             f"{r['median_swing'] / r['scale']:.2g} × {r['scale_is']}, direction flips in {r['sign_changes']:.0%} of "
             f"records, no trend: t = {r['t_stat']:.1f})" for c, r in found.items()]
    return Finding("unstable", "warning",
                   "; ".join(parts) + ": the optimisation oscillates instead of converging (an LR too high for the "
                   "batch size, a batch too small, or noisy labels)", {"losses": found, "num_classes": C, "step_unit": unit})
