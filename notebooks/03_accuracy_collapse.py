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
# The seed system's accuracy rose to 15.38 % and then fell to 1.17 %. Its authors blamed bugs in the attention
# rollout, PWCA and the loss weighting, and added NaN/Inf checks and fallbacks. Its optimiser, though, was
# `torch.optim.Adam(weight_decay=0.05)`: L2 *coupled* to Adam's normalised step, which pulls every weight whose
# gradient is small towards zero by about one learning rate per step. This notebook fine-tunes the project's
# pretrained backbone with that optimiser and with AdamW, measures the weights and the accuracy over time, runs the
# run doctor on both, and then shows what NaN/Inf checks do find: the module where a non-finite value starts.

# %%
# %matplotlib inline
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
random.seed(0)
pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 200)

import diagnostics
from dcal.callbacks import Callback
from dcal.config import PRETRAINED_DIR, apply_overrides, preset
from dcal.train import build_trainer

BACKBONE = PRETRAINED_DIR / "dcal_vit_p8_synth.safetensors"
print(f"pretrained backbone: {BACKBONE.name}, present: {BACKBONE.exists()}")

# %% [markdown]
# ## Symptom
#
# From the seed's `FIXES_SUMMARY.md`:
#
# > **Problem**: Accuracy dropped from 15.38% to 1.17% over epochs
# > **Root Cause**: Multiple issues in attention mechanisms and loss weighting
# > **Fixes**: Fixed GLCA attention rollout computation with better error handling; Improved PWCA forward pass
# > implementation; Added numerical stability checks for NaN/Inf values; Better initialization of uncertainty weights
#
# ## Reproduce: coupled L2 against decoupled weight decay
#
# Adam with L2 adds wd·θ to the gradient *before* Adam divides by the gradient's running RMS. For a weight whose loss
# gradient is small, the step becomes lr·(wd·θ)/|wd·θ| = lr·sign(θ): it shrinks by about one learning rate per
# step whatever wd is. AdamW subtracts lr·wd·θ after the Adam step instead (here 5e-4 × 0.05 = 2.5e-5 of θ per step).
#
# The experiment: the demo DCAL (a 4-block ViT with 8-px patches, 64 px) starts from the project's backbone,
# pre-trained on the synthetic `pretrain` family (other glyph classes, disjoint from the benchmark's), and is
# fine-tuned on 10 benchmark classes (40 training images per class, 20 test) for 4 epochs (100 optimiser steps). The
# seed's setting: global batch 16 (16 × 1 here; the LR depends only on the global batch), its sqrt rule's 5e-4, weight
# decay 0.05. The seed failed around epoch 16 of 100, when its cosine schedule was still above 90 % of the peak, so
# after half an epoch of warm-up the LR is held at the peak (`train.min_lr=5e-4`). Two runs, identical but for
# `train.optimizer`: `adam_l2` (the seed's `torch.optim.Adam(weight_decay=0.05)`, every parameter decayed) and
# `adamw` (decoupled, no decay on biases, norms, tokens and w_i). Both carry the NaN/Inf callback (tier 1 every step).

# %%
class WeightNorms(Callback):
    """Per step: Σθ² of the backbone's weight matrices, ‖θ‖ of a few parameters, and the signed move of |θ| of
    fc1's entries whose loss gradient is small (|g| < 0.1·wd·|θ|: the decay term dominates what Adam sees)."""

    TRACK = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "norm.weight")

    def __init__(self, wd):
        self.wd, self.rows = wd, []

    def before_step(self, trainer):  # gradients are ready, the step has not run yet
        p = trainer.model.backbone.blocks[2].mlp.fc1.weight
        self.before = p.detach().abs().clone()
        self.small = p.grad.abs() < 0.1 * self.wd * self.before

    def after_step(self, trainer):
        bb = trainer.model.backbone
        params = dict(bb.named_parameters())
        lr = trainer.record["lr"]
        with torch.no_grad():
            moved = bb.blocks[2].mlp.fc1.weight.abs() - self.before  # change of |θ| per entry this step
            row = {"step": trainer.step, "lr": lr,
                   "sum_sq": sum(float(p.pow(2).sum()) for p in params.values() if p.ndim >= 2),
                   "small-gradient fraction": float(self.small.float().mean()),
                   "move / lr": float(moved[self.small].median()) / lr}
            row.update({name: float(params[name].norm()) for name in self.TRACK})
        self.rows.append(row)


