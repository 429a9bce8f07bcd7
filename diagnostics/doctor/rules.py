"""Every threshold the doctor's checks use, in one place, each with its rule and why.

A check module imports its numbers from here; nothing else in `diagnostics.doctor` states a threshold.
C is the number of classes; ln C the cross-entropy of a uniform guess over C classes. "Late" is the late
window: the last third of the run, or after the LR warm-up if that ends later.

The rules, by finding code (severity in brackets):

- ``chance-level`` [error]: late in the run, the best validation accuracy (the training accuracy when no
  validation accuracy is logged) is ≤ CHANCE_ACC_FACTOR/C; or the median of a training loss (a plain ``loss``, or each of DCAL's branch
  losses) over at least CHANCE_MIN_LATE_RECORDS records is ≥ CHANCE_LOSS_FRACTION·ln C (and below
  DIVERGENCE_LNC_FACTOR·ln C, which is ``divergence``), unless a late accuracy overrules it
  (CHANCE_ACC_OVERRULES). A plain loss of a run that logs DCAL's branches is their sum: not read.
- ``accuracy-collapse`` [error]: a validation accuracy that was above chance ends, and stays to the end,
  below COLLAPSE_FRACTION of its best.
- ``accuracy-regression`` [warning]: short of a collapse, the last REGRESSION_MIN_EVALS evaluations all sit
  at least REGRESSION_MIN_DROP (absolute) and REGRESSION_MIN_FRACTION (of the best) below the best level (the
  highest median of 3 consecutive evaluations, so one lucky evaluation is no best): the run lost what it had
  learned and did not get it back.
- ``overfitting`` [warning]: the validation loss rises for at least OVERFIT_MIN_EVALS evaluations after its
  minimum, ends (median of the last OVERFIT_MIN_EVALS) ≥ (1 + OVERFIT_MIN_RISE_FRACTION)·minimum and
  ≥ OVERFIT_MIN_RISE_SCALE·ln C above it (without C: of the first validation loss), while the training loss
  falls to ≤ OVERFIT_TRAIN_FALL of its value at the minimum, and validation accuracy (when logged) has not gained
  OVERFIT_ACC_STILL_GAINS since. Without a validation loss: the train − validation
  accuracy gap widens by ≥ OVERFIT_GAP_WIDENING to at least OVERFIT_GAP_MIN while validation accuracy stalls
  (gains < OVERFIT_VAL_STALL).
- ``divergence`` [error]: late in the run, the median of a loss (training or validation) is
  ≥ DIVERGENCE_LNC_FACTOR·ln C; or a loss grows geometrically: over its last DIVERGENCE_MIN_RECORDS or more
  records log(loss) rises with a slope ≥ DIVERGENCE_T_STAT standard errors above 0, to
  ≥ DIVERGENCE_GROWTH_FACTOR × its minimum and at least ln C (without C: its first value).
- ``unstable`` [warning]: on a per-epoch training loss only, over the second half of a run of at least
  UNSTABLE_MIN_RECORDS records: the loss swings by a median |Δ| ≥ UNSTABLE_SWING·ln C between consecutive records, the direction of the swings changes in ≥ UNSTABLE_SIGN_CHANGES of them, and the
  half has no trend (|t| of a linear fit < UNSTABLE_T_STAT).
- ``truncated-log`` [warning]: the log states its planned length (epochs or steps) and reaches less than
  that (epochs: the last epoch logged is below the plan, counted from 0 or from 1 as the log counts; steps:
  short by more than one logging interval and more than TRUNCATED_STEP_FRACTION of the plan), and has neither
  a completion line nor an error. (Also: a run folder's truncated last line.)
- ``loss-rising`` [warning], ``uncertainty-lag`` [warning], ``uncertainty-at-chance`` [error/warning],
  ``uncertainty-clamped`` [warning], ``memory-growth`` [warning/error], ``lr-rule`` [warning]: DCAL's and
  this trainer's rules, with their numbers below.
"""
from __future__ import annotations

# --- the late window

