"""Checks on what the run learned: branches at chance, the uncertainty weights (at chance, clamped),
accuracy that collapses, the LR rule and the optimiser's weight decay."""
from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

from dcal.schedule import global_batch_size, lr_for_rule

from ..curves import uncertainty_state
from ..runlog import RunLog, config_get
from ..stats import BRANCHES, finite, has_values
from .common import (
    LABEL,
    acc_label,
    data_losses,
    fmt,
    int_or_none,
    is_branch_column,
    late_start,
    longest_streak,
    loss_label,
    series,
)
from .findings import Finding
from .rules import (
    BOUND_ATOL,
    CHANCE_ACC_FACTOR,
    CHANCE_ACC_OVERRULES,
    CHANCE_LOSS_FRACTION,
    CHANCE_MIN_LATE_RECORDS,
    CHANCE_W_TOLERANCE,
    COLLAPSE_FRACTION,
    DIVERGENCE_LNC_FACTOR,
    EQUILIBRIUM_W_TOLERANCE,
    FROZEN_MIN_FRACTION,
    FROZEN_MIN_STEPS,
    LR_RULE_RATIO,
    PINNED_MIN_FRACTION,
    PINNED_MIN_STEPS,
)

__all__ = ["check_chance", "check_uncertainty_at_chance", "check_clamped", "check_collapse", "check_lr_rule",
           "check_coupled_wd", "CHANCE_ACC_FACTOR", "COLLAPSE_FRACTION", "BOUND_ATOL", "PINNED_MIN_STEPS",
           "PINNED_MIN_FRACTION", "FROZEN_MIN_STEPS", "FROZEN_MIN_FRACTION", "LR_RULE_RATIO",
           "EQUILIBRIUM_W_TOLERANCE", "ACCURACY_COLUMNS"]

# The accuracies the collapse and chance checks read: this project's eval names, and an imported log's
# validation accuracy.
ACCURACY_COLUMNS = ("acc_fused", "acc_sa", "acc_glca", "val_acc")


def check_chance(log: RunLog, C) -> Finding | None:
    """Late in the run, a training loss at ln C (DCAL's branch losses, or a plain loss) or an accuracy at
    most 1.5/C: the model (or those branches) is not learning. A loss ten times ln C is `divergence`."""
    start = late_start(log)
    if not C or start is None:
        return None
    lnC, acc_chance = math.log(C), CHANCE_ACC_FACTOR / C
    losses, accs, above = {}, {}, {}
    # Training accuracy only when no validation accuracy is logged: under mixup or cutmix it is measured
    # against mixed targets and sits low in a healthy run (at C = 2, under 1.5/C = 0.75).
    validated = any(has_values(log.evals, c) for c in ACCURACY_COLUMNS)
    for df, cols in ((log.evals, ACCURACY_COLUMNS), (log.steps, ("train_acc",))):
        for col in cols:
            late = series(df, col, start)[col]
            if len(late) and float(late.max()) <= acc_chance and (df is log.evals or not validated):
                accs[col] = float(late.max())
            elif len(late) and float(late.median()) >= 1 / C + CHANCE_ACC_OVERRULES * (1 - 1 / C):
                above[col] = float(late.median())
    for col in _chance_losses(log):
        late = series(log.steps, col, start)[col]
        if len(late) >= CHANCE_MIN_LATE_RECORDS and not above:  # an accuracy above chance outweighs a loss
            med = float(late.median())
            if CHANCE_LOSS_FRACTION * lnC <= med < DIVERGENCE_LNC_FACTOR * lnC:
                losses[col] = med
    if not losses and not accs:
        return None
    parts = [f"{loss_label(c)} {fmt(v)} (median) ≥ {CHANCE_LOSS_FRACTION:g}·ln C = "
             f"{fmt(CHANCE_LOSS_FRACTION * lnC)}" for c, v in losses.items()]
    parts += [f"{acc_label(c)} accuracy at most {fmt(v)} ≤ {CHANCE_ACC_FACTOR:g}/C = {fmt(acc_chance)}"
              for c, v in accs.items()]
    branches = any(is_branch_column(c) for c in (*losses, *accs))
    what = "these branches are not learning" if branches else "the model is not learning: it does no better than a uniform guess"
    unit = log.step_unit
    return Finding("chance-level", "error",
                   f"late in the run ({unit}s ≥ {start:.4g}), with C = {C} (ln C = {lnC:.2f}): " + "; ".join(parts)
                   + f": {what}",
                   {"num_classes": C, "ln_c": lnC, "window_start_step": start, "step_unit": unit,
                    "loss_median": {c.removeprefix("loss_"): v for c, v in losses.items()},
                    "acc_max": {c.removeprefix("acc_"): v for c, v in accs.items()},
                    "chance_accuracy_threshold": acc_chance, "chance_loss_threshold": CHANCE_LOSS_FRACTION * lnC})


