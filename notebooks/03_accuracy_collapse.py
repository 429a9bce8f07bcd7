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
# # Fix 3: accuracy falling from 15.38 % to 1.17 %
#
# The seed system's validation accuracy reached 15.38 % and then fell to 1.17 %. Its authors blamed bugs in the
# attention rollout, PWCA and the loss weighting, and added NaN/Inf checks and fallbacks. Its optimiser, though,
# was `torch.optim.Adam(weight_decay=0.05)` (L2 *coupled* to Adam's normalised step) with the gradient clipped
# to a total norm of 1.0 over 93.65 M parameters. This notebook reproduces the rise-then-fall under those
# conditions, scaled to a CPU budget, on a DCAL whose attention is tested; measures which weights the decay
# dominates; runs the doctor; applies the seed's own "fix" (the sqrt LR rule and warm-up) to the same run; then the
# real fix (AdamW); and ends with what NaN/Inf checks can and cannot see.

# %%
# %matplotlib inline
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from tqdm.auto import tqdm

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 120)

import diagnostics
from dcal.callbacks import Callback
from dcal.config import apply_overrides, preset
from dcal.schedule import lr_for_rule, warmup_cosine
from dcal.train import build_trainer, model_from_config
from dcal_studies.verdicts import combine, format_measured, judge, report
from diagnostics.doctor import COLLAPSE_FRACTION

SEED = Path("seed_evidence")  # the seed's log, its per-epoch numbers and facts (sources in its README)
facts = yaml.safe_load((SEED / "facts.yaml").read_text())
epochs = pd.read_csv(SEED / "seed_run_epochs.csv").set_index("epoch")
print("source:", facts["source"])

# %% [markdown]
# ## The seed's own numbers
#
# From its training log (`seed_evidence/`, commit 6a4e6b6; the code that produced it is commit 9b6147a): ViT-B/16
# on CUB-200 (C = 200, chance 0.5 %), global batch 16, LR 1.5625e-5 printed as 0.000016 then 0.000015. Training
# loss and accuracy per epoch, validation every 5 epochs:

# %% tags=["exact-numbers"]
epochs[["lr", "train_loss_sa", "train_acc_sa", "val_top1_pct"]]

# %% tags=["exact-numbers"]
val = facts["validation_top1_pct"]
low_epoch, top_epoch = int(epochs["train_loss_sa"].idxmin()), int(epochs["train_acc_sa"].idxmax())
seed_rise = epochs["train_loss_sa"].iloc[-1] / epochs["train_loss_sa"].min() - 1
print(f"train SA loss lowest at epoch {low_epoch}, train SA accuracy highest at epoch {top_epoch}; "
      f"then the loss rises by {seed_rise:.1%} to epoch 15 while the LR stays at {epochs['lr'].min()}–{epochs['lr'].max()}")
print(f"validation top-1: {val[5]} % (epoch 5) → {val[10]} % → {val[15]} % (epoch 15); "
      f"final / best = {val[15] / val[5]:.3f}")
assert low_epoch == top_epoch == 4 and (val[5], val[15]) == (15.38, 1.17)
assert epochs["lr"].is_monotonic_decreasing and seed_rise > 0.04

# %% [markdown]
# The model learned for four epochs and then unlearned, at a flat LR, with no NaN in the log. The run doctor reads
# the log as it is (`diagnostics.diagnose` on the text file) and says so:

# %%
seed_findings = {f.code: f for f in diagnostics.diagnose(SEED / "train_log.txt", num_classes=200)}
print(sorted(seed_findings))
print(seed_findings["loss-rising"].message)
assert {"loss-rising", "accuracy-collapse"} <= set(seed_findings) and "nonfinite" not in seed_findings
assert "coupled-weight-decay" not in seed_findings  # a text log does not say which optimiser ran