LATE_FRACTION = 2 / 3
"""The late window starts at this fraction of the run (or at the end of warm-up, if later): early steps are
at chance by construction."""

# --- chance-level

CHANCE_ACC_FACTOR = 1.5
"""Accuracy at or under 1.5/C is chance: a small eval set puts a uniform guess anywhere in about 0.5–1.5/C."""
CHANCE_LOSS_FRACTION = 0.9
"""A loss ≥ 0.9·ln C is at (or worse than) the loss of a uniform guess. Only training losses are read: an
overfit model's validation loss can sit above ln C while it predicts well above chance."""
CHANCE_MIN_LATE_RECORDS = 2
"""A loss is read at chance from at least 2 late records: one record is a moment, not a level."""
CHANCE_ACC_OVERRULES = 0.5
"""A late accuracy whose median is at least halfway from chance to perfect (1/C + 0.5·(1 − 1/C)) overrules a
loss at ln C: the accuracy is the direct reading, and a loss that high beside it is a matter of the loss's
scale (label smoothing, mixup targets, a sum over several heads), not of learning. The seed's 1.17 %
at C = 200, or 57 % at C = 2, does not overrule."""
CHANCE_W_TOLERANCE = 0.2
"""|w_i − log ln C| ≤ 0.2 ⇔ effective weight within −18 %/+22 % of ½/ln C. Wide enough for the seed's
"≈ 0.08" with C = 200 (15 % under 0.094, since its losses sat a little above ln C)."""
EQUILIBRIUM_W_TOLERANCE = 0.25
"""w_i has reached its equilibrium log L_i when within 0.25 of it (e^0.25 = 1.28: the effective weight within
28 % of 1/L_i). Only then does ½·e^(−w) read as ½/L_i, and ½/ln C as "at chance"."""

# --- accuracy-collapse and accuracy-regression

COLLAPSE_FRACTION = 0.5
"""Accuracy below half of its best, to the end of the run, is a collapse (the seed's 15.38 % → 1.17 %)
rather than noise, which moves accuracy by a few points."""
REGRESSION_MIN_DROP = 0.05
"""5 points of accuracy (0.05 as a fraction) below the best: more than the eval noise of a few thousand
images (±1–2 points) and than the dips of a run that recovers."""
REGRESSION_MIN_FRACTION = 0.10
"""…and at least 10 % of the best (a 5-point drop from 20 % is a regression; a drop from 95 % to 90 % too)."""
REGRESSION_MIN_EVALS = 3
"""The last 3 evaluations all below the line: one low evaluation at the end is noise, three in a row is a
level the run settled at (DeiT's log: ~100 epochs at 60–65 % after a best of 77.8 %)."""

# --- overfitting

OVERFIT_MIN_EVALS = 3
"""Several evaluations: at least 3 after the validation loss's minimum, and the last 3 (their median) are the
level it ended at."""
OVERFIT_MIN_RISE_FRACTION = 0.25
"""The validation loss ends ≥ 25 % above its minimum (the pokemon log: 2.97 → 5.71, +92 %)."""
OVERFIT_MIN_RISE_SCALE = 0.1
"""…and by ≥ 0.1·ln C (without C: 0.1 × the first validation loss): a validation loss that goes 0.024 →
0.04 at 99 % accuracy (road-surface) is noise at the scale of the task, not overfitting."""
OVERFIT_TRAIN_FALL = 0.9
"""Meanwhile the training loss falls: it ends ≤ 90 % of its value at the validation minimum."""
OVERFIT_ACC_STILL_GAINS = 0.05
"""…unless validation accuracy still climbs: its last evaluations (median of OVERFIT_MIN_EVALS) 5 points or more
above its value at the loss's minimum is over-confidence, and stopping at the minimum would cost that accuracy
(pokemon's accuracy gains 3 points after the minimum: overfitting)."""
OVERFIT_GAP_MIN = 0.2
"""Without a validation loss: the train − validation accuracy gap ends ≥ 0.2 (20 points) …"""
OVERFIT_GAP_WIDENING = 0.1
"""… having widened by ≥ 0.1 since the first half of the run …"""
OVERFIT_VAL_STALL = 0.01
"""… while validation accuracy gained < 1 point over the first half's best."""

