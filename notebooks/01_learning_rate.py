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
# 5e-4·batch/512 by 5e-4·sqrt(batch/16), and added 5 warm-up epochs. This notebook computes the LR each rule
# gives, reads the schedule the trainer really produces from its scheduler, checks that command-line overrides
# reach the LR, and trains a few dozen steps under each rule, with and without warm-up.

# %%
# %matplotlib inline
import math
import random
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
random.seed(0)
pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 110)
pd.set_option("display.float_format", "{:.4g}".format)  # LRs span 1e-7 to 1e-3

import diagnostics
from dcal.config import apply_overrides, derive, preset
from dcal.schedule import lr_for_rule
from dcal.train import build_trainer, dry_run_lr

# %% [markdown]
# ## Symptom
#
# From the seed's `FIXES_SUMMARY.md`:
#
# > **Problem**: Learning rate was extremely low (0.000016) due to incorrect scaling formula
# > **Root Cause**: The paper's formula `lr_scaled = 5e-4 / 512 * batch_size` was giving too low values
# > **Fix**: Changed to `lr_scaled = 5e-4 * sqrt(batch_size / 16.0)`; added warmup epochs (5); reduced
# > physical batch size to 2, increased gradient accumulation to 8 (effective batch size 16)

# %% [markdown]
# ## Reproduce: the LR each rule gives
#
# `dcal.schedule.lr_for_rule` implements the three readings: DeiT's linear rule on the global batch
# (`linear`), the paper's "batch 16" read as a per-GPU batch on 4 GPUs as DeiT's `main.py` scales it
# (`linear_per_gpu`), and the seed's square-root rule (`sqrt`). The seed's batch before (4 × accumulation 4) and
# after its fix (2 × 8) is the same global batch, 16:

# %%
rows = []
for micro, accum in ((4, 4), (2, 8)):
    for rule in ("linear", "linear_per_gpu", "sqrt"):
        rows.append({"micro-batch": micro, "accumulation": accum, "global batch": micro * accum, "rule": rule,
                     "lr": lr_for_rule(rule, base_lr=5e-4, batch_size=micro, grad_accum_steps=accum)})
rules = pd.DataFrame(rows)
rules.pivot(index=["micro-batch", "accumulation", "global batch"], columns="rule", values="lr")

# %%
lr_linear = lr_for_rule("linear", batch_size=2, grad_accum_steps=8)
lr_per_gpu = lr_for_rule("linear_per_gpu", batch_size=2, grad_accum_steps=8)
lr_sqrt = lr_for_rule("sqrt", batch_size=2, grad_accum_steps=8)
print(f"linear {lr_linear:.4e}, linear_per_gpu {lr_per_gpu:.4e}, sqrt {lr_sqrt:.4e}; "
      f"sqrt / linear = {lr_sqrt / lr_linear:.4f}")
assert lr_linear == 1.5625e-5 == 5e-4 / 512 * 16  # the paper's rule at global batch 16: the seed's "0.000016"
assert lr_per_gpu == 6.25e-5 and lr_sqrt == 5e-4 and lr_sqrt / lr_linear == 32
assert rules.groupby("rule")["lr"].nunique().eq(1).all()  # 4 × 4 and 2 × 8 give the same LR under every rule

# %% [markdown]
# So 1.6e-5 is not an "incorrect scaling formula": it *is* the paper's (DeiT's) rule, 5e-4 per 512 images,
# at a global batch of 16. Moving from 4 × 4 to 2 × 8 changes no LR. Over batch sizes
# (`diagnostics.lr_rule_table`, `plot_lr_rules`) the rules meet only at huge batches: sqrt equals linear at a
# global batch of 512²/16 = 16 384.