# %% [markdown]
# ## The seed's conditions, scaled to a CPU
#
# Adam with L2 adds wd·θ to the gradient *before* Adam divides by the gradient's running RMS. A weight whose data
# gradient is small next to wd·|θ| then moves by ≈ lr·sign(θ) per step: towards zero, by one learning rate, whatever
# wd is. Clipping the total norm to 1.0 over 93.65 M parameters bounds the RMS per-weight gradient to
# 1/√93.65 M ≈ 1e-4, while 0.05·|θ| is ≈ 1e-3 for a typical ViT weight of 0.02: it makes almost every weight
# decay-dominated. We keep what sets that balance and scale the rest:
#
# - **clipping**: the same per-weight RMS bound, i.e. clip = 1.0·√(P / 93.65 M) for our P parameters;
# - **LR × steps**: Adam moves a decay-dominated weight by ≈ lr per step, so erosion is set by Σlr. We keep the
#   seed's Σlr over its 15 logged epochs (its cosine from 1.5625e-5, per optimiser step) and spend it in 60 steps,
#   at a flat LR, as the seed's (its cosine was still above 95 % of the peak at epoch 15);
# - **the rest** as in the seed: Adam with coupled L2 0.05 on every parameter (the w_i included), global batch 16,
#   the paper's 3-branch DCAL from a pretrained backbone; C = 10 classes of the embedded benchmark instead of 200.

# %%
run, opt_facts = facts["run"], facts["optimizer"]
SEED_STEPS_PER_EPOCH = run["micro_batches_per_epoch"] / run["accumulation"]  # 374.5
SEED_STEPS = round(run["epochs_logged"] * SEED_STEPS_PER_EPOCH)
SEED_TOTAL = round(run["epochs_planned"] * SEED_STEPS_PER_EPOCH)
SUM_LR = sum(warmup_cosine(k, total_steps=SEED_TOTAL, warmup_steps=0, peak=opt_facts["lr"], floor=0.0)
             for k in range(SEED_STEPS))
STEPS, STEPS_PER_EPOCH, C = 60, 10, 10  # 160 training images at batch 16: an evaluation every 10 steps
LR = SUM_LR / STEPS
P_SEED = run["parameters_millions"] * 1e6
demo = apply_overrides(preset("demo"), [f"data.synthetic={{num_classes: {C}}}"])
P_OURS = sum(p.numel() for p in model_from_config(demo, C).parameters())
CLIP = opt_facts["clip_grad_norm"] * math.sqrt(P_OURS / P_SEED)
w_logged = epochs["w_sa"].iloc[-1]  # Adam moves w by ≈ lr per step (notebook 04): the log's own Σlr meter
conditions = pd.DataFrame({
    "seed (log, code 9b6147a)": [f"{run['parameters_millions']} M", opt_facts["clip_grad_norm"], SEED_STEPS,
                                 format_measured(SUM_LR), format_measured(SUM_LR / SEED_STEPS), run["batch_effective"],
                                 run["num_classes"]],
    "here": [f"{P_OURS / 1e6:.3g} M", format_measured(CLIP), STEPS, format_measured(SUM_LR), format_measured(LR), 16, C]},
    index=["parameters", "clip (total norm)", "optimiser steps", "Σlr", "lr (mean)", "global batch", "classes"])
conditions

# %%
print(f"per-weight RMS gradient bound: seed {opt_facts['clip_grad_norm'] / math.sqrt(P_SEED):.2e}, "
      f"here {CLIP / math.sqrt(P_OURS):.2e}; Σlr {SUM_LR:.3g} vs the logged w_SA at epoch 15: {w_logged}")
assert math.isclose(CLIP / math.sqrt(P_OURS), 1 / math.sqrt(P_SEED))
assert abs(SUM_LR - w_logged) < 0.05 * SUM_LR  # the log's w agrees with the Σlr we keep

# %% [markdown]
# A callback measures, at every optimiser step after clipping, the share of weights whose decay term is larger
# than their data gradient (|0.05·θ| > |g|), the same share had the gradient not been clipped, and Σθ² of the
# weight matrices (erosion). Both optimisers, 3 seeds each (the seed varies initialisation of the new heads and
# the data order), an evaluation every 10 steps; the NaN/Inf check runs at every step.

# %%
class DecayShare(Callback):
    """Per optimiser step (after clipping): the share of weights with |wd·θ| > |g|, the same share for the
    gradient before clipping, and Σθ² of the weight matrices."""

    def __init__(self, wd):
        self.wd, self.rows = wd, []

    def before_step(self, trainer):
        unclip = max(1.0, float(trainer.grad_norm) / trainer.cfg.train.clip_grad)  # what clipping divided g by
        n = dominated = dominated_raw = 0
        sum_sq = 0.0
        with torch.no_grad():
            for p in trainer.model.parameters():
                if p.grad is None:
                    continue
                decay, g = self.wd * p.abs(), p.grad.abs()
                dominated += int((decay > g).sum())
                dominated_raw += int((decay > unclip * g).sum())
                n += p.numel()
                sum_sq += float(p.pow(2).sum()) if p.ndim >= 2 else 0.0
        self.rows.append({"step": trainer.step + 1, "decay-dominated": dominated / n,
                          "decay-dominated, unclipped": dominated_raw / n, "sum_sq": sum_sq})