def _chance_losses(log: RunLog) -> list[str]:
    """The losses a chance reading applies to: `data_losses`, but not a plain loss of a run that logs DCAL's
    branches (its total is a sum over the branches, not one cross-entropy)."""
    cols = data_losses(log.steps)
    branched = any(is_branch_column(c) and has_values(df, c) for df in (log.steps, log.evals) for c in df.columns)
    return [c for c in cols if c != "loss" or not branched]


def at_equilibrium(st: dict) -> bool | None:
    """Every w_i within EQUILIBRIUM_W_TOLERANCE of log L_i; None when a branch loss was not logged."""
    gaps = [v["w"] - v["equilibrium_w"] if v["equilibrium_w"] is not None else None
            for v in st["branches"].values()]
    if any(g is None for g in gaps):
        return None
    return all(abs(g) <= EQUILIBRIUM_W_TOLERANCE for g in gaps)


def check_uncertainty_at_chance(log: RunLog, C) -> Finding | None:
    """½·e^(−w) ≈ ½/ln C read as "every branch at chance": only for weights at their equilibrium log L_i
    (weights still on their way say how far they got, not what the losses are: `uncertainty-lag`)."""
    st = uncertainty_state(log.steps, C) if C else None
    if not st or not st["weights_at_chance"]:
        return None
    # w that never moved from an init that happens to equal log ln C (C ≈ 15 with init 0) says nothing.
    if all(v["w_range"] < 0.05 for v in st["branches"].values()):
        return None
    if st["losses_at_chance"] is False or at_equilibrium(st) is False:
        return None  # the weights lag behind the losses: the reading does not apply
    weights = {b: v["effective_weight"] for b, v in st["branches"].items()}
    evidence = {"num_classes": C, "chance_weight": st["chance_weight"], "chance_w": st["chance_w"],
                "w": {b: v["w"] for b, v in st["branches"].items()}, "effective_weight": weights,
                "loss": {b: v["loss"] for b, v in st["branches"].items()}, "tolerance_w": CHANCE_W_TOLERANCE,
                "equilibrium_tolerance_w": EQUILIBRIUM_W_TOLERANCE}
    ws = ", ".join(f"{LABEL[b]} {w:.3f}" for b, w in weights.items())
    if st["losses_at_chance"]:
        return Finding("uncertainty-at-chance", "error",
                       f"effective weights ½·e^(−w) = {ws} ≈ ½/ln C = {st['chance_weight']:.3f} (C = {C}), and "
                       f"every w_i is at its equilibrium log L_i (within {EQUILIBRIUM_W_TOLERANCE:g}): every branch "
                       f"loss is ≈ ln C = {math.log(C):.2f}, every branch at chance. The weights are a symptom, not "
                       "the cause; bounds or a new init will not fix it", evidence)
    return Finding("uncertainty-at-chance", "warning",
                   f"effective weights ½·e^(−w) = {ws} ≈ ½/ln C = {st['chance_weight']:.3f} (C = {C}): if the "
                   "weights have reached their equilibrium log L_i, every branch is at chance (the branch losses "
                   "were not logged: whether they have cannot be told)", evidence)


def check_clamped(log: RunLog, C) -> Finding | None:
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
        if has_values(steps, col):
            w = steps[col].to_numpy(dtype=float)
            found = _pinned_at_bounds(w, bounds, n) if bounds is not None else _frozen(w, n)
            if found:
                i = found.pop("index")
                pinned[b] = {**found, "from_step": int(steps["step"].iloc[i])}
    if not pinned:
        return None
    st = uncertainty_state(steps, C) or {"branches": {}}
    parts = []
    for b, p in pinned.items():
        eq = st["branches"].get(b, {}).get("equilibrium_w")
        p["equilibrium_w"] = eq
        where = (f"the {p['bound']} bound {fmt(p['value'])}" if p["bound"] != "inferred"
                 else f"exactly {fmt(p['value'])} (a clamp bound, inferred: no config)")
        parts.append(f"w_{b} sits at {where} for {p['streak_steps']} consecutive steps from step {p['from_step']} "
                     f"({p['streak_steps'] / n:.0%} of the run)"
                     + (f", its equilibrium log L_{b} = {eq:.2f}" if eq is not None else ""))
    return Finding("uncertainty-clamped", "warning",
                   "; ".join(parts) + ". A clamp holds w away from its optimum log L and zeroes its gradient",
                   {"bounds": bounds, "pinned": pinned, "steps": n})