WORK = Path(tempfile.mkdtemp(prefix="dcal_nb03_"))
BASE = ["data.synthetic={num_classes: 10, train_per_class: 40, test_per_class: 20, seed: 0}",
        f"model.pretrained={BACKBONE}", "train.epochs=4", "train.batch_size=16", "train.lr_rule=sqrt",
        "train.base_lr=5e-4", "train.min_lr=5e-4", "train.warmup_epochs=0.5", "train.weight_decay=0.05",
        "train.progress=false", "train.save_best=false"]
runs, norms = {}, {}
for opt in ("adam_l2", "adamw"):
    cb = WeightNorms(0.05)
    trainer = build_trainer(apply_overrides(preset("demo"), BASE + [f"train.optimizer={opt}"]), WORK / opt,
                            callbacks=[cb, diagnostics.NonFiniteCallback("raise")])
    trainer.fit()
    runs[opt], norms[opt] = diagnostics.load_run(WORK / opt), pd.DataFrame(cb.rows)
    print(f"{opt}: lr {trainer.cfg.derived['lr']:.4e}, {trainer.step} steps, optimiser {type(trainer.optimizer).__name__}")

# %% [markdown]
# The backbone's squared weight norm and the evaluation accuracy, per run:

# %%
fig = Figure(figsize=(13, 3.4), layout="constrained")
ax_w, ax_m, ax_a = fig.subplots(1, 3)
for opt in runs:
    ax_w.plot(norms[opt]["step"], norms[opt]["sum_sq"], label=opt)
    ax_m.plot(norms[opt]["step"], norms[opt]["move / lr"].rolling(5, min_periods=1).mean(), label=opt)
    ev = runs[opt].evals
    ax_a.plot(ev["epoch"], ev["acc_fused"], marker="o", label=f"{opt} fused")
    ax_a.plot(ev["epoch"], ev["acc_sa"], marker=".", ls="--", label=f"{opt} SA")
ax_w.set(xlabel="optimiser step", ylabel="Σθ² (backbone weight matrices)", title="backbone weights")
ax_m.axhline(-1, color="grey", lw=0.8, ls=":")
ax_m.set(xlabel="optimiser step", ylabel="median Δ|θ| / lr (rolling 5)", title="fc1, small-gradient entries")
ax_a.set(xlabel="epoch", ylabel="test accuracy", title="evaluation (10 classes, chance 0.1)", ylim=(0, 1))
for ax in (ax_w, ax_m, ax_a):
    ax.legend()
fig

# %%
acc = pd.DataFrame({f"{opt} {b}": runs[opt].evals.set_index("epoch")[f"acc_{b}"] for opt in runs for b in ("sa", "fused")})
acc.round(4)

# %%
EARLY = 25  # the first quarter of the run: most of fc1's weights are still away from zero
rows = []
for opt, df in norms.items():
    first, last = df.iloc[0], df.iloc[-1]
    rows.append({"optimizer": opt, "Σθ² after step 1": first["sum_sq"], "Σθ² at the end": last["sum_sq"],
                 "end / start": last["sum_sq"] / first["sum_sq"],
                 **{f"‖{k}‖ end / start": last[k] / first[k] for k in WeightNorms.TRACK},
                 "small-gradient fraction of fc1": df["small-gradient fraction"].mean(),
                 f"median Δ|θ| / lr, steps 1-{EARLY}": df["move / lr"].iloc[:EARLY].median(),
                 "median Δ|θ| / lr, all steps": df["move / lr"].median()})