WORK = Path(tempfile.mkdtemp(prefix="dcal_nb03_"))
SEEDS = (0, 1, 2)
BASE = [f"data.synthetic={{num_classes: {C}, train_per_class: 16, test_per_class: 10, seed: 0}}",
        "train.batch_size=16", f"train.epochs={STEPS // STEPS_PER_EPOCH}", "train.lr_rule=fixed",
        "train.weight_decay=0.05", f"train.clip_grad={CLIP}", "train.progress=false", "train.save_best=false"]


def schedule(lr, warmup_steps=0):
    """A flat LR (the cosine's floor = its peak) after `warmup_steps` of linear warm-up."""
    return [f"train.lr={lr}", f"train.min_lr={lr}", f"train.warmup_epochs={warmup_steps / STEPS_PER_EPOCH}"]


def train_all(plan, desc):
    """Train every (name, optimizer, overrides) of `plan` for each seed; a progress bar over the runs."""
    out, t0 = {}, time.perf_counter()
    for (name, optimizer, extra), seed in tqdm([(p, s) for p in plan for s in SEEDS], desc=desc):
        share = DecayShare(0.05)
        cfg = apply_overrides(preset("demo"), BASE + extra + [f"train.optimizer={optimizer}", f"train.seed={seed}"])
        trainer = build_trainer(cfg, WORK / f"{name}_seed{seed}", callbacks=[share, diagnostics.NonFiniteCallback()])
        trainer.fit()
        out[name, seed] = {"log": diagnostics.load_run(WORK / f"{name}_seed{seed}"), "share": pd.DataFrame(share.rows),
                           "trainer": trainer}
    print(f"{len(out)} runs of {STEPS} steps in {time.perf_counter() - t0:.0f} s")
    return out


runs = train_all([("adam_l2", "adam_l2", schedule(LR)), ("adamw", "adamw", schedule(LR))], "seed's conditions")

# %% [markdown]
# Accuracy, training loss and the decay-dominated share, per seed:

# %%
COLORS = {"adam_l2": "tab:red", "adamw": "tab:blue", "sqrt + warm-up": "tab:orange"}
ACC = "acc_sa"  # the seed's log tracks the SA branch (train SA loss and accuracy): so do the verdicts


def plot_runs(names):
    fig = Figure(figsize=(13, 3.4), layout="constrained")
    ax_a, ax_l, ax_d = fig.subplots(1, 3)
    for (name, seed), r in runs.items():
        if name not in names:
            continue
        kw = dict(color=COLORS[name], alpha=0.8, label=name if seed == 0 else None)
        ax_a.plot(r["log"].evals["step"], r["log"].evals[ACC], marker="o", ms=3, **kw)
        ax_l.plot(r["log"].steps["step"], r["log"].steps["loss_sa"].rolling(10, min_periods=1).mean(), **kw)
        ax_d.plot(r["share"]["step"], r["share"]["decay-dominated"], **kw)
    ax_a.axhline(1 / C, color="grey", ls=":", lw=0.8)
    ax_a.set(xlabel="optimiser step", ylabel="test accuracy (SA)", title=f"evaluation (chance {1 / C})", ylim=(0, 1))
    ax_l.set(xlabel="optimiser step", ylabel="SA loss (rolling 10)", title="training loss")
    ax_d.set(xlabel="optimiser step", ylabel="share of weights", title="|0.05·θ| > |g| after clipping", ylim=(0, 1))
    for ax in (ax_a, ax_l, ax_d):
        ax.legend()
    return fig


plot_runs(("adam_l2", "adamw"))

# %% [markdown]
# Per optimiser, over the 3 seeds (mean ± standard deviation): the SA branch's best evaluation and its step, the
# last one and their ratio, the fused (SA + GLCA, DCAL's inference) accuracy at the end, and how far the training SA
# loss ended above its lowest (10-step means).

