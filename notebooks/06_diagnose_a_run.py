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
# # Diagnose a run
#
# Everything `diagnostics` says about one training run, from its folder alone: the doctor's findings, every
# plot, the rollout figure saved during training, an HTML report, the run explorer widget and the `dcal doctor`
# command. Point it at your own run with papermill:
#
# ```bash
# papermill notebooks/06_diagnose_a_run.ipynb out.ipynb -p run_dir runs/my_run
# ```
#
# Left at `run_dir = None`, it trains two short runs itself, to show what a doctor must show first: that it
# is specific. A healthy fine-tuning run gets **no warning at all**; a run under the seed's conditions as
# notebook 03 scales them to a CPU (Adam with coupled L2, the clip scaled to the parameter count, the seed's
# Σlr) gets its symptom named **from its log alone**. Both are read the way notebook 04 reads the uncertainty
# weights. The doctor on the seed's *own* training log (a hand-rolled trainer's text log, not a run folder)
# is notebook 07, `07_doctor_on_the_seed_log.ipynb`.

# %% tags=["parameters"]
run_dir = None

# %%
# %matplotlib inline
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from IPython.display import Image, display
from matplotlib.figure import Figure

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
random.seed(0)
pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 200)

import dcal_app
import diagnostics
from dcal.config import apply_overrides, preset
from dcal.schedule import warmup_cosine
from dcal.train import build_trainer, model_from_config
from dcal_studies.verdicts import Verdict, flip, judge, report
from diagnostics import doctor

# %% [markdown]
# ## The runs
#
# With no `run_dir`, two runs of the `demo` preset (DCAL fine-tuned from the project's pretrained backbone) on
# the same data as notebook 03 (10 classes of the embedded benchmark, 160 training and 100 test images,
# batch 16, 6 epochs = 60 optimiser steps, an evaluation per epoch), with `dcal_app.default_callbacks()`
# attached (NaN checks, memory per step, rollout statistics and a rollout figure per evaluation):
#
# - **healthy**: AdamW at 6.25e-5, the paper's LR read as a per-GPU batch of 16 on 4 GPUs
#   (`train.lr_rule=linear_per_gpu`, 4× DeiT's linear rule, within the doctor's `lr-rule` tolerance), flat
#   (no warm-up, the cosine's floor at the peak), and the uncertainty weights started at log ln C, their
#   equilibrium for a branch at chance (notebook 04's remedy);
# - **seed_conditions**: notebook 03's scaling of the seed's run: Adam with coupled L2 0.05
#   (`train.optimizer=adam_l2`), the clip 1.0 scaled to keep the seed's per-weight gradient bound
#   (1.0·√(P / 93.65 M)), and the seed's Σlr over its 15 logged epochs spent in 60 steps at a flat LR.
#
# Each run prints its CPU time (what a user waits on a free core) and its wall time here.

# %%
facts = yaml.safe_load(Path("seed_evidence/facts.yaml").read_text())  # the seed's run, with sources
predecessor_run, predecessor_opt = facts["run"], facts["optimizer"]
PREDECESSOR_STEPS_PER_EPOCH = predecessor_run["micro_batches_per_epoch"] / predecessor_run["accumulation"]
SUM_LR = sum(warmup_cosine(k, total_steps=round(predecessor_run["epochs_planned"] * PREDECESSOR_STEPS_PER_EPOCH), warmup_steps=0,
                           peak=predecessor_opt["lr"], floor=0.0)
             for k in range(round(predecessor_run["epochs_logged"] * PREDECESSOR_STEPS_PER_EPOCH)))
C, STEPS = 10, 60
DATA = [f"data.synthetic={{num_classes: {C}, train_per_class: 16, test_per_class: 10, seed: 0}}",
        "train.batch_size=16", f"train.epochs={STEPS // 10}", "train.progress=true", "train.save_best=false"]