weights = pd.DataFrame(rows).set_index("optimizer")
weights.T.round(4)

# %%
ratio = weights["end / start"]
shrink = weights[f"median Δ|θ| / lr, steps 1-{EARLY}"]
shrink_all = weights["median Δ|θ| / lr, all steps"]
fc1_abs = float(trainer.model.backbone.blocks[2].mlp.fc1.weight.detach().abs().median())  # AdamW run: ≈ the pretrained value
best = {opt: runs[opt].evals["acc_fused"].max() for opt in runs}
final = {opt: runs[opt].evals["acc_fused"].iloc[-1] for opt in runs}
print(f"Σθ² end/start: adam_l2 {ratio['adam_l2']:.4f}, adamw {ratio['adamw']:.4f}")
print(f"small-gradient |θ| per step, steps 1-{EARLY}: {shrink['adam_l2']:+.4f}·lr (adam_l2), {shrink['adamw']:+.4f}·lr "
      f"(adamw); all steps: {shrink_all['adam_l2']:+.4f}·lr, {shrink_all['adamw']:+.4f}·lr")
print(f"median |θ| of fc1 (adamw run, end) {fc1_abs:.4f}; Σ lr over the run {norms['adam_l2']['lr'].sum():.4f}")
n_test = int(runs["adamw"].evals["num_images"].iloc[-1])
stderr = (final["adamw"] * (1 - final["adamw"]) / n_test) ** 0.5
print("fused accuracy best → final: " + ", ".join(f"{o} {best[o]:.4f} → {final[o]:.4f}" for o in runs)
      + f"; one standard error on {n_test} test images ≈ {stderr:.4f}")
assert ratio["adam_l2"] < ratio["adamw"] and shrink["adam_l2"] < shrink["adamw"]
assert all(runs[o].evals[["acc_sa", "acc_fused"]].notna().all().all() for o in runs)

# %% [markdown]
# Read against the hypothesis. Under coupled L2, fc1's entries whose loss gradient is small next to wd·|θ| move
# toward zero by close to one learning rate per step while they are still away from zero (the first quarter of the
# run); later the median move fades, because a median fc1 weight (≈ 0.015) is only about 30 steps of 5e-4 from zero,
# where the weights then oscillate. Under AdamW the same entries wander without a direction (Adam's normalised step
# has the gradient's random sign). The backbone's weight matrices lose most of their squared norm under `adam_l2` in
# 100 steps and keep it under `adamw`.
#
# The accuracy did *not* collapse in this budget (no accuracy below half its best). The `adam_l2` run's last
# evaluation is lower than its best and than AdamW's, by two to three standard errors of a 200-image test set: a hint of
# what erosion does, from one seed, not a collapse. Eroding weights need not show in accuracy this early: the
# LayerNorm in front of every attention and MLP makes a ViT largely insensitive to the *scale* of its weight
# matrices, and the classes are learnt by the gradient-driven weights that the decay does not dominate. The seed ran
# about 6 000 steps (16 epochs of CUB at 2 × 8) near this LR: roughly 50 times the Σ lr of these 100 steps. Whether
# erosion that long ends in the seed's collapse is not something this run can show; it shows the mechanism only.
#
# ## Diagnose: the run doctor
#
# `diagnostics.diagnose(run_dir)` reads `metrics.jsonl` and `config.yaml` and reports what it finds, with the
# numbers. The checks that matter here: `coupled-weight-decay` (the config says `adam_l2`; an error when the
# accuracy also collapsed) and `accuracy-collapse` (an accuracy below half its best until the end of the run).

# %%
findings = {opt: diagnostics.diagnose(WORK / opt) for opt in runs}
doctor = pd.DataFrame([{"run": opt, "code": f.code, "severity": f.severity, "message": f.message[:140]}
                       for opt, fs in findings.items() for f in fs])
