"""Training curves: branch losses and eval accuracies, the uncertainty weights, learning-rate schedules.

Every helper is pure: data in (a `RunLog`, a list of metrics.jsonl records, DataFrames, a sequence of
LRs), validated, a matplotlib `Figure` out. The figures are built without pyplot, so nothing is left open
in pyplot's registry and a notebook shows each one once, as the cell's value.

The uncertainty loss L = ½·Σ(e^{−w_i}·L_i + w_i) has its optimum at w_i = log L_i, where the effective
weight ½·e^{−w_i} is ½/L_i. A branch at chance has L_i ≈ ln C, so weights that all sit at ≈ ½/ln C (0.094
for C = 200) are not "too similar": they say that no branch is learning (SEED_FINDINGS.md #4).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dcal.schedule import LR_RULES, global_batch_size, lr_for_rule

from .runlog import RunLog, as_frames
from .stats import BRANCHES, finite, has_values

if TYPE_CHECKING:  # matplotlib loads when a figure is drawn: the doctor reads this module's rules without it
    from matplotlib.figure import Figure

__all__ = [
    "BRANCHES", "plot_curves", "plot_uncertainty", "uncertainty_state", "uncertainty_reading",
    "plot_lr_schedule", "lr_rule_table", "plot_lr_rules",
    "CHANCE_W_TOLERANCE", "CHANCE_LOSS_FRACTION",
]

_BRANCH_LABEL = {"sa": "SA", "glca": "GLCA", "pwca": "PWCA", "fused": "fused"}
# Each branch's colour (seaborn's "deep" palette, written out), the same in every figure.
_PALETTE = dict(zip(BRANCHES + ("fused", "total"), ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"), strict=True))


# Markers for lines told apart by style as well as colour (`plot_lr_rules`).
_MARKERS = ("o", "X", "s", "P", "D", "^", "v", "*")


def _line(ax, x, y, **kwargs):
    """One line through the finite points of (x, y), sorted by x; `kwargs` go to ``ax.plot``."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(x[keep], kind="stable")
    return ax.plot(x[keep][order], y[keep][order], **kwargs)


def _lines_by(ax, data: pd.DataFrame, x: str, y: str, by: str, palette: dict | None = None,
              markers: bool = False, **kwargs) -> None:
    """One `_line` per value of column `by` (in order of appearance), labelled by it; colours from `palette`
    or the axes' colour cycle."""
    for i, (name, group) in enumerate(data.groupby(by, sort=False)):
        style = dict(kwargs)
        if palette is not None:
            style["color"] = palette[name]
        if markers:
            style["marker"] = _MARKERS[i % len(_MARKERS)]
        _line(ax, group[x], group[y], label=str(name), **style)


DEFAULT_LOSSES = ("loss_sa", "loss_glca", "loss_pwca")
DEFAULT_ACCURACIES = ("acc_sa", "acc_glca", "acc_fused")


# --- validation and small helpers

def _require_rows(df: pd.DataFrame, what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what}: expected a DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError(f"{what}: no records to plot (the frame is empty)")


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; available: {sorted(map(str, df.columns))}")