# %% tags=["nbval-ignore-output"]
def per_seed(name):
    rows = []
    for seed in SEEDS:
        r = runs[name, seed]
        ev, loss = r["log"].evals, r["log"].steps["loss_sa"].rolling(10).mean()
        share = r["share"]
        rows.append({"best acc": ev[ACC].max(), "best at step": ev.loc[ev[ACC].idxmax(), "step"],
                     "final acc": ev[ACC].iloc[-1], "final / best": ev[ACC].iloc[-1] / ev[ACC].max(),
                     "final acc, fused": ev["acc_fused"].iloc[-1], "loss rise": loss.iloc[-1] / loss.min() - 1,
                     "decay-dominated, step 1": share["decay-dominated"].iloc[0],
                     "… unclipped, step 1": share["decay-dominated, unclipped"].iloc[0],
                     "Σθ² end / start": share["sum_sq"].iloc[-1] / share["sum_sq"].iloc[0]})
    return pd.DataFrame(rows)


# The floor of every printed spread: one test image in 100 (accuracies, and shares and ratios alike); steps are
# resolved to the evaluation interval, or to one step where measured every step.
RESOLUTION = {"best at step": STEPS_PER_EPOCH, "steps": 1.0}


def spread(values, column=None):
    """The std over seeds, floored at the column's resolution: no digit finer than the measurement resolves."""
    return max(values.std(), RESOLUTION.get(column, 0.01))


def fmt(values, column=None):
    return format_measured(values.mean(), spread(values, column))


def table(names):
    stats = {n: per_seed(n) for n in names}
    return stats, pd.DataFrame({n: {k: fmt(s[k], k) for k in s} for n, s in stats.items()})


stats, shown = table(("adam_l2", "adamw"))
shown