P_OURS = sum(p.numel() for p in model_from_config(apply_overrides(preset("demo"), DATA), C).parameters())
CLIP = predecessor_opt["clip_grad_norm"] * math.sqrt(P_OURS / (predecessor_run["parameters_millions"] * 1e6))
HEALTHY = ["train.optimizer=adamw", "train.lr_rule=linear_per_gpu", "train.base_lr=5e-4", "train.min_lr=6.25e-5",
           "train.warmup_epochs=0", f"train.uncertainty_init={math.log(math.log(C))}"]
PREDECESSOR_CONDITIONS = ["train.optimizer=adam_l2", "train.weight_decay=0.05", f"train.clip_grad={CLIP}", "train.lr_rule=fixed",
                   f"train.lr={SUM_LR / STEPS}", f"train.min_lr={SUM_LR / STEPS}", "train.warmup_epochs=0"]
print(f"seed's conditions: Σlr {SUM_LR:.3g} in {STEPS} steps = lr {SUM_LR / STEPS:.3g}; clip 1.0·√({P_OURS / 1e6:.3g} M "
      f"/ {predecessor_run['parameters_millions']} M) = {CLIP:.3g}; healthy: w_i start at log ln {C} = {math.log(math.log(C)):.3f}")


def train(folder: Path, overrides: list[str]) -> Path:
    t0, cpu0 = time.perf_counter(), time.process_time()
    cfg = apply_overrides(preset("demo"), DATA + overrides)
    trainer = build_trainer(cfg, folder, callbacks=dcal_app.default_callbacks())
    trainer.fit()
    print(f"{folder.name}: {trainer.step} steps, {time.process_time() - cpu0:.0f} s of CPU (the wall time on a free "
          f"core; here, on a shared machine: {time.perf_counter() - t0:.0f} s)")
    return folder


if run_dir is None:
    pretrained = Path(preset("demo").model.pretrained)
    assert pretrained.is_file(), f"{pretrained.name} is missing (the project's pretrained backbone)"
    work = Path(tempfile.mkdtemp(prefix="dcal_nb06_"))
    runs = [train(work / "healthy", HEALTHY), train(work / "seed_conditions", PREDECESSOR_CONDITIONS)]
else:
    runs = [Path(run_dir)]
run = runs[0]
print("runs:", [r.name for r in runs])

# %% [markdown]
# ## What is in a run folder
#
# `metrics.jsonl` (one record per optimiser step and per evaluation) is all the doctor needs; `config.yaml`
# adds the checks that need the config.

# %%
log = diagnostics.load_run(run)
print(sorted(p.name for p in run.iterdir()))
print(f"{len(log.steps)} step records, {len(log.evals)} eval records, C = {log.num_classes}, "
      f"config: {log.config is not None}")
assert len(log.steps) > 0

# %%
log.evals.filter(regex="^(step|acc_|loss_sa|part_hit|selection_jaccard)").round(3)

# %% [markdown]
# ## The doctor's findings
#
# `diagnostics.diagnose(run_dir)` runs every check and returns `Finding`s (a code, a severity, a message with the
# numbers, the numbers themselves as `evidence`), errors first. The table shows each finding's headline (the
# message up to its numbers); `dcal doctor RUN`, the HTML report and the JSON below carry the whole message.

# %%
def findings_frame(findings):
    return pd.DataFrame([{"severity": f.severity, "code": f.code, "finding": f.message.split(":")[0]}
                         for f in findings], columns=["severity", "code", "finding"])


findings = diagnostics.diagnose(run)
findings_frame(findings)

# %% [markdown]
# The run's summary (its uncertainty line is left out: it still reads the weights as ½·e^{−w} against ½/ln C,
# the reading notebook 04 withdrew; 04's reading of this run follows under "Every plot"):

# %%
assert all(f.code in doctor.CODES and f.severity in doctor.SEVERITIES for f in findings)
print(doctor.format_summary(doctor.summarize(log) | {"uncertainty": None}).replace(str(run), run.name))