def _auto_window(n: int) -> int:
    """Rolling-mean window for per-step series: about 1/50 of the run, at least 1."""
    return max(1, n // 50)


def _smooth(s: pd.Series, window: int) -> pd.Series:
    s = pd.to_numeric(s, errors="coerce").astype(float)  # as `has_values` reads a column: unparseable → NaN
    s = s.where(np.isfinite(s))  # ±inf would poison every window it falls in
    return s if window <= 1 else s.rolling(window, min_periods=1).mean()


def _check_smooth(smooth) -> None:
    if smooth is not None and (not isinstance(smooth, int) or isinstance(smooth, bool) or smooth < 1):
        raise ValueError(f"smooth must be None (automatic) or a window of >= 1 steps, got {smooth!r}")


def _num_classes(data, num_classes: int | None) -> int | None:
    if num_classes is None and isinstance(data, RunLog):
        num_classes = data.num_classes
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return None if num_classes is None else int(num_classes)


def _figure(ncols: int, width: float = 4.6, height: float = 3.4) -> tuple[Figure, list]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _label(col: str) -> str:
    kind, _, branch = col.partition("_")
    return f"{kind} {_BRANCH_LABEL.get(branch, branch)}" if branch else col


# --- loss and accuracy curves

def _resolve_metrics(steps: pd.DataFrame, evals: pd.DataFrame, metrics) -> tuple[list[str], list[str]]:
    """Split requested metric names into step and eval columns. ``eval/NAME`` or ``step/NAME`` forces the
    source; a bare name is looked up in the step records first (loss_sa lives in both)."""
    if metrics is None:
        return ([c for c in DEFAULT_LOSSES if has_values(steps, c)],
                [c for c in DEFAULT_ACCURACIES if has_values(evals, c)])
    if isinstance(metrics, str):
        metrics = [metrics]
    step_cols, eval_cols, missing = [], [], []
    for m in metrics:
        source, _, name = m.partition("/") if "/" in m else ("", "", m)
        if source not in ("", "step", "eval"):
            raise ValueError(f"metric {m!r}: the prefix must be 'step/' or 'eval/'")
        if source in ("", "step") and name in steps.columns:
            step_cols.append(name)
        elif source in ("", "eval") and name in evals.columns:
            eval_cols.append(name)
        else:
            missing.append(m)
    if missing:
        raise ValueError(f"metric(s) {missing} not in the records; step columns: {sorted(map(str, steps.columns))}, "
                         f"eval columns: {sorted(map(str, evals.columns))}")
    for df, cols in ((steps, step_cols), (evals, eval_cols)):
        bad = [c for c in cols if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise ValueError(f"metric(s) {bad} are not numeric and cannot be plotted")
    return step_cols, eval_cols


def _long(df: pd.DataFrame, cols: Sequence[str], window: int) -> pd.DataFrame:
    parts = []
    for c in cols:
        y = _smooth(df[c], window)
        parts.append(pd.DataFrame({"step": df["step"].to_numpy(), "value": y.to_numpy(), "metric": c}))
    return pd.concat(parts, ignore_index=True).dropna(subset=["value"])


def plot_curves(log, metrics: Sequence[str] | str | None = None, *, smooth: int | None = None,
                num_classes: int | None = None) -> Figure:
    """Per-step metrics (default: the branch losses) and per-eval metrics (default: accuracy of SA, GLCA
    and the fused prediction) against the optimiser step.

    Args:
        log: a `RunLog`, a list of metrics.jsonl records, a (steps, evals) tuple or dict, or a DataFrame of
            step records.
        metrics: column names to plot; ``eval/loss_sa`` picks the eval column where a name is in both.
            Default: the branch losses and accuracies the records hold values for.
        smooth: rolling-mean window for per-step metrics (None: about 1/50 of the run; 1: raw).
        num_classes: draws chance accuracy 1/C (taken from a `RunLog` when not given).
    """
    _check_smooth(smooth)
    steps, evals = as_frames(log)
    C = _num_classes(log, num_classes)
    if steps.empty and evals.empty:
        raise ValueError("plot_curves: no step or eval records to plot (both frames are empty)")
    step_cols, eval_cols = _resolve_metrics(steps, evals, metrics)
    if not step_cols and not eval_cols:
        raise ValueError("plot_curves: none of the default metrics "
                         f"{list(DEFAULT_LOSSES + DEFAULT_ACCURACIES)} has a value in the records; pass metrics=")
    if step_cols:
        _require_columns(steps, ["step"], "plot_curves (step records)")
    if eval_cols:
        _require_columns(evals, ["step"], "plot_curves (eval records)")
    panels = [p for p in (("step", steps, step_cols), ("eval", evals, eval_cols)) if p[2]]
    fig, axes = _figure(len(panels))
    for ax, (source, df, cols) in zip(axes, panels):
        window = (smooth or _auto_window(len(df))) if source == "step" else 1
        data = _long(df, cols, window)
        if data.empty:
            ax.text(0.5, 0.5, f"no finite values for {cols}", ha="center", va="center", transform=ax.transAxes)
        else:
            branch = [c.rpartition("_")[2] for c in cols]
            palette = ({c: _PALETTE[b] for c, b in zip(cols, branch)}  # a branch keeps its colour everywhere
                       if all(b in _PALETTE for b in branch) and len(set(branch)) == len(cols) else None)
            _lines_by(ax, data, "step", "value", "metric", palette=palette,
                      marker="o" if source == "eval" else None, markersize=4)
            ax.legend(title=None, fontsize="small")
            if all(c.startswith("acc") for c in cols):
                ax.set_ylim(bottom=0)
        if source == "eval" and C and any(c.startswith("acc") for c in cols):
            ax.axhline(1.0 / C, color="grey", ls=":", lw=1)
            ax.annotate(f"chance 1/C = {1.0 / C:.3g}", (0.01, 1.0 / C), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize="small", color="grey")
        title = "per optimiser step" + (f" (rolling mean over {window})" if source == "step" and window > 1 else "")
        ax.set(title=title if source == "step" else "per evaluation", xlabel="optimiser step", ylabel=None)
    return fig


# --- uncertainty weights

def uncertainty_state(log_or_df, num_classes: int | None = None, tail: float = 0.1) -> dict | None:
    """The end-of-run state of the uncertainty weights: each column averaged over its last `tail` of values.

    Returns None when no ``w_*`` column has a value. Otherwise a dict: ``branches`` (per active branch:
    ``w``, ``effective_weight`` ½e^{−w}, ``loss``, ``equilibrium_w`` log L, ``w_range`` over the run),
    ``num_classes``, ``chance_loss`` ln C, ``chance_w`` log ln C, ``chance_weight`` ½/ln C,
    ``weights_at_chance`` (every |w_i − log ln C| ≤ CHANCE_W_TOLERANCE), ``losses_at_chance`` (every
    L_i ≥ CHANCE_LOSS_FRACTION·ln C), each None when it cannot be told.
    """
    steps, _ = as_frames(log_or_df)
    C = _num_classes(log_or_df, num_classes)
    branches = [b for b in BRANCHES if has_values(steps, f"w_{b}")]
    if not branches:
        return None
    state: dict = {"branches": {}, "num_classes": C}
    for b in branches:
        w_all = finite(steps[f"w_{b}"])
        k = max(min(5, len(w_all)), int(len(w_all) * tail))  # the last `tail` of the logged values
        w = float(w_all.iloc[-k:].mean())
        loss = None
        if has_values(steps, f"loss_{b}"):
            l_all = finite(steps[f"loss_{b}"])
            loss = float(l_all.iloc[-max(min(5, len(l_all)), int(len(l_all) * tail)):].mean())
        state["branches"][b] = {
            "w": w, "effective_weight": 0.5 * math.exp(min(-w, 700.0)), "loss": loss,
            "equilibrium_w": math.log(loss) if loss and loss > 0 else None,
            "w_range": float(w_all.max() - w_all.min()),
        }
    if C:
        lnC = math.log(C)
        state.update(chance_loss=lnC, chance_w=math.log(lnC), chance_weight=0.5 / lnC)
        bs = state["branches"].values()
        state["weights_at_chance"] = all(abs(v["w"] - math.log(lnC)) <= CHANCE_W_TOLERANCE for v in bs)
        losses = [v["loss"] for v in bs]
        state["losses_at_chance"] = (None if any(x is None for x in losses)
                                     else all(x >= CHANCE_LOSS_FRACTION * lnC for x in losses))
    else:
        state.update(chance_loss=None, chance_w=None, chance_weight=None, weights_at_chance=None,
                     losses_at_chance=None)
    return state


def uncertainty_reading(log_or_df, num_classes: int | None = None) -> str | None:
    """What the weights say, in one sentence; None when no ``w_*`` values were logged.

    "weights ≈ ½/ln(C): every branch at chance" when every effective weight sits near ½/ln C and every
    branch loss near ln C; otherwise the weights and the losses they balance.
    """
    st = uncertainty_state(log_or_df, num_classes)
    if st is None:
        return None
    bs = st["branches"]
    weights = ", ".join(f"{_BRANCH_LABEL[b]} {v['effective_weight']:.3f}" for b, v in bs.items())
    if st["weights_at_chance"] and st["losses_at_chance"]:
        return (f"weights ≈ ½/ln(C) = {st['chance_weight']:.3f} (C = {st['num_classes']}): every branch at "
                f"chance (effective weights {weights}; losses ≈ ln C = {st['chance_loss']:.2f})")
    if st["weights_at_chance"] and st["losses_at_chance"] is None:
        return (f"weights ≈ ½/ln(C) = {st['chance_weight']:.3f} (C = {st['num_classes']}): at equilibrium "
                f"this means every branch at chance (effective weights {weights}; losses not logged)")
    losses = [v["loss"] for v in bs.values()]
    if any(x is None for x in losses):
        return f"effective weights ½·e^(−w): {weights}"
    gaps = ", ".join(f"{_BRANCH_LABEL[b]} {v['w']:+.2f} vs {v['equilibrium_w']:+.2f}"
                     for b, v in bs.items() if v["equilibrium_w"] is not None)
    return (f"effective weights ½·e^(−w): {weights}; w_i vs their equilibrium log L_i: {gaps}"
            + (f" (chance would be ½/ln C = {st['chance_weight']:.3f})" if st["chance_weight"] else ""))


def plot_uncertainty(log, *, num_classes: int | None = None, smooth: int | None = None) -> Figure:
    """Three panels against the step: w_i with their equilibrium log L_i (smoothed, dashed); the effective
    weights ½·e^{−w_i} with ½/ln C; the branch losses with ln C. The reading is the figure's title.

    Args:
        log: a `RunLog`, a list of records, a (steps, evals) tuple or dict, or a DataFrame of step records
            with ``step`` and at least one ``w_sa``/``w_glca``/``w_pwca`` column.
        num_classes: C for the chance lines (taken from a `RunLog` when not given).
        smooth: rolling-mean window for the losses (None: about 1/50 of the run).
    """
    _check_smooth(smooth)
    steps, _ = as_frames(log)
    C = _num_classes(log, num_classes)
    _require_rows(steps, "plot_uncertainty (step records)")
    _require_columns(steps, ["step"], "plot_uncertainty")
    branches = [b for b in BRANCHES if has_values(steps, f"w_{b}")]
    if not branches:
        raise ValueError("plot_uncertainty: no w_sa/w_glca/w_pwca values in the step records; columns: "
                         f"{sorted(map(str, steps.columns))}")
    window = smooth or _auto_window(len(steps))
    x = steps["step"].to_numpy()
    fig, (ax_w, ax_e, ax_l) = _figure(3)
    for b in branches:
        color, name = _PALETTE[b], _BRANCH_LABEL[b]
        w = steps[f"w_{b}"].to_numpy(dtype=float)
        _line(ax_w, x, w, color=color, label=f"w {name}")
        _line(ax_e, x, 0.5 * np.exp(-w), color=color, label=name)
        if has_values(steps, f"loss_{b}"):
            loss = _smooth(steps[f"loss_{b}"], window)
            _line(ax_l, x, loss.to_numpy(), color=color, label=name)
            log_loss = np.log(loss.where(loss > 0)).to_numpy()
            ax_w.plot(x, log_loss, color=color, ls="--", lw=1, label=f"log L {name}")
    if C:
        lnC = math.log(C)
        for ax, y, text in ((ax_w, math.log(lnC), "log ln C"), (ax_e, 0.5 / lnC, "½/ln C"), (ax_l, lnC, "ln C")):
            ax.axhline(y, color="grey", ls=":", lw=1)
            ax.annotate(f"{text} = {y:.3g}", (0.01, y), xycoords=("axes fraction", "data"), va="bottom",
                        fontsize="small", color="grey")
    ax_w.set(title="w_i (solid) and equilibrium log L_i (dashed)", xlabel="optimiser step", ylabel=None)
    ax_e.set(title="effective weight ½·e^(−w_i)", xlabel="optimiser step", ylabel=None)
    ax_l.set(title="branch loss L_i" + (f" (rolling mean over {window})" if window > 1 else ""),
             xlabel="optimiser step", ylabel=None)
    for ax in (ax_w, ax_e, ax_l):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if not ax_l.lines:
        ax_l.text(0.5, 0.5, "no branch losses logged", ha="center", va="center", transform=ax_l.transAxes)
    reading = uncertainty_reading(steps, C)
    if reading:
        fig.suptitle(reading, fontsize="medium", wrap=True)
    return fig


# --- learning rates

def plot_lr_schedule(lrs, *, steps: Sequence[int] | None = None, warmup_steps: int | None = None,
                     reference_lr: float | None = None, log_scale: bool = False) -> Figure:
    """The LR at every optimiser step, as the scheduler produced it (e.g. from ``dcal.train.dry_run_lr``
    or the ``lr`` column of the step records).

    Args:
        lrs: a sequence of per-step LRs, or a mapping label → sequence to compare schedules.
        steps: the step of each LR (default 0, 1, ...); only with a single sequence.
        warmup_steps: draws the end of warm-up.
        reference_lr: draws a reference peak (e.g. 5e-4·global_batch/512).
        log_scale: a logarithmic LR axis (to compare rules an order of magnitude apart).
    """
    series = dict(lrs) if isinstance(lrs, Mapping) else {"lr": lrs}
    if not series:
        raise ValueError("plot_lr_schedule: no schedules given")
    if steps is not None and len(series) != 1:
        raise ValueError("plot_lr_schedule: steps= applies to a single sequence of LRs, not a mapping")
    frames = []
    for label, values in series.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise TypeError(f"plot_lr_schedule: {label!r} must be a sequence of LRs, got {type(values).__name__}")
        y = np.asarray(values, dtype=float).reshape(-1)
        if y.size == 0:
            raise ValueError(f"plot_lr_schedule: {label!r} holds no LR values")
        if not np.isfinite(y).all() or (y < 0).any():
            bad = int(np.flatnonzero(~np.isfinite(y) | (y < 0))[0])
            raise ValueError(f"plot_lr_schedule: {label!r} has a non-finite or negative LR {y[bad]} at index {bad}")
        x = np.arange(y.size) if steps is None else np.asarray(steps)
        if x.shape != y.shape:
            raise ValueError(f"plot_lr_schedule: {x.size} steps for {y.size} LRs")
        frames.append(pd.DataFrame({"step": x, "lr": y, "schedule": str(label)}))
    data = pd.concat(frames, ignore_index=True)
    fig, (ax,) = _figure(1, width=6.0)
    _lines_by(ax, data, "step", "lr", "schedule")
    if len(series) > 1:
        ax.legend(fontsize="small")
    if warmup_steps:
        ax.axvline(warmup_steps, color="grey", ls=":", lw=1)
        ax.annotate(f"end of warm-up ({warmup_steps})", (warmup_steps, 0.02), xycoords=("data", "axes fraction"),
                    fontsize="small", color="grey", ha="left")
    if reference_lr is not None:
        ax.axhline(reference_lr, color="black", ls="--", lw=1)
        ax.annotate(f"reference {reference_lr:.3g}", (0.99, reference_lr), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize="small")
    peak = data["lr"].max()
    ax.set(title=f"learning rate per optimiser step (peak {peak:.3g})", xlabel="optimiser step", ylabel="lr")
    if log_scale:
        ax.set_yscale("log")
    return fig


def lr_rule_table(batch_sizes: Sequence[int], grad_accum_steps: int = 1, world_size: int = 1) -> pd.DataFrame:
    """The peak LR each rule of `dcal.schedule.LR_RULES` (except ``fixed``) gives for each micro-batch
    size: columns batch_size, grad_accum_steps, world_size, global_batch, rule, lr (one row per pair)."""
    sizes = [batch_sizes] if isinstance(batch_sizes, (int, np.integer)) else list(batch_sizes)
    if not sizes:
        raise ValueError("lr_rule_table: no batch sizes given")
    for name, v in [("batch size", b) for b in sizes] + [("grad_accum_steps", grad_accum_steps),
                                                         ("world_size", world_size)]:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"lr_rule_table: {name} must be a positive int, got {v!r}")
    rows = [
        {"batch_size": int(b), "grad_accum_steps": grad_accum_steps, "world_size": world_size,
         "global_batch": global_batch_size(int(b), grad_accum_steps, world_size), "rule": rule,
         "lr": lr_for_rule(rule, batch_size=int(b), grad_accum_steps=grad_accum_steps, world_size=world_size)}
        for b in sizes for rule in LR_RULES if rule != "fixed"
    ]
    return pd.DataFrame(rows)


def plot_lr_rules(table: pd.DataFrame, *, x: str = "batch_size") -> Figure:
    """The LR of each rule against the batch size (log-log), from `lr_rule_table`."""
    _require_rows(table, "plot_lr_rules")
    _require_columns(table, [x, "rule", "lr"], "plot_lr_rules")
    if not np.isfinite(table["lr"]).all() or (table["lr"] <= 0).any():
        raise ValueError("plot_lr_rules: every lr must be finite and positive (the axes are logarithmic)")
    fig, (ax,) = _figure(1, width=6.0)
    _lines_by(ax, table, x, "lr", "rule", markers=True)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title="peak LR per rule", xlabel=x.replace("_", " "), ylabel="lr")
    ax.legend(title=None, fontsize="small")
    return fig


# The chance thresholds are the doctor's: `diagnostics.doctor.rules` states every threshold and why. Imported
# last: importing it runs `diagnostics.doctor`, whose checks import `uncertainty_state` from this module.
from .doctor.rules import CHANCE_LOSS_FRACTION, CHANCE_W_TOLERANCE  # noqa: E402