# %%
l2, aw = stats["adam_l2"], stats["adamw"]
assert (l2["best at step"] <= STEPS // 2).all() and (l2["final / best"] < COLLAPSE_FRACTION).all()
assert (aw["final acc"] > l2["final acc"].max()).all() and (l2["loss rise"] > 0.02).all()

# %% [markdown]
# Under Adam + L2 + clipping every seed rises in the first half of the run (a few seconds of CPU) and then falls below
# half its best while the training loss climbs at a flat LR: the seed's shape. Under AdamW, identical but for the
# decoupled decay, the same runs rise further and stay.
#
# ## Diagnose: which weights the decay dominates
#
# At the first step the decay term outweighs the clipped data gradient for almost every weight, under both
# optimisers (the share is a property of θ and g; only Adam + L2 feeds it to the step). Without the clip, little more
# than half would be. Under Adam + L2 the share then *falls*: the weights it dominated have been pulled to zero,
# where 0.05·|θ| is small. Σθ² of the weight matrices says the same:

# %% tags=["nbval-ignore-output"]
share_clip, share_raw = l2["decay-dominated, step 1"].mean(), l2["… unclipped, step 1"].mean()
erosion_l2, erosion_aw = l2["Σθ² end / start"], aw["Σθ² end / start"]
print(f"decay-dominated at step 1: {share_clip:.2f} with the clip, {share_raw:.2f} without; Σθ² end / start: "
      f"adam_l2 {fmt(erosion_l2)}, adamw {fmt(erosion_aw)}")
assert share_clip > 0.9 > share_raw + 0.2 and erosion_l2.max() < 0.5 < erosion_aw.min()

# %% [markdown]
# ## Diagnose: the run doctor
#
# `diagnostics.diagnose(run_dir)` on each run: `coupled-weight-decay` (the config says `adam_l2`; an error when the
# run also shows what erosion looks like), `loss-rising` (training loss rising at a flat or falling LR while accuracy
# falls) and `accuracy-collapse` (below half its best until the end). It also warns `lr-rule`: our scaled LR is far
# above DeiT's rule at batch 16, as it must be to spend the seed's Σlr in 60 steps.

# %%
CODES = ("coupled-weight-decay", "loss-rising", "accuracy-collapse", "nonfinite", "lr-rule")


def doctor(names):
    rows = {}
    for name, seed in runs:
        if name in names:
            found = {f.code: f.severity for f in diagnostics.diagnose(WORK / f"{name}_seed{seed}")}
            rows[f"{name}, seed {seed}"] = {c: found.get(c, "—") for c in CODES}
    return pd.DataFrame(rows).T


findings = doctor(("adam_l2", "adamw"))
findings

# %%
flagged = findings[list(CODES[:3])].ne("—").all(axis=1)
assert flagged[[f"adam_l2, seed {s}" for s in SEEDS]].all()
assert findings.loc[[f"adamw, seed {s}" for s in SEEDS], list(CODES[:4])].eq("—").all().all()
assert findings["nonfinite"].eq("—").all()  # not one NaN/Inf in any run: the tier-1 check ran every step

# %% [markdown]
# ## The seed's fix, measured: the sqrt rule and 5 warm-up epochs
#
# The seed's answer to its LR was 5e-4·√(batch/16): 32× the paper's rule at batch 16, reached after 5 warm-up epochs.
# Scaled the same way: 32× our LR, with warm-up over the first 5/15 of the 60 steps, still Adam + L2 + clipping.
# Under coupled L2 a 32× LR is a 32× faster erosion: Σlr grows from 0.086 to about 2.3.

# %%
SQRT_FACTOR = lr_for_rule("sqrt", batch_size=4, grad_accum_steps=4) / lr_for_rule("linear", batch_size=4, grad_accum_steps=4)
WARMUP = round(STEPS * 5 / run["epochs_logged"])
assert SQRT_FACTOR == 32
runs.update(train_all([("sqrt + warm-up", "adam_l2", schedule(SQRT_FACTOR * LR, WARMUP))], "the seed's fix"))
plot_runs(("adam_l2", "sqrt + warm-up"))

# %% tags=["nbval-ignore-output"]
def steps_to_half(name):
    """Per seed: the first step at which Σθ² is below half its value at step 1."""
    return pd.Series([int(r["share"].loc[r["share"]["sum_sq"] < 0.5 * r["share"]["sum_sq"].iloc[0], "step"].iloc[0])
                      for (n, _), r in runs.items() if n == name])


stats_fix, shown_fix = table(("adam_l2", "sqrt + warm-up"))
fix = stats_fix["sqrt + warm-up"]
half_l2, half_fix = steps_to_half("adam_l2"), steps_to_half("sqrt + warm-up")
shown_fix.loc["steps until Σθ² halves"] = [fmt(h, "steps") for h in (half_l2, half_fix)]
shown_fix

# %%
assert (half_fix < half_l2).all() and fix["best acc"].max() < 2 / C < l2["best acc"].min()

# %% [markdown]
# The seed's fix does not fix it: the weights halve their squared norm in less than half the steps, and the accuracy
# never gets away from chance (its best evaluation stays below 2× chance; by step 10 the warm-up has already spent
# more than the seed's whole Σlr).
# Nothing about it addresses the coupling.
#
# ## The real fix: decoupled weight decay
#
# `torch.optim.AdamW` subtracts lr·wd·θ *after* the Adam step (here 1.4e-3 × 0.05 = 7e-5 of θ per step), and
# `dcal.param_groups` decays only weight matrices (not biases, norms, tokens or the w_i). It is `dcal`'s default;
# the doctor flags `train.optimizer=adam_l2` as `coupled-weight-decay`. Above, the AdamW runs at the seed's
# scaled LR, clipping and Σlr keep what they learn (final / best close to 1, no finding).
#
# ## What NaN/Inf checks can find
#
# No run above produced a single non-finite value: NaN/Inf checks cannot see erosion. They are for a value that
# overflows, and the useful answer then is *where* it started. `diagnostics.NonFiniteDetector` hooks every module and
# raises at the first one whose output (forward) or input gradient (backward) goes non-finite. On a fine-tuned
# AdamW model and one training batch, make `backbone.blocks.2.mlp.fc1`'s output overflow (× 1e39) with a hook:

# %%
trainer = runs["adamw", 0]["trainer"]
model, loss_fn = trainer.model.train(), trainer.loss_fn
batch = next(iter(trainer.train_loader))
x, y = batch["image"], batch["label"]


def train_pass():
    out = model(x)
    loss_fn([F.cross_entropy(z, y) for z in (out.sa_logits, out.glca_logits, out.pwca_logits)]).backward()


def outcome(fn):
    """What `fn` raised, in a line without its machine-dependent numbers: the type and where."""
    try:
        with warnings.catch_warnings():  # anomaly mode warns with the forward trace
            warnings.simplefilter("ignore")
            fn()
    except diagnostics.NonFiniteError as e:
        return f"NonFiniteError: {e.phase} at {e.module}", e
    except Exception as e:  # noqa: BLE001 — we show whatever the others raise
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}", e
    return "no error raised", None


def under_anomaly():
    with torch.autograd.detect_anomaly():
        train_pass()