doctor

# %%
codes = {opt: {f.code for f in fs} for opt, fs in findings.items()}
collapsed = {opt: "accuracy-collapse" in codes[opt] for opt in runs}
print({opt: sorted(c) for opt, c in codes.items()})
assert "coupled-weight-decay" in codes["adam_l2"] and "coupled-weight-decay" not in codes["adamw"]
assert "nonfinite" not in codes["adam_l2"] | codes["adamw"]  # no NaN/Inf anywhere: a NaN check sees nothing here

# %% [markdown]
# ## The seed's fix, measured: what NaN/Inf checks can find
#
# NaN/Inf checks do not see weights shrinking: neither run produced a single non-finite value (the tier-1 check ran
# every step). What they are for is a different failure: a value that overflows. The useful answer then is *where*
# it started. `diagnostics.NonFiniteDetector` hooks every module and raises at the first one whose output (forward)
# or input gradient (backward) goes non-finite. Take the fine-tuned AdamW model and one training batch, and make
# `backbone.blocks.2.mlp.fc1`'s output 1e38 times too large with a forward hook:

# %%
model, loss_fn = trainer.model.train(), trainer.loss_fn  # training mode: PWCA on, as in a training step
batch = next(iter(trainer.train_loader))
x, y = batch["image"], batch["label"]


def train_pass():
    out = model(x)
    loss_fn([F.cross_entropy(z, y) for z in (out.sa_logits, out.glca_logits, out.pwca_logits)]).backward()


def first_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:260]}"


def detect():
    try:
        with diagnostics.NonFiniteDetector(model, extra={"loss_fn": loss_fn}):
            train_pass()
    except diagnostics.NonFiniteError as e:
        return e


def anomaly():
    try:
        with warnings.catch_warnings():  # anomaly mode warns, and prints the forward trace as a warning
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly():
                train_pass()
    except Exception as e:  # noqa: BLE001 — we print whatever it raises
        return e


fc1 = model.backbone.blocks[2].mlp.fc1
hook = fc1.register_forward_hook(lambda module, args, out: out * 1e38)
e38 = detect()
hook.remove()
print(first_line(e38))

# %% [markdown]
# 1e38 does not overflow float32 (max 3.4e38) at fc1 itself: the first non-finite value appears one block later, in
# `blocks.3.norm1`, whose variance squares inputs of ~4e37, and that is what the detector names, with the huge but
# finite input in its message pointing back upstream. A factor that does overflow at fc1 (1e39 × an activation of
# order 1 is past 3.4e38) is pinned to fc1:

# %%
hook = fc1.register_forward_hook(lambda module, args, out: out * 1e39)
model.zero_grad(set_to_none=True)
try:
    train_pass()
except Exception as e:  # noqa: BLE001
    plain_fwd = e
anomaly_fwd, detector_fwd = anomaly(), detect()
hook.remove()
for name, e in (("plain run", plain_fwd), ("detect_anomaly", anomaly_fwd), ("NonFiniteDetector", detector_fwd)):
    print(f"{name:18s} {first_line(e)}")

# %%
assert (detector_fwd.module, detector_fwd.phase) == ("backbone.blocks.2.mlp.fc1", "forward")
assert e38.module == "backbone.blocks.3.norm1" and "backbone.blocks.3" in str(anomaly_fwd)

# %% [markdown]
# Without the detector, DCAL itself stops at the symptom: the rollout finds block 3's attention map non-finite
# (`RolloutError`). Anomaly mode checks only backward outputs, so it never gets to say anything: the forward raised
# first. The detector names fc1.
#
# A backward NaN: the L2 norm of a zero vector has a finite value (0) and a NaN gradient (√ has an infinite
# slope at 0, times the zero slope of x² gives NaN). Add one to `backbone.blocks.1.mlp.fc2`'s output:

# %%
def zero_norm(module, args, out):
    return out + torch.sqrt((out - out).pow(2).sum(-1, keepdim=True))  # = out in forward; NaN in backward