# %%
table = diagnostics.lr_rule_table([1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
diagnostics.plot_lr_rules(table, x="global_batch")

# %%
wide = table.pivot(index="global_batch", columns="rule", values="lr")
print((wide["sqrt"] / wide["linear"]).round(4).to_dict())
assert np.allclose(wide["linear_per_gpu"] / wide["linear"], 4)
assert wide.loc[512, "linear"] == 5e-4

# %% [markdown]
# ## Diagnose: the schedule the trainer really produces
#
# The LR the optimiser sees is not the rule's peak: it is the peak times a warm-up + cosine schedule, per
# optimiser step. `dcal.train.dry_run_lr` builds the trainer's real optimiser and scheduler for a config and
# reads the LR at every step, without data. The seed's CUB setting: 5 994 training images at 2 × 8, i.e.
# 374 optimiser steps per epoch, 100 epochs, with the seed's 5 warm-up epochs and without.

# %%
seed_cfg = apply_overrides(preset("cub_deit_tiny"), ["train.batch_size=2", "train.grad_accum_steps=8",
                                                     "train.lr_rule=sqrt"])
STEPS_PER_EPOCH = 5994 // 2 // 8
sched = {"sqrt, 5 warm-up epochs": dry_run_lr(seed_cfg, STEPS_PER_EPOCH),
         "sqrt, no warm-up": dry_run_lr(apply_overrides(seed_cfg, ["train.warmup_epochs=0"]), STEPS_PER_EPOCH),
         "linear, 5 warm-up epochs": dry_run_lr(apply_overrides(seed_cfg, ["train.lr_rule=linear"]), STEPS_PER_EPOCH)}
diagnostics.plot_lr_schedule(sched, warmup_steps=5 * STEPS_PER_EPOCH, reference_lr=lr_linear, log_scale=True)

# %%
warm = np.array(sched["sqrt, 5 warm-up epochs"])
print(f"{len(warm)} steps; first lr {warm[0]:.4e}, peak {warm.max():.4e} at step {warm.argmax()}, "
      f"last {warm[-1]:.4e}; mean lr over the run {warm.mean():.4e}")
print(f"no warm-up: first lr {sched['sqrt, no warm-up'][0]:.4e}")
assert len(warm) == 100 * STEPS_PER_EPOCH
assert math.isclose(warm[0], 5e-4 / (5 * STEPS_PER_EPOCH)) and warm.argmax() == 5 * STEPS_PER_EPOCH - 1
assert math.isclose(warm.max(), 5e-4) and sched["sqrt, no warm-up"][0] == 5e-4

# %% [markdown]
# ## The seed's other LR defect: overrides computed too early
#
# The seed computed its scaled LR when the config was created, before command-line overrides were applied, so
# `--batch_size` changed the batch but not the LR. In `dcal` the overrides come first (`apply_overrides`) and the
# LR is derived afterwards (`derive`, which `build_trainer` calls): `--set train.batch_size=...` moves the LR.

# %%
rows = []
for bs in (8, 16, 32):
    cfg = derive(apply_overrides(preset("cub_deit_tiny"), [f"train.batch_size={bs}"]), world_size=1,
                 steps_per_epoch=100, num_classes=200)
    rows.append({"--set train.batch_size": bs, "derived lr": cfg.derived["lr"], "global batch": cfg.derived["global_batch"]})
overrides = pd.DataFrame(rows)
overrides

# %%
TINY = ["data.synthetic={num_classes: 10, train_per_class: 32, test_per_class: 20, seed: 0}",
        "train.progress=false", "train.save_best=false", "train.base_lr=5e-4", "train.epochs=2"]
trainer = build_trainer(apply_overrides(preset("demo"), TINY + ["train.batch_size=8"]), None)
lr_trainer = trainer.optimizer.param_groups[0]["initial_lr"]
print(f"build_trainer with --set train.batch_size=8: derived lr {trainer.cfg.derived['lr']:.4e}, "
      f"optimiser peak lr {lr_trainer:.4e}")
assert overrides["derived lr"].tolist() == [lr_for_rule("linear", batch_size=b) for b in (8, 16, 32)]
assert lr_trainer == trainer.cfg.derived["lr"] == lr_for_rule("linear", base_lr=5e-4, batch_size=8)
del trainer

# %% [markdown]
# ## The seed's fix, measured: short fine-tuning runs under each rule
#
# DCAL fine-tuned from the project's pretrained backbone on 10 classes of the embedded benchmark, global batch
# 16 (16 × 1 here: the LR of every rule depends only on micro-batch × accumulation, and 2 × 8 is 8× slower on a
# CPU), base LR 5e-4 as in the paper, 40 optimiser steps, a quarter of them warm-up, then the cosine. One run per
# rule, and the sqrt rule once more without warm-up. Same seed, same data order in every run.

# %%
PRETRAINED = Path(preset("demo").model.pretrained)
assert PRETRAINED.is_file(), f"{PRETRAINED.name} is missing (the project's pretrained backbone)"
WORK = Path(tempfile.mkdtemp(prefix="dcal_nb01_"))
RUNS = {"linear": ["train.lr_rule=linear"],
        "linear_per_gpu": ["train.lr_rule=linear_per_gpu"],
        "sqrt": ["train.lr_rule=sqrt"],
        "sqrt, no warm-up": ["train.lr_rule=sqrt", "train.warmup_epochs=0"]}
logs = {}
for name, extra in RUNS.items():
    cfg = apply_overrides(preset("demo"), TINY + ["train.batch_size=16", "train.warmup_epochs=0.5"] + extra)
    folder = WORK / name.replace(", ", "_").replace(" ", "_")
    build_trainer(cfg, folder).fit()
    logs[name] = diagnostics.load_run(folder)
print({name: f"{lg.steps['lr'].max():.4e}" for name, lg in logs.items()})

# %%
steps = pd.concat([lg.steps.assign(run=name) for name, lg in logs.items()], ignore_index=True)
steps["loss_sa (rolling 5)"] = steps.groupby("run")["loss_sa"].transform(lambda s: s.rolling(5, min_periods=1).mean())
fig = Figure(figsize=(11, 3.4), layout="constrained")
ax_lr, ax_loss = fig.subplots(1, 2)
sns.lineplot(data=steps, x="step", y="lr", hue="run", ax=ax_lr)
ax_lr.set(yscale="log", title="lr as logged")
sns.lineplot(data=steps, x="step", y="loss_sa (rolling 5)", hue="run", ax=ax_loss, legend=False)
ax_loss.set(title="SA branch loss (training)")
fig

# %%
rows = []
for name, lg in logs.items():
    ev = lg.evals.iloc[-1]
    rows.append({"run": name, "peak lr": lg.steps["lr"].max(), "train loss_sa (last 10)": lg.steps["loss_sa"].iloc[-10:].mean(),
                 "eval loss_sa": ev["loss_sa"], "acc_sa": ev["acc_sa"], "acc_glca": ev["acc_glca"],
                 "acc_fused": ev["acc_fused"]})
results = pd.DataFrame(rows).set_index("run")
results

# %%
assert np.isfinite(results.to_numpy(dtype=float)).all()
assert results["peak lr"].round(10).tolist() == [1.5625e-5, 6.25e-5, 5e-4, 5e-4]
acc = results["acc_fused"]
loss = results["eval loss_sa"]
print(f"sqrt − linear: accuracy {acc['sqrt'] - acc['linear']:+.4f}, eval loss {loss['sqrt'] - loss['linear']:+.4f}")
print(f"warm-up − no warm-up (sqrt): accuracy {acc['sqrt'] - acc['sqrt, no warm-up']:+.4f}, "
      f"eval loss {loss['sqrt'] - loss['sqrt, no warm-up']:+.4f}")

# %% [markdown]
# ## What actually fixes it
#
# The LR the paper's rule gives at global batch 16 is the right *rule*; whether its value is right for a given
# fine-tuning is an empirical question that 40 steps on a toy benchmark answer only for the short term (a short
# run favours a larger LR). The defensible choices are a rule named in the config and visible in the run
# (`train.lr_rule`, `cfg.derived['lr']`, the logged `lr`), overrides applied before the LR is derived, and an LR
# sweep rather than a formula change when training stalls. The doctor flags a peak LR more than 4× away from the
# linear rule (`lr-rule`), since the paper's two readings of its batch differ by exactly 4×.
#
# ## Verdict
#
# Thresholds: a difference in final fused accuracy of at least 0.05 (10 of the 200 test images) counts as
# "trains better"; smaller differences are nuanced, whatever the loss says. The claim that 1.6e-5 came from an
# incorrect formula is refuted when it equals the paper's rule at the seed's global batch.

# %%
THRESHOLD = 0.05


def compare(a, b):
    d = acc[a] - acc[b]
    return "confirmed" if d >= THRESHOLD else ("refuted" if d <= -THRESHOLD else "nuanced")


is_rule = lr_linear == 5e-4 * 16 / 512
verdict = pd.DataFrame([
    {"claim": "the paper's formula gives an 'extremely low' 1.6e-5 (an incorrect scaling)",
     "measured": f"linear rule at global batch 16 = {lr_linear:.4e}; sqrt − linear accuracy after 40 steps "
                 f"{acc['sqrt'] - acc['linear']:+.3f}",
     "verdict": ("nuanced" if compare("sqrt", "linear") == "confirmed" else "refuted") if is_rule else "confirmed"},
    {"claim": "the sqrt rule's 5e-4 (32× the linear rule) trains better",
     "measured": f"fused accuracy {acc['sqrt']:.3f} vs {acc['linear']:.3f} (linear), {acc['linear_per_gpu']:.3f} "
                 f"(per-GPU); eval loss {loss['sqrt']:.3f} vs {loss['linear']:.3f}",
     "verdict": compare("sqrt", "linear")},
    {"claim": "warm-up helps (sqrt rule)",
     "measured": f"fused accuracy {acc['sqrt']:.3f} with vs {acc['sqrt, no warm-up']:.3f} without; eval loss "
                 f"{loss['sqrt']:.3f} vs {loss['sqrt, no warm-up']:.3f}",
     "verdict": compare("sqrt", "sqrt, no warm-up")},
    {"claim": "batch 2 × accumulation 8 (instead of 4 × 4) changes the LR",
     "measured": f"global batch 16 both; LRs equal under every rule: {bool(rules.groupby('rule')['lr'].nunique().eq(1).all())}",
     "verdict": "refuted" if rules.groupby("rule")["lr"].nunique().eq(1).all() else "confirmed"},
    {"claim": "dcal: `--set train.batch_size` changes the derived LR (no overrides-ignored bug)",
     "measured": f"batch 8/16/32 → {', '.join(f'{x:.4e}' for x in overrides['derived lr'])}; trainer {lr_trainer:.4e}",
     "verdict": "confirmed" if overrides["derived lr"].is_monotonic_increasing and overrides["derived lr"].nunique() == 3
     else "refuted"},
])
verdict

# %% [markdown]
# ## Summary
#
# - 1.5625e-5 is exactly the paper's (DeiT's) linear rule 5e-4·16/512; the per-GPU reading gives 6.25e-5; the
#   seed's sqrt rule gives 5e-4, 32× the linear rule, and moving from 4 × 4 to 2 × 8 changed nothing.
# - `dry_run_lr` shows the schedule the trainer really runs: 5 warm-up epochs start at 2.7e-7 and reach the peak
#   only after 1 870 steps.
# - The short runs measure what a larger LR does in 40 steps; the verdict table says whether it helped here.
# - In `dcal`, overrides are applied before the LR is derived, and the doctor names the rule behind a peak LR.