# --- divergence

DIVERGENCE_LNC_FACTOR = 10.0
"""A late median loss ≥ 10·ln C: ten times the loss of a uniform guess is not a model at chance but one
whose outputs blew up (grape-vine's validation loss 10⁸ against ln 5 = 1.6). An overfit model's validation
loss (a few × ln C at most) stays below."""
DIVERGENCE_GROWTH_FACTOR = 10.0
"""Geometric growth: the loss ends ≥ 10× its minimum (an order of magnitude; overfitting doubles it)."""
DIVERGENCE_MIN_RECORDS = 4
"""…over at least 4 records after the minimum (three intervals: a trend, not a spike)."""
DIVERGENCE_T_STAT = 3.0
"""…with log(loss) rising by a slope ≥ 3 standard errors above 0, and ending at or above ln C (without C:
above its first value): a validation loss that grows from 0.01 to 0.1 at 99 % accuracy has not blown up."""

# --- unstable

UNSTABLE_MIN_RECORDS = 10
"""At least 10 per-epoch records: the second half then holds 5 swings to count."""
UNSTABLE_SWING = 0.05
"""Median |Δloss| between consecutive records ≥ 0.05·ln C (AUTOTRAINER's oscillating case: 0.07; the noisy
but healthy road-surface validation loss: 0.007). Needs C: against the loss's own level, a low healthy loss
swings as much in relative terms. Only a per-epoch training loss is read: an average over the epoch's
mini-batches is smooth in a healthy run, while a per-step loss swings with each mini-batch and a validation
loss with the images it is measured on (road-surface's 0.07 → 3.3 → 0.07), by design."""
UNSTABLE_SIGN_CHANGES = 0.5
"""The direction flips in at least half of the consecutive pairs (a trend flips rarely; noise in about
2/3)."""
UNSTABLE_T_STAT = 2.0
"""No trend: the second half's linear fit has |t| < 2 (a loss still falling, however noisily, is learning)."""

# --- truncated-log

TRUNCATED_STEP_FRACTION = 0.02
"""A log that reaches within 2 % of its planned steps (or within one logging interval) is complete."""

# --- loss-rising

RISE_MIN_RECORDS, RISE_MIN_RUN_FRACTION, RISE_MIN_FRACTION, RISE_T_STAT = 4, 0.2, 0.02, 3.0
"""The rising stretch spans at least 4 records and 20 % of the run (one noisy epoch is not a trend), the
loss ends ≥ 2 % above its minimum (the seed's SA loss: +4.5 %), and its fitted slope is ≥ 3 standard errors
above 0."""
LR_FLAT_TOLERANCE = 0.05
""""Flat or falling": the LR over the stretch never exceeds its value at the stretch's start by more than 5 %
(a printed LR is rounded; warm-up, which rises far more, is excluded)."""
ACC_FALL_FRACTION = 0.8
"""Accuracy falls: it ends at or below 80 % of its value at the start of the stretch."""
RISE_SMOOTH_DIVISOR = 20
"""Per-step logs are noisy: the loss minimum is found on a rolling mean over 1/20 of the records."""

# --- uncertainty-lag

LAG_MIN_RECORDS = 4
"""At least 4 records (3 intervals): a speed needs more than one interval to be steady."""
LAG_SPEED_RANGE = (0.5, 1.5)
"""|Δw| per optimiser step / lr. Adam's step is lr·m̂/√v̂, ≈ lr while the gradient keeps its sign (its speed
limit). From 0.5 (a gradient that changes sign now and then, or a rounded printed LR) to 1.5 (above the
limit: another optimiser, or a wrong number of steps per epoch) the weight moves at that limit."""
LAG_SAME_DIRECTION = 0.75
"""Three quarters of the intervals in the direction of the equilibrium: the gradient keeps its sign."""
LAG_MIN_GAP = 0.5
"""|log L_i − w_i| ≥ 0.5 at the end: the effective weight e^(−w) is still ≥ 1.65× away from its optimum."""