# %% [markdown]
# On the notebook's own healthy run the doctor says nothing. An earlier version of this run got two warnings,
# both true of it: `lr-rule`, because the `demo` preset fine-tunes at 10× DeiT's linear rule (the doctor
# tolerates 4×, the gap between the paper's two readings of its batch), and `uncertainty-lag`, because its w_i
# started at 0 and, moving by about lr per step (notebook 04), stayed more than 0.5 from log L_i. This run
# keeps the LR at the paper's per-GPU reading and starts w at log ln C, within 0.5 of log L_i for losses
# above 1.4 (ln C = 2.3). The lag is only postponed: a run whose losses fall further would leave w behind
# again, and the doctor would say so.

# %% [markdown]
# ## Every plot
#
# The plotting helpers are pure: a `RunLog` in, a figure out. Losses and accuracies against the optimiser step:

# %%
diagnostics.plot_curves(log)

# %% [markdown]
# The uncertainty weights, read as notebook 04 reads them: each w_i against the distance Adam can move it
# (w_i at the start + Σlr so far, its speed limit) and against its equilibrium log L_i (the smoothed branch
# loss), for every run:

# %%
def weighted(st: pd.DataFrame) -> list[str]:
    """The branches whose uncertainty weight and loss the step records carry (none for an SA-only run)."""
    return [b for b in ("sa", "glca", "pwca") if {f"w_{b}", f"loss_{b}"} <= set(st.columns)]


def uncertainty_reading(lg) -> pd.DataFrame:
    """Per branch: how far w moved, in units of Σlr (≈ 1: Adam's speed limit), and its final gap to log L_i."""
    st, sum_lr = lg.steps, float(lg.steps["lr"].sum())
    rows = []
    for b in weighted(st):
        w = st[f"w_{b}"].to_numpy(dtype=float)
        log_loss = math.log(float(st[f"loss_{b}"].iloc[-10:].mean()))
        rows.append({"branch": b, "w start": round(w[0], 3), "w end": round(w[-1], 3), "Σlr": f"{sum_lr:.2g}",
                     "moved / Σlr": round(abs(w[-1] - w[0]) / sum_lr, 2), "log L_i (last 10 steps)": round(log_loss, 2),
                     "|log L_i − w_i|": round(abs(log_loss - w[-1]), 2)})
    return pd.DataFrame(rows).set_index("branch")


fig = Figure(figsize=(5 * len(runs), 3.2), layout="constrained")
for ax, r in zip(np.atleast_1d(fig.subplots(1, len(runs))), runs):
    st = diagnostics.load_run(r).steps
    colors = {"sa": "tab:blue", "glca": "tab:orange", "pwca": "tab:green"}
    for b in weighted(st):
        ax.plot(st["step"], st[f"w_{b}"], color=colors[b], label=f"w_{b}")
        ax.plot(st["step"], np.log(st[f"loss_{b}"].rolling(10, min_periods=1).mean()), "--", color=colors[b], alpha=0.6)
    if weighted(st):
        ax.plot(st["step"], st[f"w_{weighted(st)[0]}"].iloc[0] + st["lr"].cumsum(), ":", color="black",
                label="w start + Σlr")
    ax.set(title=f"{r.name}: w_i (solid), log L_i (dashed)", xlabel="optimiser step")
    ax.legend(fontsize=7)
fig

# %%
readings = {r.name: uncertainty_reading(diagnostics.load_run(r)) for r in runs}
pd.concat(readings, names=["run"])

# %% [markdown]
# The LR as logged at every step (what the scheduler really produced), with the end of warm-up and DeiT's
# linear rule 5e-4·global_batch/512 as the reference line:

# %%
derived = (log.config or {}).get("derived", {})
reference = 5e-4 * derived["global_batch"] / 512 if "global_batch" in derived else None
diagnostics.plot_lr_schedule(log.steps["lr"].to_numpy(), steps=log.steps["step"].to_numpy(),
                             warmup_steps=derived.get("warmup_steps"), reference_lr=reference, log_scale=True)

