# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fix 1: the learning rate
#
# The seed system found its learning rate "extremely low" (1.6e-5), replaced the paper's linear scaling rule
# 5e-4·batch/512 by 5e-4·sqrt(batch/16), and added 5 warm-up epochs. This notebook starts from what the seed's own
# log shows that LR doing, computes the LR each rule gives, reads the schedule the trainer really produces, checks
# that command-line overrides reach the LR, and sweeps the LR at two training budgets, in the seed's optimiser
# (Adam with coupled L2 and clipping, as in notebook 03) and in AdamW.

# %%
# %matplotlib inline
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from tqdm.auto import tqdm

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 110)
pd.set_option("display.float_format", "{:.4g}".format)

import diagnostics
from dcal.callbacks import Callback
from dcal.config import apply_overrides, derive, preset
from dcal.schedule import lr_for_rule, warmup_cosine
from dcal.train import build_trainer, dry_run_lr, model_from_config
from dcal_studies.curves import fall_at
from dcal_studies.verdicts import combine, flip, format_measured, judge, report
from diagnostics.doctor import COLLAPSE_FRACTION
from diagnostics.weights import weight_sum_sq

PREDECESSOR = Path("seed_evidence")  # the seed's log, its per-epoch numbers and facts (sources in its README)
facts = yaml.safe_load((PREDECESSOR / "facts.yaml").read_text())
epochs = pd.read_csv(PREDECESSOR / "seed_run_epochs.csv").set_index("epoch")
print("source:", facts["source"])

# %% [markdown]
# ## The seed's own numbers
#
# From its training log (`seed_evidence/`, commit 6a4e6b6; the code that produced it is commit 9b6147a): ViT-B/16
# fine-tuned on CUB-200 (C = 200, chance 0.5 %) at global batch 16 with the LR it calls extremely low. Its first
# five epochs:

# %% tags=["exact-numbers"]
run, opt_facts = facts["run"], facts["optimizer"]
CHANCE_PCT = 100 / run["num_classes"]
first = epochs.loc[1:5, ["lr", "train_loss_sa", "train_acc_sa", "val_top1_pct"]]
first

# %% tags=["exact-numbers"]
val5 = facts["validation_top1_pct"][5]
print(f"{opt_facts['name']}, lr {opt_facts['lr']} (printed {opt_facts['lr_printed']['first_epochs']:f}), "
      f"weight_decay {opt_facts['weight_decay']} (coupled L2), clip_grad_norm {opt_facts['clip_grad_norm']}")
print(f"train SA accuracy {100 * first['train_acc_sa'].iloc[0]:.2f} % → {100 * first['train_acc_sa'].max():.2f} % in 4 "
      f"epochs; validation {val5} % at epoch 5 = {val5 / CHANCE_PCT:.0f}× chance ({CHANCE_PCT} %)")
assert first["train_acc_sa"].idxmax() == 4  # rises for 4 epochs (notebook 03: what came after)
assert first["train_loss_sa"].iloc[:4].is_monotonic_decreasing and val5 / CHANCE_PCT > 30

# %% [markdown]
# At 1.6e-5 the model *was* learning: its training loss fell for four epochs and the first evaluation was 31× chance.
# What went wrong afterwards (from epoch 5 on, at the same LR) is notebook 03's subject.
#
# ## Symptom
#
# From the seed's `FIXES_SUMMARY.md`:
#
# > **Problem**: Learning rate was extremely low (0.000016) due to incorrect scaling formula
# > **Root Cause**: The paper's formula `lr_scaled = 5e-4 / 512 * batch_size` was giving too low values
# > **Fix**: Changed to `lr_scaled = 5e-4 * sqrt(batch_size / 16.0)`; added warmup epochs (5); reduced
# > physical batch size to 2, increased gradient accumulation to 8 (effective batch size 16)
#
# ## Reproduce: the LR each rule gives
#
# `dcal.schedule.lr_for_rule` implements the three readings: DeiT's linear rule on the global batch (`linear`), the
# paper's "batch 16" read as a per-GPU batch on 4 GPUs as DeiT's `main.py` scales it (`linear_per_gpu`), and the
# seed's square-root rule (`sqrt`). The seed's batch before (4 × accumulation 4) and after its fix (2 × 8) is the
# same global batch, 16:

# %% tags=["exact-numbers"]
rows = []
for micro, accum in ((4, 4), (2, 8)):
    for rule in ("linear", "linear_per_gpu", "sqrt"):
        rows.append({"micro-batch": micro, "accumulation": accum, "global batch": micro * accum, "rule": rule,
                     "lr": lr_for_rule(rule, base_lr=5e-4, batch_size=micro, grad_accum_steps=accum)})
rules = pd.DataFrame(rows)
rules.pivot(index=["micro-batch", "accumulation", "global batch"], columns="rule", values="lr")

# %% tags=["exact-numbers"]
lr_linear = lr_for_rule("linear", batch_size=2, grad_accum_steps=8)
lr_per_gpu = lr_for_rule("linear_per_gpu", batch_size=2, grad_accum_steps=8)
lr_sqrt = lr_for_rule("sqrt", batch_size=2, grad_accum_steps=8)
print(f"linear {lr_linear}, linear_per_gpu {lr_per_gpu}, sqrt {lr_sqrt}; sqrt / linear = {lr_sqrt / lr_linear:g}")
assert lr_linear == 1.5625e-5 == 5e-4 / 512 * 16 == opt_facts["lr"]  # the paper's rule at global batch 16
assert lr_per_gpu == 6.25e-5 and lr_sqrt == 5e-4 and lr_sqrt / lr_linear == 32
assert rules.groupby("rule")["lr"].nunique().eq(1).all()  # 4 × 4 and 2 × 8 give the same LR under every rule

# %% [markdown]
# So 1.6e-5 is not an "incorrect scaling formula": it *is* the paper's (DeiT's) rule, 5e-4 per 512 images, at a
# global batch of 16, and the seed's code computed exactly that. Moving from 4 × 4 to 2 × 8 changes no LR. Over
# batch sizes (`diagnostics.lr_rule_table`, `plot_lr_rules`) the rules meet only at huge batches: sqrt equals linear
# at a global batch of 512²/16 = 16 384.