# --- uncertainty-clamped

BOUND_ATOL = 1e-6
"""A w_i within this of a clamp bound is at it."""
PINNED_MIN_STEPS, PINNED_MIN_FRACTION = 5, 0.05
"""A w_i held at a clamp bound for at least max(5 steps, 5 % of the run) is pinned."""
FROZEN_MIN_STEPS, FROZEN_MIN_FRACTION = 20, 0.10
"""Without the config: w exactly constant at a round value (a multiple of ½ other than the init 0) for at
least max(20 steps, 10 % of the run): no optimiser leaves a parameter exactly still that long."""

# --- lr-rule

LR_RULE_RATIO = 4.0
"""The reference LR is DeiT's 5e-4·global_batch/512; the paper's other reading (per-GPU batch on 4 GPUs) is
4× that, so only a ratio beyond 4 (either way) is a different rule rather than a different reading."""

# --- memory-growth

MEM_SKIP_FRACTION, MEM_MIN_POINTS, MEM_T_STAT = 0.10, 10, 5.0
"""Fit mem_allocated_mb after the first 10 % of steps (allocator and cache warm-up), on at least 10 points;
growth counts when the slope is > 5 standard errors above 0 …"""
MEM_MIN_GROWTH_MB, MEM_MIN_GROWTH_FRACTION, MEM_ERROR_FRACTION = 5.0, 0.10, 0.5
"""… and the fitted growth is > 5 MB and > 10 % of the start. Growth of half the starting memory or more is
an error: a tensor kept alive per step grows without bound."""

# --- oom

OOM_EDGE_FRACTION = 0.85
"""Allocated memory at ≥ 85 % of the GPU's capacity when a request fails: the step itself is at the edge of
the memory (a leak shows as growth over steps instead)."""

__all__ = ["LATE_FRACTION", "CHANCE_ACC_FACTOR", "CHANCE_LOSS_FRACTION", "CHANCE_MIN_LATE_RECORDS",
           "CHANCE_ACC_OVERRULES", "CHANCE_W_TOLERANCE", "EQUILIBRIUM_W_TOLERANCE",
           "COLLAPSE_FRACTION", "REGRESSION_MIN_DROP", "REGRESSION_MIN_FRACTION", "REGRESSION_MIN_EVALS",
           "OVERFIT_MIN_EVALS", "OVERFIT_MIN_RISE_FRACTION", "OVERFIT_MIN_RISE_SCALE",
           "OVERFIT_TRAIN_FALL", "OVERFIT_ACC_STILL_GAINS", "OVERFIT_GAP_MIN", "OVERFIT_GAP_WIDENING", "OVERFIT_VAL_STALL",
           "DIVERGENCE_LNC_FACTOR", "DIVERGENCE_GROWTH_FACTOR", "DIVERGENCE_MIN_RECORDS",
           "DIVERGENCE_T_STAT", "UNSTABLE_MIN_RECORDS", "UNSTABLE_SWING", "UNSTABLE_SIGN_CHANGES",
           "UNSTABLE_T_STAT", "TRUNCATED_STEP_FRACTION", "RISE_MIN_RECORDS", "RISE_MIN_RUN_FRACTION",
           "RISE_MIN_FRACTION", "RISE_T_STAT", "LR_FLAT_TOLERANCE", "ACC_FALL_FRACTION",
           "RISE_SMOOTH_DIVISOR", "LAG_MIN_RECORDS", "LAG_SPEED_RANGE", "LAG_SAME_DIRECTION",
           "LAG_MIN_GAP", "BOUND_ATOL", "PINNED_MIN_STEPS", "PINNED_MIN_FRACTION", "FROZEN_MIN_STEPS",
           "FROZEN_MIN_FRACTION", "LR_RULE_RATIO", "MEM_SKIP_FRACTION", "MEM_MIN_POINTS", "MEM_T_STAT",
           "MEM_MIN_GROWTH_MB", "MEM_MIN_GROWTH_FRACTION", "MEM_ERROR_FRACTION", "OOM_EDGE_FRACTION"]