# %% [markdown]
# ## The rollout figure saved during training
#
# `RolloutCallback` saves, at each evaluation, the attention rollout of a probe batch with the GLCA-selected
# patches, into `<run>/figures/`. The last one:

# %%
figures = sorted((run / "figures").glob("*.png")) if (run / "figures").is_dir() else []
print(f"{len(figures)} rollout figures" + (f"; the last: {figures[-1].name}" if figures else ""))
if figures:
    display(Image(filename=str(figures[-1])))

# %% [markdown]
# ## An HTML report
#
# `doctor.write_html` writes a self-contained report (summary, findings, the plots as embedded PNG, the config)
# into the run folder.

# %%
html = doctor.write_html(run, findings, run / "doctor.html")
text = html.read_text(encoding="utf-8")
print(f"{html.name}: {text.count('<img')} embedded plots, {text.count('<tr class=')} finding(s)")
assert html.is_file() and text.count("<tr class=") == len(findings)

# %% [markdown]
# ## The command line: `dcal doctor RUN --json`
#
# The same findings as JSON; the exit status is 1 when a finding is an error, 0 otherwise (2 when the folder
# cannot be read), so a CI job or a scheduler can act on it.

# %%
proc = subprocess.run([sys.executable, "-m", "dcal_app", "doctor", str(run), "--json"], capture_output=True, text=True)
cli_findings = json.loads(proc.stdout)
print("exit code:", proc.returncode)
print("codes:", [(f["severity"], f["code"]) for f in cli_findings])
assert [f["code"] for f in cli_findings] == [f.code for f in findings]
assert proc.returncode == (1 if any(f.severity == "error" for f in findings) else 0)

# %% [markdown]
# ## The seed's conditions, diagnosed
#
# The same tools on the second run (only when the notebook trained its own runs). Side by side first:

# %%
if len(runs) > 1:
    rows = []
    for r in runs:
        lg = diagnostics.load_run(r)
        ev = lg.evals.iloc[-1]
        rows.append({"run": r.name, "peak lr": f"{lg.steps['lr'].max():.3g}", "final acc_sa": ev["acc_sa"],
                     "final acc_fused": ev["acc_fused"], "final loss_sa": lg.steps["loss_sa"].iloc[-5:].mean(),
                     "findings": ", ".join(f.code for f in diagnostics.diagnose(r))})
    display(pd.DataFrame(rows).round(3))

# %%
if len(runs) > 1:
    broken = runs[1]
    broken_findings = diagnostics.diagnose(broken)
    display(findings_frame(broken_findings))
    broken_codes = {f.code for f in broken_findings}
    assert {"accuracy-collapse", "loss-rising", "coupled-weight-decay"} <= broken_codes

# %% [markdown]
# Some of these come from the configuration (`coupled-weight-decay`, `lr-rule`). The symptom must be found in
# the log itself, as it would be in a log without a config: the same doctor on the run's `metrics.jsonl` alone,
# copied into a folder without `config.yaml`:

# %%
SYMPTOMS = {"accuracy-collapse", "loss-rising"}  # what the seed's own log shows (notebooks 03 and 07)
if len(runs) > 1:
    log_only = work / "seed_conditions_log_only"
    log_only.mkdir()
    shutil.copy(broken / "metrics.jsonl", log_only / "metrics.jsonl")
    log_findings = diagnostics.diagnose(log_only, num_classes=C)
    display(findings_frame(log_findings))
    log_codes = {f.code for f in log_findings}
    assert SYMPTOMS <= log_codes and not {"coupled-weight-decay", "lr-rule"} & log_codes

# %% [markdown]
# ## Verdicts
#
# Thresholds, stated before the measurement: the doctor is *silent* on a run when it reports no warning and
# no error (fewer than 0.5 of them: a count); it *finds the symptom from the log* when both of the seed's
# symptoms (`accuracy-collapse`, `loss-rising`) are among the findings on `metrics.jsonl` alone; w moves at
# *Adam's speed limit* (notebook 04) when every branch moved by Σlr within ±50 % (the doctor's own range for
# `uncertainty-lag`, 0.5–1.5 × lr per step).