# %%
table = diagnostics.lr_rule_table([1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
diagnostics.plot_lr_rules(table, x="global_batch")

# %%
wide = table.pivot(index="global_batch", columns="rule", values="lr")
print({b: f"{r:.3g}" for b, r in (wide["sqrt"] / wide["linear"]).items()})
assert np.allclose(wide["linear_per_gpu"] / wide["linear"], 4) and np.allclose(wide["sqrt"] / wide["linear"], np.sqrt(16384 / wide.index))
assert wide.loc[512, "linear"] == 5e-4

# %% [markdown]
# ## Diagnose: the schedule the trainer really produces
#
# The LR the optimiser sees is not the rule's peak: it is the peak times a warm-up + cosine schedule, per optimiser
# step. `dcal.train.dry_run_lr` builds the trainer's real optimiser and scheduler for a config and reads the LR at
# every step, without data. The seed's CUB setting after its fix: 5 994 training images at 2 × 8, i.e. 374 optimiser
# steps per epoch, 100 epochs, with the seed's 5 warm-up epochs and without; and the linear rule it replaced.

# %%
predecessor_cfg = apply_overrides(preset("cub_deit_tiny"), ["train.batch_size=2", "train.grad_accum_steps=8",
                                                     "train.lr_rule=sqrt"])
STEPS_PER_EPOCH_CUB = 5994 // 2 // 8
sched = {"sqrt, 5 warm-up epochs": dry_run_lr(predecessor_cfg, STEPS_PER_EPOCH_CUB),
         "sqrt, no warm-up": dry_run_lr(apply_overrides(predecessor_cfg, ["train.warmup_epochs=0"]), STEPS_PER_EPOCH_CUB),
         "linear, 5 warm-up epochs": dry_run_lr(apply_overrides(predecessor_cfg, ["train.lr_rule=linear"]), STEPS_PER_EPOCH_CUB)}
diagnostics.plot_lr_schedule(sched, warmup_steps=5 * STEPS_PER_EPOCH_CUB, reference_lr=lr_linear, log_scale=True)

# %% tags=["exact-numbers"]
warm = np.array(sched["sqrt, 5 warm-up epochs"])
PREDECESSOR_STEPS = round(run["epochs_logged"] * run["micro_batches_per_epoch"] / run["accumulation"])  # 15 × 374.5
PREDECESSOR_SUM_LR = sum(warmup_cosine(k, total_steps=round(run["epochs_planned"] * run["micro_batches_per_epoch"] / run["accumulation"]),
                                warmup_steps=0, peak=opt_facts["lr"], floor=0.0) for k in range(PREDECESSOR_STEPS))
spent = int(np.argmax(np.cumsum(warm) > PREDECESSOR_SUM_LR))
print(f"{len(warm)} steps; first lr {warm[0]:.2g}, peak {warm.max():g} at step {warm.argmax()}, last {warm[-1]:g}")
print(f"Σlr over the first 15 epochs: {warm[:PREDECESSOR_STEPS].sum():.3g} with the sqrt rule and warm-up, {PREDECESSOR_SUM_LR:.3g} in the "
      f"seed's run ({warm[:PREDECESSOR_STEPS].sum() / PREDECESSOR_SUM_LR:.0f}×); the sqrt schedule spends the seed's 15-epoch Σlr by "
      f"step {spent} (epoch {spent / STEPS_PER_EPOCH_CUB:.1f})")
assert len(warm) == 100 * STEPS_PER_EPOCH_CUB
assert math.isclose(warm[0], 5e-4 / (5 * STEPS_PER_EPOCH_CUB)) and warm.argmax() == 5 * STEPS_PER_EPOCH_CUB - 1
assert math.isclose(warm.max(), 5e-4) and sched["sqrt, no warm-up"][0] == 5e-4
assert abs(PREDECESSOR_SUM_LR - epochs["w_sa"].iloc[-1]) < 0.05 * PREDECESSOR_SUM_LR  # the log's w moves ≈ lr per step (notebook 04)

# %% [markdown]
# Five warm-up epochs start at 2.7e-7 and reach the peak after 1 870 steps. Over the 15 epochs the seed ran, the
# "fixed" schedule would move an Adam weight 27× farther (Σlr) than the run it replaced: Σlr ≈ 0.086, which the
# logged uncertainty weights confirm (Adam moves them by ≈ lr per step: w_SA = 0.0834 at epoch 15, notebook 04).
#
# ## The seed's other LR defect: overrides computed too early
#
# The seed computed its scaled LR when the config was created, before command-line overrides were applied, so
# `--batch_size` changed the batch but not the LR. In `dcal` the overrides come first (`apply_overrides`) and the LR
# is derived afterwards (`derive`, which `build_trainer` calls): `--set train.batch_size=...` moves the LR.

# %% tags=["exact-numbers"]
rows = []
for bs in (8, 16, 32):
    cfg = derive(apply_overrides(preset("cub_deit_tiny"), [f"train.batch_size={bs}"]), world_size=1,
                 steps_per_epoch=100, num_classes=200)
    rows.append({"--set train.batch_size": bs, "derived lr": cfg.derived["lr"], "global batch": cfg.derived["global_batch"]})
overrides = pd.DataFrame(rows)
overrides

# %%
TINY = ["data.synthetic={num_classes: 10, train_per_class: 16, test_per_class: 10, seed: 0}", "train.progress=false",
        "train.save_best=false", "train.base_lr=5e-4", "train.epochs=2", "train.batch_size=8"]
trainer = build_trainer(apply_overrides(preset("demo"), TINY), None)
lr_trainer = trainer.optimizer.param_groups[0]["initial_lr"]
assert overrides["derived lr"].tolist() == [lr_for_rule("linear", batch_size=b) for b in (8, 16, 32)]
assert lr_trainer == trainer.cfg.derived["lr"] == lr_for_rule("linear", base_lr=5e-4, batch_size=8)
print(f"build_trainer with train.batch_size=8: optimiser peak lr = the linear rule at batch 8: {lr_trainer == 5e-4 * 8 / 512}")
del trainer

# %% [markdown]
# ## The seed's fix, measured: an LR sweep at two budgets
#
# Whether a larger LR "trains better" depends on the optimiser and on how long one trains. The sweep fine-tunes the
# project's pretrained backbone on 10 classes of the embedded benchmark at global batch 16, with a flat LR (the
# seed's cosine was still above 95 % of its peak when it failed), so the first 30 steps of a 120-step run *are* the
# 30-step run. Three LRs 32× apart end to end, the sqrt rule's ratio to the linear one: 1e-4, 5.7e-4 (√32×) and
# 3.2e-3 (32×). Two optimisers:
#
# - the seed's: Adam with coupled L2 0.05 on every parameter and the total gradient norm clipped to
#   1.0·√(P / 93.65 M), the seed's per-weight bound (notebook 03);
# - AdamW, decoupled decay 0.05 on weight matrices, the same clipping.
#
# The ViT's SA branch alone (no GLCA, no PWCA, one loss: nothing to weight): the question is the optimiser's, and an SA
# step costs less than half a DCAL step. Every LR of both optimisers runs 30 steps with 3 seeds; the two LRs the
# budget question is about (the seed's optimiser at 1× and √32×) go on to 120 steps with 2 of those seeds, evaluated
# every 10 steps for the Σlr axis below. 32× in the seed's optimiser stops at 30 steps: by then it has spent more than
# the seed's whole Σlr (table below). The 18 runs go two at a time, one torch thread each.
#
# ## Thresholds, stated before the sweep
#
# - an LR **trains better** when its mean test accuracy is higher by more than 0.1 (two standard errors of a 100-image
#   test set at 0.5); it is **ahead** when the gap is above 0 beyond its spread;
# - a model **learns** when its accuracy is at least 2× chance;
# - an LR formula is **incorrect** when it misses the paper's rule by more than 5 %;
# - a run **collapses** when its last evaluation is below half its best (the doctor's `COLLAPSE_FRACTION`);
# - the rise-then-fall sits **at the seed's Σlr** when the Σlr of the best evaluation and of the first one below half
#   the best are each within a factor 2 of the seed's (|log₂ of the ratio| < 1; the seed's from its training accuracy
#   per epoch).
#
# Spreads are standard deviations over the seeds run (3 at 30 steps, 2 at 120), each floored at 0.01 (one test image
# in 100).

# %%
BETTER, AHEAD, SAME_SUM_LR = 0.1, 0.0, 1.0
STEPS, SHORT = 120, 30  # 160 training images at batch 16 = 10 steps per epoch
LRS = {"1×": 1e-4, "√32×": 1e-4 * math.sqrt(32), "32×": 3.2e-3}
SEEDS, LONG_SEEDS = (0, 1, 2), (0, 1)
SA_ONLY = apply_overrides(preset("demo"), ["model.glca=false", "model.pwca=false"])
P_SA = sum(p.numel() for p in model_from_config(SA_ONLY, 10).parameters())
CLIP = opt_facts["clip_grad_norm"] * math.sqrt(P_SA / (run["parameters_millions"] * 1e6))
grid = pd.DataFrame({"lr": LRS, f"Σlr at {SHORT} steps / seed's 15 epochs": {k: SHORT * v / PREDECESSOR_SUM_LR for k, v in LRS.items()},
                     f"Σlr at {STEPS} steps / seed's 15 epochs": {k: STEPS * v / PREDECESSOR_SUM_LR for k, v in LRS.items()}})
print(f"SA-only parameters {P_SA / 1e6:.3g} M, clip {CLIP:.3g}; the seed's Σlr over 15 epochs {PREDECESSOR_SUM_LR:.3g}")
grid.map("{:.2g}".format)


# %%
class WeightNorm(Callback):
    """Adds Σθ² of the weight matrices (relative to the start, `diagnostics.weights.weight_sum_sq`) to every
    evaluation record."""

    def before_fit(self, trainer):
        self.start = weight_sum_sq(trainer.model)

    def after_eval(self, trainer):
        trainer.eval_record["sum_sq / start"] = weight_sum_sq(trainer.model) / self.start


BASE = [*TINY[:3], "model.glca=false", "model.pwca=false", "train.batch_size=16", "train.lr_rule=fixed",
        "train.warmup_epochs=0", "train.weight_decay=0.05", f"train.clip_grad={CLIP}"]
LONG = {("adam_l2", "1×"): 3, ("adam_l2", "√32×"): 1}  # arm → evaluate every N epochs over 120 steps
PLAN = [(opt, name, seed) for opt in ("adam_l2", "adamw") for name in LRS for seed in SEEDS]


def sweep_run(run_key):
    """One run of the sweep (in a worker process, one torch thread); returns its evaluation records."""
    opt, name, seed = run_key
    lr, long = LRS[name], (opt, name) in LONG and seed in LONG_SEEDS
    steps, every = (STEPS, LONG[opt, name]) if long else (SHORT, SHORT // 10)
    cfg = apply_overrides(preset("demo"), BASE + [f"train.optimizer={opt}", f"train.lr={lr}", f"train.min_lr={lr}",
                                                  f"train.seed={seed}", f"train.epochs={steps // 10}",
                                                  f"train.eval_every={every}"])
    trainer = build_trainer(cfg, None, callbacks=[WeightNorm()])  # seeded from train.seed: order-independent
    trainer.fit()
    return [{"optimizer": opt, "lr": name, "seed": seed, **h} for h in trainer.history]


t0 = time.perf_counter()
with multiprocessing.get_context("fork").Pool(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
    sweep = pd.DataFrame([r for recs in tqdm(pool.imap(sweep_run, PLAN), total=len(PLAN), desc="LR sweep") for r in recs])
print(f"{len(PLAN)} runs ({len(LONG) * len(LONG_SEEDS)} of them {STEPS} steps, the others {SHORT}) in "
      f"{time.perf_counter() - t0:.0f} s")

# %% [markdown]
# Test accuracy of the SA branch against the step, per LR (mean over the seeds run; chance 0.1):

# %%
fig = Figure(figsize=(11, 3.4), layout="constrained")
for ax, opt in zip(fig.subplots(1, 2, sharey=True), ("adam_l2", "adamw")):
    for name in LRS:
        curve = sweep[(sweep["optimizer"] == opt) & (sweep["lr"] == name)].groupby("step")["acc_sa"]
        ax.errorbar(curve.mean().index, curve.mean(), yerr=curve.std().fillna(0), marker="o", capsize=3,
                    label=f"{name} ({LRS[name]:.2g})")
    ax.axvline(SHORT, color="grey", ls=":", lw=0.8)
    ax.set(title=f"{opt}, clip {CLIP:.2g}", xlabel="optimiser step", ylabel="test accuracy (SA)", ylim=(0, 1))
    ax.legend(title="lr")
fig

# %%
def at(step):
    """Per optimiser and LR (those run that long): accuracy at `step` and Σθ² / start, per seed; the keys in order."""
    s = sweep[sweep["step"] == step].groupby(["optimizer", "lr"], sort=False)
    order = [key for key in ((opt, name) for opt in ("adam_l2", "adamw") for name in LRS) if key in s.groups]
    return s["acc_sa"], s["sum_sq / start"], order


RESOLUTION = 0.01  # one test image in 100: the floor of every printed spread of an accuracy


def shown(acc):
    return acc.apply(lambda a: format_measured(a.mean(), max(a.std(), RESOLUTION)))


acc_short, norm_short, order = at(SHORT)
acc_long, norm_long, _ = at(STEPS)
results = pd.DataFrame({f"accuracy at {SHORT} steps (3 seeds)": shown(acc_short),
                        f"Σθ² at {SHORT} steps / start": norm_short.mean().map("{:.2f}".format),
                        f"accuracy at {STEPS} steps (2 seeds)": shown(acc_long),
                        f"Σθ² at {STEPS} steps / start": norm_long.mean().map("{:.2f}".format)}).reindex(order).fillna("not run")
best = {(opt, n): acc.mean()[opt].idxmax() for opt, n, acc in (("adam_l2", SHORT, acc_short), ("adamw", SHORT, acc_short),
                                                                ("adam_l2", STEPS, acc_long))}
results

# %%
print({f"{opt}, {n} steps": f"best lr {name}" for (opt, n), name in best.items()})
assert best["adam_l2", SHORT] == "√32×" and best["adam_l2", STEPS] == "1×" and best["adamw", SHORT] == "√32×"
assert acc_short.mean()["adam_l2", "32×"] < 0.2 and norm_short.mean()["adam_l2", "32×"] < 0.1

# %% [markdown]
# In the seed's optimiser the best LR moves down as the budget grows: √32× wins at 30 steps and has eroded by 120
# (its weight matrices keep a few % of their squared norm), where 1× wins; 32× never leaves chance and has lost almost
# all of its weights' squared norm by step 30. Under coupled L2 with this clipping, every step moves a decay-dominated
# weight by ≈ lr towards zero, so 32× the LR is 32× the erosion per step (notebook 03). Under AdamW every LR learns
# within 30 steps: √32× is far ahead of 1×, and the seed's own 32× is ahead of 1× too (by less, with the widest
# spread). A short AdamW run is the kind of experiment behind "sqrt trains better".
#
# ## On a Σlr axis: the seed's rise-then-fall at 36× its LR
#
# The √32× arm runs the seed's optimiser at 36× the seed's LR (5.7e-4 against 1.5625e-5). If erosion is what ends a
# run, its rise and fall should sit at the seed's Σlr: accuracy over its own best against the Σlr spent, next to the
# seed's training accuracy per epoch and its validation at epochs 5, 10 and 15 (over epoch 5's). Notebook 03 does the
# same at 94× on the 3-branch DCAL.

# %%
predecessor_lr = np.array([warmup_cosine(k, total_steps=round(run["epochs_planned"] * run["micro_batches_per_epoch"] / run["accumulation"]),
                                  warmup_steps=0, peak=opt_facts["lr"], floor=0.0) for k in range(PREDECESSOR_STEPS)])
predecessor_sum_lr = pd.Series({e: float(predecessor_lr[:round(e * PREDECESSOR_STEPS / run["epochs_logged"])].sum()) for e in epochs.index})
predecessor_train = epochs["train_acc_sa"] / epochs["train_acc_sa"].max()
val = facts["validation_top1_pct"]
predecessor_val = pd.Series({e: val[e] / val[5] for e in (5, 10, 15)})
long_runs = {(name, seed): g.set_index("step")["acc_sa"] for (opt, name, seed), g in sweep.groupby(["optimizer", "lr", "seed"])
             if opt == "adam_l2" and seed in LONG_SEEDS and name in ("1×", "√32×")}
fig = Figure(figsize=(6.5, 3.4), layout="constrained")
ax = fig.subplots()
ax.plot(predecessor_sum_lr, predecessor_train, color="black", marker="s", ms=3, label="seed: train acc / best (per epoch)")
ax.plot(predecessor_sum_lr[predecessor_val.index], predecessor_val, color="black", ls="none", marker="*", ms=10, label="seed: validation / epoch 5")
for (name, seed), acc in long_runs.items():
    ax.plot(acc.index * LRS[name], acc / acc.max(), color={"1×": "tab:blue", "√32×": "tab:orange"}[name], marker="o", ms=3,
            alpha=0.8, label=f"adam_l2 {name} here" if seed == 0 else None)
ax.axhline(COLLAPSE_FRACTION, color="grey", ls=":", lw=0.8)
ax.set(xlabel="Σlr spent", ylabel="accuracy / its best", title="rise and fall against Σlr", ylim=(0, 1.05))
ax.legend(fontsize=8)
fig

# %%
# `fall_at` (dcal_studies.curves): Σlr at the best point, and at the first point after it below half the best.
predecessor_peak, predecessor_fall = fall_at(predecessor_sum_lr, predecessor_train)
sqrt_runs = [acc for (name, _), acc in long_runs.items() if name == "√32×"]
ours = pd.DataFrame([fall_at(acc.index.to_series() * LRS["√32×"], acc) for acc in sqrt_runs], columns=["peak", "fall"])
EVAL_SUM_LR = 10 * LRS["√32×"]  # Σlr between two evaluations of the √32× arm: the resolution of its peak and fall
print(f"seed (train accuracy per epoch): peak at Σlr {predecessor_peak:.3f}, below half its best by Σlr {predecessor_fall:.3f}; "
      f"validation below half by Σlr {predecessor_sum_lr[10]:.3f} (epoch 10)")
print(f"√32× here: peak at Σlr {format_measured(ours['peak'].mean(), max(ours['peak'].std(), EVAL_SUM_LR))}, below half by "
      f"Σlr {format_measured(ours['fall'].mean(), max(ours['fall'].std(), EVAL_SUM_LR))}; final / best at {STEPS} steps "
      f"{format_measured(np.mean([a.iloc[-1] / a.max() for a in sqrt_runs]), 0.01)}")

# %% [markdown]
# The seed's shape at the seed's Σlr, in a model with no GLCA, no PWCA and a single loss: the collapse needs none of
# the components the seed's FIXES_SUMMARY blamed.
#
# ## What actually fixes it
#
# The LR the paper's rule gives at global batch 16 is the right *rule*; whether its value suits a given fine-tuning is
# an empirical question, answered by a sweep at the budget one will train for (a short run favours a larger LR), in
# the optimiser one will use. The seed's real problem was the optimiser: with coupled L2, a 32× LR only erodes faster.
# In `dcal` the rule is named in the config and visible in the run (`train.lr_rule`, `cfg.derived['lr']`, the logged
# `lr`), overrides are applied before the LR is derived, and the doctor flags a peak LR more than 4× away from the
# linear rule (`lr-rule`), since the paper's two readings of its batch differ by exactly 4×.
#
# ## Verdicts
#
# Against the thresholds stated before the sweep.

# %%
def gap(a, b, acc):
    """Mean accuracy gap a − b and its spread (independent seeds: spreads add in quadrature, each floored)."""
    return acc.mean()[a] - acc.mean()[b], math.hypot(max(acc.std()[a], RESOLUTION), max(acc.std()[b], RESOLUTION))


def better(claim, a, b, acc, step, threshold=BETTER):
    d, spread = gap(a, b, acc)
    seeds = len(SEEDS) if step == SHORT else len(LONG_SEEDS)
    return judge(claim, d, threshold, spread=spread, quantity=f"accuracy {a[1]} − {b[1]} at {step} steps",
                 budget=f"{step} steps × {seeds} seeds")


def log2_ratio(claim, values, predecessor_value):
    spread = max(values.std(), EVAL_SUM_LR) / values.mean() / math.log(2)
    return judge(claim, abs(math.log2(values.mean() / predecessor_value)), SAME_SUM_LR, holds_if="<", spread=spread,
                 quantity=f"|log₂(Σlr here / seed's {predecessor_value:.3f})|")


moves = [better(f"in the seed's optimiser, √32× beats 1× at {SHORT} steps", ("adam_l2", "√32×"), ("adam_l2", "1×"), acc_short, SHORT),
         better(f"in the seed's optimiser, 1× beats √32× at {STEPS} steps", ("adam_l2", "1×"), ("adam_l2", "√32×"), acc_long, STEPS)]
at_predecessor_sum_lr = [log2_ratio("in the seed's optimiser at 36× its LR, accuracy peaks at the seed's Σlr", ours["peak"], predecessor_peak),
                  log2_ratio("in the seed's optimiser at 36× its LR, accuracy falls below half at the seed's Σlr", ours["fall"],
                             predecessor_fall)]
aw_32_ahead = better(f"in AdamW, the seed's 32× is ahead of 1× in a short run ({SHORT} steps)", ("adamw", "32×"),
                     ("adamw", "1×"), acc_short, SHORT, threshold=AHEAD)
final_best = pd.Series([a.iloc[-1] / a.max() for a in sqrt_runs])
verdicts = [
    judge("1.6e-5 comes from an incorrect scaling formula", abs(opt_facts["lr"] - lr_linear) / lr_linear, 0.05,
          quantity="|seed's lr − paper's rule at batch 16| / rule").expect("refuted"),
    judge("1.6e-5 was too low to learn (the seed's own log)", val5 / CHANCE_PCT, 2.0, holds_if="<",
          quantity="validation top-1 at epoch 5 / chance").expect("refuted"),
    better("the sqrt rule's 32× LR trains better, in the seed's optimiser (Adam + L2 + clipping)", ("adam_l2", "32×"),
           ("adam_l2", "1×"), acc_short, SHORT).expect("refuted"),
    combine("in the seed's optimiser the best LR moves down as the budget grows", moves).expect("confirmed"),
    combine("in the seed's optimiser at 36× its LR, the rise-then-fall sits at the seed's Σlr", at_predecessor_sum_lr).expect("confirmed"),
    judge("the collapse needs bugs in attention or loss weighting (FIXES_SUMMARY's root cause)", final_best.mean(),
          COLLAPSE_FRACTION, spread=max(final_best.std(), RESOLUTION),
          quantity=f"final / best of an SA-only ViT (no GLCA, PWCA or loss weighting), √32×, {STEPS} steps, 2 seeds"
          ).expect("refuted"),
    better(f"in AdamW, a larger LR (√32×) trains better in a short run ({SHORT} steps)", ("adamw", "√32×"),
           ("adamw", "1×"), acc_short, SHORT).expect("confirmed"),
    aw_32_ahead.expect("confirmed"),
    judge("batch 2 × 8 instead of 4 × 4 changes the LR", float(rules.groupby("rule")["lr"].nunique().max() - 1), 0.5,
          quantity="distinct LRs per rule − 1").expect("refuted"),
    judge("dcal: --set train.batch_size changes the derived LR", float(overrides["derived lr"].nunique()), 2.5,
          quantity="distinct LRs for batch 8/16/32").expect("confirmed"),
]
print(report(verdicts))
print(report(moves + at_predecessor_sum_lr))

# %% [markdown]
# AdamW's 32× ahead of 1× at 30 steps is near the "trains better" margin: judged against 0.1 instead of 0 the same
# measurement is not resolved with 3 seeds (its band straddles 0.1). And "√32× beats 1× at 30 steps" in the seed's
# optimiser flips when the 30-step budget is replaced by the 120-step one:

# %%
print(flip(aw_32_ahead, better(aw_32_ahead.claim, ("adamw", "32×"), ("adamw", "1×"), acc_short, SHORT), "threshold 0 → 0.1"))
print(flip(moves[0], better(moves[0].claim, ("adam_l2", "√32×"), ("adam_l2", "1×"), acc_long, STEPS),
           f"accuracy at {SHORT} → {STEPS} steps"))

# %% [markdown]
# ## Against the seed's numbers
#
# The seed ran the linear rule's 1.5625e-5 for 15 epochs (Σlr ≈ 0.086) in Adam with coupled L2 and clipping: it
# learned (train accuracy 0.67 % → 7.51 %, validation 15.38 % = 31× chance) and then eroded. In the sweep, the same
# optimiser at 36× the seed's LR peaks and falls at the seed's Σlr (the figure above); the sqrt rule with its warm-up
# spends the seed's whole 15-epoch Σlr by epoch 2.1. Its "fix" therefore could not have rescued the run: it would have
# eroded the weights sooner (32× here: at chance, its weights' squared norm gone by step 30).
#
# ## Summary
#
# - 1.5625e-5 is exactly the paper's (DeiT's) linear rule 5e-4·16/512, which the seed computed correctly; the
#   per-GPU reading gives 6.25e-5; the sqrt rule gives 5e-4, 32× more; 4 × 4 and 2 × 8 give the same LR.
# - The seed's log shows that LR learning for four epochs (31× chance at the first evaluation).
# - `dry_run_lr` shows the schedule the trainer really runs: 5 warm-up epochs start at 2.7e-7 and reach the peak
#   only after 1 870 steps.
# - A larger LR trains better only in a short AdamW run (√32× at 30 steps, and the seed's 32× is ahead of 1× there
#   too). In the seed's optimiser 32× never leaves chance, the best LR moves down as the budget grows, and the
#   rise-then-fall happens at the seed's Σlr, in a ViT without GLCA, PWCA or loss weighting. Sweep at the budget you
#   will train for; use decoupled weight decay.
# - In `dcal`, overrides are applied before the LR is derived, and the doctor names the rule behind a peak LR.
#
# ## In your own run
#
# - **Look for**: the peak LR your run really used (the logged `lr`, or `dcal.train.dry_run_lr(cfg, steps_per_epoch)`
#   before training) against the rule you meant; a "better" LR found in a short run; accuracy that peaks and then falls
#   at a flat LR.
# - **Check**: `dcal doctor RUN_DIR` warns `lr-rule` when the peak LR is more than 4× away from the linear rule, and
#   reports `loss-rising` / `accuracy-collapse`; `diagnostics.lr_rule_table` gives every rule's LR for your batch;
#   Σlr (the sum of the logged `lr`) against `diagnostics.weights.share_below(model, Σlr)` says how much of your model
#   a coupled decay could erase in the run.
# - **Change**: pick the LR by a sweep at the budget you will train for, in the optimiser you will use; name the rule in
#   the config (`train.lr_rule`) and let overrides come first; with Adam, use decoupled decay (`train.optimizer=adamw`).