def _pinned_at_bounds(w: np.ndarray, bounds, n: int) -> dict | None:
    lo, hi = float(bounds[0]), float(bounds[1])
    for name, at in (("lower", w <= lo + BOUND_ATOL), ("upper", w >= hi - BOUND_ATOL)):
        length, i = longest_streak(at)
        if length >= max(PINNED_MIN_STEPS, PINNED_MIN_FRACTION * n):
            return {"bound": name, "value": lo if name == "lower" else hi, "streak_steps": length,
                    "index": i, "steps_at_bound": int(at.sum())}
    return None


def _frozen(w: np.ndarray, n: int) -> dict | None:
    same = np.zeros(n, dtype=bool)
    same[1:] = np.abs(np.diff(w)) <= BOUND_ATOL
    length, i = longest_streak(same)
    i = max(0, i - 1)  # the streak starts at the value the next ones equal
    v = w[i]
    if (length + 1 >= max(FROZEN_MIN_STEPS, FROZEN_MIN_FRACTION * n) and abs(v) > BOUND_ATOL
            and abs(2 * v - round(2 * v)) <= BOUND_ATOL):
        return {"bound": "inferred", "value": float(round(2 * v) / 2), "streak_steps": length + 1,
                "index": i, "steps_at_bound": length + 1}
    return None


def check_collapse(log: RunLog, C) -> Finding | None:
    ev = log.evals
    if ev.empty or "step" not in ev.columns:
        return None
    floor = CHANCE_ACC_FACTOR / C if C else 0.0
    collapsed = {}
    for col in ACCURACY_COLUMNS:
        if not has_values(ev, col):
            continue
        s = ev.loc[np.isfinite(ev[col]) & np.isfinite(pd.to_numeric(ev["step"], errors="coerce")), ["step", col]]
        if s.empty:
            continue
        a = s[col].to_numpy()
        i_best = int(np.argmax(a))
        best = float(a[i_best])
        if best <= floor:
            continue  # never above chance: nothing to collapse from
        below = a < COLLAPSE_FRACTION * best
        tail = np.flatnonzero(~below)
        j = int(tail[-1]) + 1 if len(tail) else 0  # first index of the final run of "below half"
        if j < len(a) and j > i_best:
            collapsed[col.removeprefix("acc_")] = {
                "column": col, "best": best, "best_step": int(s["step"].iloc[i_best]), "final": float(a[-1]),
                "collapse_step": int(s["step"].iloc[j]), "evals_below": int(len(a) - j)}
    if not collapsed:
        return None
    unit = log.step_unit
    parts = [f"{acc_label(c['column'])} accuracy fell from its best {c['best']:.2%} ({unit} {c['best_step']}) to "
             f"{c['final']:.2%} at the end, below half of the best from {unit} {c['collapse_step']} on "
             f"({c['evals_below']} evals)" for c in collapsed.values()]
    return Finding("accuracy-collapse", "error", "; ".join(parts),
                   {"branches": collapsed, "num_classes": C, "step_unit": unit})


def check_lr_rule(log: RunLog, C) -> Finding | None:
    cfg = log.config
    if cfg is None:
        return None
    g = int_or_none(config_get(cfg, "derived", "global_batch"))
    if g is None:
        b = int_or_none(config_get(cfg, "train", "batch_size"))
        if b is None:
            return None
        g = global_batch_size(b, int_or_none(config_get(cfg, "train", "grad_accum_steps")) or 1,
                              int_or_none(config_get(cfg, "derived", "world_size")) or 1)
    lr = config_get(cfg, "derived", "lr")
    logged = float(finite(log.steps["lr"]).max()) if has_values(log.steps, "lr") else None
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


def check_coupled_wd(log: RunLog, C, collapsed: bool, rising: bool = False) -> Finding | None:
    """Adam with coupled L2 weight decay (config train.optimizer 'adam_l2'); an error when the run shows
    what that erosion looks like (an accuracy collapse, a training loss rising at a flat LR)."""
    if config_get(log.config, "train", "optimizer") != "adam_l2":
        return None
    wd = config_get(log.config, "train", "weight_decay")
    if isinstance(wd, numbers.Number) and wd <= 0:
        return None
    lr = config_get(log.config, "derived", "lr")
    msg = (f"train.optimizer = 'adam_l2': Adam with coupled L2 weight decay {wd} adds wd·θ to the gradient, "
           "which Adam normalises, so weights with small gradients shrink by about lr per step and a pretrained "
           "backbone erodes; AdamW decouples the decay")
    seen = [what for what, flag in (("the accuracy collapse", collapsed),
                                     ("the training loss rising at a flat or falling LR", rising)) if flag]
    if seen:
        msg += f". {' and '.join(seen).capitalize()} in this run {'is' if len(seen) == 1 else 'are'} what that " \
               "erosion looks like"
    return Finding("coupled-weight-decay", "error" if seen else "warning", msg,
                   {"optimizer": "adam_l2", "weight_decay": wd, "lr": lr, "accuracy_collapsed": collapsed,
                    "loss_rising": rising})