# %%
LOUD = ("warning", "error")


def silent(name: str, found) -> Verdict:
    n = sum(f.severity in LOUD for f in found)
    return judge("the doctor reports no warning or error on a healthy run", n, 0.5, holds_if="<",
                 quantity=f"warnings and errors on the {name} run")


if len(runs) > 1:
    speeds = pd.concat(readings)["moved / Σlr"].to_numpy(dtype=float)
    v_silent = silent("healthy", findings).expect("confirmed")
    v_found = judge("the doctor finds the seed's symptoms (collapse, rising loss) from the log alone",
                    len(SYMPTOMS & log_codes), len(SYMPTOMS) - 0.5,
                    quantity="of the 2 symptoms found in metrics.jsonl").expect("confirmed")
    v_speed = judge("in both runs each w moves at Adam's speed limit, ≈ Σlr (notebook 04's reading)",
                    float(np.abs(speeds - 1).max()), 0.5, holds_if="<",
                    quantity="max |moved / Σlr − 1| over runs and branches").expect("confirmed")
    print(report([v_silent, v_found, v_speed]))

# %% [markdown]
# The silence is specific: the same judgement on the other run's findings flips.

# %%
if len(runs) > 1:
    print(flip(v_silent, silent("seed_conditions", broken_findings), "input: the seed_conditions run"))

# %% [markdown]
# ## The run explorer
#
# A widget over several runs: pick a run, the view (curves or uncertainty weights) and the metrics. (Its output
# is not compared by the notebook tests.)

# %% tags=["nbval-ignore-output"]
diagnostics.run_explorer(runs)

# %% [markdown]
# ## Summary
#
# - `diagnostics.diagnose(run_dir)` reads only the run folder and returns findings with their numbers;
#   `doctor.format_text`, `doctor.write_html` and `dcal doctor RUN --json` present the same findings.
# - The doctor is specific: on a healthy run (AdamW at the paper's per-GPU LR reading, w started at log ln C)
#   it reports nothing; under the seed's conditions (notebook 03's scaling: Adam + coupled L2, the clip scaled
#   to the parameter count, the seed's Σlr) it names the accuracy collapse and the rising loss from the
#   `metrics.jsonl` alone, and the configuration's causes (`coupled-weight-decay`, `lr-rule`) when the config
#   is there.
# - In both runs the uncertainty weights move by about Σlr (Adam's speed limit, notebook 04); the healthy
#   run's stay within 0.5 of log L_i only because they started near it.
# - `plot_curves` and `plot_lr_schedule` draw a run from its records; `RolloutCallback` leaves its figures in
#   `<run>/figures/`; `run_explorer` browses several runs. This notebook takes a `run_dir` parameter: run it
#   with papermill on any run folder. A log that is not a run folder goes through `diagnostics.import_log`
#   first; notebook 07 does that on the seed's own log, finding by finding.
#
# ## In your own run
#
# - **What to look for in your log**: accuracy that rises and then falls below half its best while the LR is
#   flat, a training loss that climbs at the same time, and uncertainty weights that grow by about lr per
#   step whatever the losses do.
# - **Which call checks it**: `dcal doctor RUN` (a run folder) or `dcal doctor train_log.txt --num-classes C`
#   (any training log), `diagnostics.diagnose(path)` in Python; `accuracy-collapse` and `loss-rising` name the
#   symptom, `coupled-weight-decay` and `lr-rule` the configuration when it is known, `uncertainty-lag` the
#   weights. Run it on a run you trust first: a finding there is about your setup or the doctor, not your bug.
# - **What to change**: for the collapse, AdamW (decoupled decay) instead of Adam with L2 (notebook 03); for
#   the LR, the rule and batch reading you mean (notebook 01); for the weights, their own LR group, a start at
#   log ln C, or fixed weights (notebook 04).