hook = model.backbone.blocks[1].mlp.fc2.register_forward_hook(zero_norm)
model.zero_grad(set_to_none=True)
train_pass()
grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
anomaly_bwd, detector_bwd = anomaly(), detect()
hook.remove()
print(f"plain run: no error raised; every gradient finite: {grads_finite}")
for name, e in (("detect_anomaly", anomaly_bwd), ("NonFiniteDetector", detector_bwd)):
    print(f"{name:18s} {first_line(e)}")

# %%
assert not grads_finite and (detector_bwd.module, detector_bwd.phase) == ("backbone.blocks.1.mlp.fc2", "backward")
assert "SqrtBackward0" in str(anomaly_bwd)

# %% [markdown]
# A plain run raises nothing here: the NaN goes silently into `.grad`. Anomaly mode names the autograd op
# (`SqrtBackward0`) and prints the forward stack trace (suppressed above); the detector names the module whose
# backward produced it, with the gradient it received (finite) and the one it passed on.
#
# ### In a training run: `NonFiniteCallback`
#
# The callback checks the loss terms, the w_i and the gradient norm every step with one sync; when one is
# non-finite, it replays the step's micro-batch under the detector and stops the run naming the module. A small
# callback arms the zero-norm hook at the fourth optimiser step of a fresh short run:

# %%
class ArmAt(Callback):
    """Registers a forward hook on `module` from optimiser step `at` on (a fault that appears mid-run)."""

    def __init__(self, get_module, hook, at):
        self.get_module, self.hook, self.at, self.handle = get_module, hook, at, None

    def before_batch(self, trainer):
        if trainer.step >= self.at and self.handle is None:
            self.handle = self.get_module(trainer.model).register_forward_hook(self.hook)


SHORT = BASE + ["train.optimizer=adamw", "train.max_steps=6", "train.epochs=1"]


def short_run(get_module, hook):
    """A 6-step run whose fault appears at step 4 (and stays, as a real fault would)."""
    nan_cb, arm = diagnostics.NonFiniteCallback("raise"), ArmAt(get_module, hook, 3)
    tr = build_trainer(apply_overrides(preset("demo"), SHORT), None, callbacks=[nan_cb, arm])
    try:
        tr.fit()
    except Exception as e:  # noqa: BLE001
        return tr, nan_cb, arm, e


_, _, arm, err_bwd = short_run(lambda m: m.backbone.blocks[1].mlp.fc2, zero_norm)
arm.handle.remove()
print(first_line(err_bwd))
assert (err_bwd.module, err_bwd.phase, err_bwd.step) == ("backbone.blocks.1.mlp.fc2", "backward", 4)

# %% [markdown]
# A forward overflow inside an SA block surfaces first as a non-finite attention map (`RolloutError` from the
# rollout). The trainer turns that into a non-finite loss and announces it to the callbacks, so the same tier-2
# replay runs and names the module where the value started:

# %%
tr, nan_cb, arm, err_fwd = short_run(lambda m: m.backbone.blocks[2].mlp.fc1, lambda module, args, out: out * 1e39)
arm.handle.remove()
print("callback:", first_line(err_fwd))
print(f"callback findings: {len(nan_cb.findings)}")
located = err_fwd
assert (located.module, located.phase, located.step) == ("backbone.blocks.2.mlp.fc1", "forward", 4)