def under_detector():
    with diagnostics.NonFiniteDetector(model, extra={"loss_fn": loss_fn}):
        train_pass()


def compare(make_fault):
    hook = make_fault()
    try:
        return {name: outcome(fn) for name, fn in (("plain run", train_pass), ("detect_anomaly", under_anomaly),
                                                   ("NonFiniteDetector", under_detector))}
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)


fwd = compare(lambda: model.backbone.blocks[2].mlp.fc1.register_forward_hook(lambda m, a, out: out * 1e39))
for name, (line, _) in fwd.items():
    print(f"{name:18s} {line}")
assert (fwd["NonFiniteDetector"][1].module, fwd["NonFiniteDetector"][1].phase) == ("backbone.blocks.2.mlp.fc1", "forward")

# %% [markdown]
# Without the detector, DCAL stops at the symptom: the rollout finds block 3's attention map non-finite
# (`RolloutError`), and anomaly mode, which checks backward outputs only, never gets to speak. A backward NaN: the
# L2 norm of a zero vector has value 0 and a NaN gradient; add one to `backbone.blocks.1.mlp.fc2`'s output:

# %%
def zero_norm(module, args, out):
    return out + torch.sqrt((out - out).pow(2).sum(-1, keepdim=True))  # = out in forward; NaN in backward


bwd = compare(lambda: model.backbone.blocks[1].mlp.fc2.register_forward_hook(zero_norm))
for name, (line, _) in bwd.items():
    print(f"{name:18s} {line}")
assert (bwd["NonFiniteDetector"][1].module, bwd["NonFiniteDetector"][1].phase) == ("backbone.blocks.1.mlp.fc2", "backward")
assert bwd["plain run"][1] is None and "SqrtBackward0" in bwd["detect_anomaly"][0]

# %% [markdown]
# A plain run raises nothing: the NaN goes silently into `.grad`. Anomaly mode names the autograd op; the detector
# names the module. In a training run, `diagnostics.NonFiniteCallback` (attached to every run above) checks the
# losses, the w_i and the gradient norm every step and, when one is non-finite, replays the micro-batch under the
# detector.
#
# ## Verdicts
#
# Thresholds: the accuracy "rises" when its best evaluation is above 2× chance (0.2, what notebook 01 calls learning;
# one standard error on 100 test images is ≤ 0.05); it "falls" when the last evaluation is below half the best (the doctor's `COLLAPSE_FRACTION`);
# a fix "helps" when it raises the final accuracy by more than 0.1 (two standard errors); erosion is "faster" when
# Σθ² halves in fewer steps (ratio of steps > 1). Spreads are standard deviations over the 3 seeds, floored at 0.01.

# %% tags=["nbval-ignore-output"]
RISE, HELPS = 2 / C, 0.1


def diff(a, b):
    """Mean and spread of a − b over seeds (independent runs: the spreads add in quadrature)."""
    return a.mean() - b.mean(), math.hypot(spread(a), spread(b))


budget = f"{STEPS} steps × 3 seeds"
v_rise = judge("the accuracy rises", l2["best acc"].mean(), RISE, spread=spread(l2["best acc"]),
               quantity="best accuracy (adam_l2)", budget=budget).expect("confirmed")
v_fall = judge("then falls below half its best", l2["final / best"].mean(), COLLAPSE_FRACTION, holds_if="<",
               spread=spread(l2["final / best"]), quantity="final / best (adam_l2)", budget=budget).expect("confirmed")
v_symptom = combine("the seed's rise-then-fall reproduces under Adam + coupled L2 + clipping", [v_rise, v_fall])
v_bugs = judge("the collapse needs bugs in attention or loss weighting (FIXES_SUMMARY's root cause)",
               l2["final / best"].mean(), COLLAPSE_FRACTION, holds_if=">", spread=spread(l2["final / best"]),
               quantity="final / best of a DCAL whose attention is tested, under the seed's optimiser")
v_clip = judge("clipping over all parameters makes almost every weight decay-dominated", share_clip - share_raw, 0.1,
               quantity="decay-dominated share at step 1, clipped − unclipped")
v_nan = judge("NaN/Inf checks address the accuracy drop (the seed's fix)",
              float(findings["nonfinite"].ne("—").sum()), 0.5, quantity="runs with a non-finite value")
d_fix, s_fix = diff(fix["final acc"], l2["final acc"])
v_sqrt = judge("the sqrt LR (32×) + warm-up fixes the collapse (the seed's fix)", d_fix, HELPS, spread=s_fix,
               quantity="Δ final accuracy, sqrt + warm-up − adam_l2")
v_faster = judge("under coupled L2 it erodes faster", (half_l2 / half_fix).mean(), 1.0, spread=spread(half_l2 / half_fix),
                 quantity="steps to halve Σθ²: adam_l2 / sqrt + warm-up")
d_aw, s_aw = diff(aw["final acc"], l2["final acc"])
v_adamw = judge("AdamW (decoupled) keeps what it learns (the real fix)", d_aw, HELPS, spread=s_aw,
                quantity="Δ final accuracy, adamw − adam_l2")
v_doctor = judge("the doctor flags coupled-weight-decay, loss-rising and accuracy-collapse on the eroding runs only",
                 float(flagged.sum() == len(SEEDS) and findings.loc[flagged].index.str.startswith("adam_l2").all()), 0.5,
                 quantity="all 3 adam_l2 runs flagged, no adamw run (1 = yes)")
v_detector = judge("the detector names the module where a NaN/Inf starts",
                   float(fwd["NonFiniteDetector"][1].module.endswith("blocks.2.mlp.fc1")
                         and bwd["NonFiniteDetector"][1].module.endswith("blocks.1.mlp.fc2")), 0.5,
                   quantity="both planted faults named (1 = yes)")
verdicts = [v_symptom.expect("confirmed"), v_bugs.expect("refuted"), v_clip.expect("confirmed"),
            v_nan.expect("refuted"), v_sqrt.expect("refuted"), v_faster.expect("confirmed"), v_adamw.expect("confirmed"),
            v_doctor.expect("confirmed"), v_detector.expect("confirmed")]
print(report(verdicts))

# %% [markdown]
# ## Against the seed's numbers
#
# The reproduction next to the log. The shape and its cause match; the levels differ, as they must with
# C = 10 against C = 200 and a toy benchmark against CUB.

# %% tags=["nbval-ignore-output"]
seed_col = {"rise, then fall": f"train acc best at epoch {top_epoch} of 15; val {val[5]} % → {val[15]} %",
            "best at (share of the run)": f"{top_epoch / run['epochs_logged']:.2f} (train)",
            "final / best": f"{val[15] / val[5]:.2f} (val)",
            "training loss rise after its low": f"{seed_rise:.1%} (SA)",
            "LR during the fall": "flat (0.000016 → 0.000015)",
            "Σlr": format_measured(SUM_LR),
            "non-finite values": "none in the log"}
ours = {"rise, then fall": f"best {fmt(l2['best acc'])} → final {fmt(l2['final acc'])} (chance {1 / C})",
        "best at (share of the run)": format_measured((l2["best at step"] / STEPS).mean(), STEPS_PER_EPOCH / STEPS),
        "final / best": fmt(l2["final / best"]),
        "training loss rise after its low": f"{format_measured(100 * l2['loss rise'].mean(), 100 * spread(l2['loss rise']))} % (SA)",
        "LR during the fall": "flat", "Σlr": format_measured(SUM_LR), "non-finite values": "none (checked every step)"}
pd.DataFrame({"seed (CUB, ViT-B, C = 200)": seed_col, "here: adam_l2, 3 seeds (toy, C = 10)": ours})

# %% [markdown]
# ## Summary
#
# - The seed's log shows a model that learned for 4 epochs, then unlearned at a flat LR without a NaN; the doctor
#   reads `loss-rising` and `accuracy-collapse` from the log alone.
# - Adam with coupled L2 0.05 and a clip over all parameters (scaled to keep the per-weight gradient bound), at the
#   seed's Σlr, reproduces that rise-then-fall on the embedded benchmark in 3 of 3 seeds; AdamW, identical but for the
#   decoupled decay, does not. The clip is what makes almost every weight decay-dominated; the doctor flags the
#   eroding runs (`coupled-weight-decay` as an error, `loss-rising`, `accuracy-collapse`) and none of the AdamW runs.
# - The seed's own fix (sqrt rule, 32× the LR, plus warm-up) erodes the weights faster and does not recover the
#   accuracy; its NaN/Inf checks see nothing here. The fix is decoupled weight decay (`train.optimizer=adamw`,
#   the default); NaN/Inf checks are for overflows, where the detector names the module.