# %% [markdown]
# ## What actually fixes it
#
# - Decoupled weight decay: `torch.optim.AdamW` with decay only on weight matrices (`dcal.param_groups`, the
#   `adamw` default). The doctor flags `train.optimizer=adam_l2` as `coupled-weight-decay`.
# - For NaN/Inf: a cheap tier-1 check every step and, when it fires, a replay that names the module
#   (`NonFiniteCallback`, `NonFiniteDetector`); never a silent fallback, which hides where the value came from.
#
# ## Verdict
#
# Thresholds: coupled L2 "shrinks small-gradient weights by ≈ lr per step" when their median signed move of |θ| over
# the first 25 steps is between −1.5 and −0.5 lr per step under `adam_l2` and within ±0.25 lr under `adamw`. It
# "erodes the backbone" when the weight matrices' Σθ² ends ≤ 0.75 × its start under `adam_l2` and ≥ 0.9 × under
# `adamw`. An accuracy "collapse" is the doctor's rule (below half its best to the end of the run); without one, the
# collapse claim is nuanced if the erosion is confirmed. NaN checks "find the cause" only if the eroding run produced
# a non-finite value.

# %%
small_grad_ok = -1.5 <= shrink["adam_l2"] <= -0.5 and abs(shrink["adamw"]) <= 0.25
erodes = ratio["adam_l2"] <= 0.75 and ratio["adamw"] >= 0.9
verdict = pd.DataFrame([
    {"claim": "coupled L2 (Adam, weight_decay=0.05) shrinks weights with small gradients by ≈ lr per step",
     "measured": f"median move of small-gradient |θ|: {shrink['adam_l2']:+.3f}·lr/step (adam_l2), "
                 f"{shrink['adamw']:+.3f}·lr/step (adamw)",
     "verdict": "confirmed" if small_grad_ok else "refuted"},
    {"claim": "coupled L2 erodes the pretrained backbone",
     "measured": f"Σθ² end/start {ratio['adam_l2']:.3f} (adam_l2) vs {ratio['adamw']:.3f} (adamw) in 100 steps",
     "verdict": "confirmed" if erodes else "refuted"},
    {"claim": "the accuracy collapse comes from coupled L2 (reproduced on the embedded data)",
     "measured": f"fused accuracy best → final: adam_l2 {best['adam_l2']:.3f} → {final['adam_l2']:.3f}, adamw "
                 f"{best['adamw']:.3f} → {final['adamw']:.3f}; collapse flagged: {collapsed}",
     "verdict": "confirmed" if collapsed["adam_l2"] and not collapsed["adamw"]
     else ("nuanced" if erodes else "refuted")},
    {"claim": "NaN/Inf checks address the accuracy drop (the seed's fix)",
     "measured": f"non-finite values in the eroding run: {'nonfinite' in codes['adam_l2']} (tier-1 check every step)",
     "verdict": "confirmed" if "nonfinite" in codes["adam_l2"] else "refuted"},
    {"claim": "dcal: the two-tier detector names the module where a NaN/Inf starts",
     "measured": f"forward: {detector_fwd.module} (anomaly mode: {type(anomaly_fwd).__name__}); "
                 f"backward: {detector_bwd.module} (anomaly mode: SqrtBackward0); in training: "
                 f"{err_bwd.module.removeprefix('backbone.')}, forward in training {located.module.removeprefix('backbone.')}",
     "verdict": "confirmed" if (detector_fwd.module, detector_bwd.module, err_bwd.module, located.module) == (
         "backbone.blocks.2.mlp.fc1", "backbone.blocks.1.mlp.fc2", "backbone.blocks.1.mlp.fc2",
         "backbone.blocks.2.mlp.fc1") else "refuted"},
])
verdict

# %% [markdown]
# ## Summary
#
# - The seed's optimiser, Adam with coupled L2, moves small-gradient weights toward zero by close to one learning rate
#   per step until they reach it; the pretrained backbone's weight matrices lose most of their squared norm in 100
#   steps under it and keep it under AdamW. The doctor flags `coupled-weight-decay` on that run.
# - The accuracy did not collapse within this budget (see the verdict): the mechanism is measured, the seed's
#   15.38 % → 1.17 % is not reproduced by it in 100 steps.
# - Neither run produced a NaN or Inf: NaN/Inf checks cannot see this failure. For the failures they can see, the
#   two-tier detector names the module where the value started; anomaly mode names a downstream symptom or an op.
