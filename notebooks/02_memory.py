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
# # Fix 2: the out-of-memory error at epoch 16
#
# The seed system ran out of GPU memory at the first step of epoch 16, blamed "memory accumulation", and
# answered with a smaller micro-batch (2 × accumulation 8 instead of 4 × 4), `torch.cuda.empty_cache()` every
# 100 batches and "improved gradient checkpointing usage". This notebook reads the OOM message in the seed's
# log, rebuilds the seed's training step *as its code runs it* (`dcal_studies.predecessor`, written from a
# reading of the seed's `dual_vit.py`, `attention_modules.py`, `fgvc_config.py` and `train.py`), predicts its
# ordinary step, its evaluation and the first training step after an evaluation with the same public call a user
# runs on their own model (`diagnostics.predict_step_memory`), and lets those numbers say what the OOM was. Then
# it bounds the "accumulation", and measures each part of the seed's fix.

# %%
# %matplotlib inline
import itertools
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
random.seed(0)
pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 140)

import dcal
import diagnostics
from dcal.config import SMALL_VIT, apply_overrides, preset
from dcal.train import build_datasets, normalisation
from dcal_studies.predecessor import (
    VIT_B16,
    KeepsEvalMaps,
    PredecessorDCAL,
    PredecessorLoss,
    predecessor_case,
    predecessor_optimizer,
)
from dcal_studies.verdicts import (
    CONFIRMED,
    NOT_TESTABLE,
    NUANCED,
    REFUTED,
    Verdict,
    combine,
    flip,
    judge,
    not_testable,
    report,
)

GiB, MiB, KiB = 2**30, 2**20, 2**10
PREDECESSOR = Path("seed_evidence")  # the seed's log, its per-epoch numbers and facts (sources in its README)
facts = yaml.safe_load((PREDECESSOR / "facts.yaml").read_text())
log_text = (PREDECESSOR / "train_log.txt").read_text()
run, oom = facts["run"], facts["oom"]
print("source:", facts["source"])

# %% [markdown]
# ## The seed's own numbers
#
# From the seed's `FIXES_SUMMARY.md`:
#
# > **Problem**: Out of memory error at epoch 16
# > **Root Cause**: Memory accumulation during training
# > **Fixes**: Reduced physical batch size from 4 to 2; Added memory clearing every 100 batches; Added CUDA cache
# > clearing after model initialization; Improved gradient checkpointing usage
#
# The run (ViT-B/16 at 448 px, FP16 autocast, batch 4 × accumulation 4, evaluation every 5 epochs) and the last
# line of its log:

# %% tags=["exact-numbers"]
print(log_text.strip().splitlines()[-1][:400], "…")
print(f"\n{run['backbone']}, {run['img_size']} px, batch {run['batch_physical']} × {run['accumulation']}, "
      f"{run['precision']}; evaluation every {run['eval_every_epochs']} epochs")
print(f"OOM: epoch {oom['epoch']}, micro-batch {oom['step']}, the first step after evaluation {oom['after_evaluation']} "
      f"(epochs 6 and 11, after evaluations 1 and 2, started fine)")
eval_bars = sorted(set(int(m) for m in re.findall(r"Evaluating val: 100%\|[^|]*\| (\d+)/\1", log_text)))
print(f"evaluation progress bars in the log: {eval_bars} batches for {run['test_images']} test images")
pd.Series({k: oom[k] for k in ("tried_to_allocate_mib", "total_capacity_gib", "free_mib", "process_in_use_gib",
                               "allocated_gib", "reserved_unallocated_gib")})

# %% [markdown]
# What the message says, by arithmetic. The process held 15.67 GiB: 14.12 GiB in live tensors, 1.25 GiB in
# cached blocks the allocator could not use for the request (reserved but unallocated), and 0.30 GiB outside
# PyTorch's allocator (the CUDA context). So tensors could use at most allocated + reserved-unallocated + free
# = **15.59 GiB** of this GPU (the usable line below), and at the moment of failure they could use 14.34 GiB:
# the failing step needed **at least 14.12 GiB + 226 MiB = 14.34 GiB** allocated at once. The request missed the
# free memory by less than 1 MiB.

# %%
outside = oom["process_in_use_gib"] - oom["allocated_gib"] - oom["reserved_unallocated_gib"]
needed = oom["allocated_gib"] + oom["tried_to_allocate_mib"] / 1024  # GiB: what the failing step had asked for
usable = oom["allocated_gib"] + oom["reserved_unallocated_gib"] + oom["free_mib"] / 1024  # GiB: capacity − context
fragmented = oom["reserved_unallocated_gib"]
print(f"outside the allocator: {outside:.2f} GiB; usable by tensors: {usable:.2f} GiB; the failing step needed "
      f"≥ {needed:.2f} GiB; request − free: {oom['tried_to_allocate_mib'] - oom['free_mib']:.2f} MiB")
assert abs(outside - 0.30) < 0.005 and abs(usable - fragmented - needed) < 0.01

# %% [markdown]
# ## The OOM arithmetic
#
# ### 226 MiB: one PWCA score map
#
# `diagnostics.attention_memory` counts the score maps that eager attention keeps, per DCAL component. For the
# seed's ViT-B/16 at 448 px (N = 28² + 1 = 785 tokens, 12 heads, 12 blocks), batch 4, fp32 (CUDA autocast runs
# softmax in fp32): a PWCA map is B·H·N·2N (image 1's queries over both images' keys). The CUDA caching
# allocator rounds a request above 10 MiB up to a multiple of 2 MiB. The failing request was in backward
# (`scaler.scale(total_loss).backward()`), where the gradient of a PWCA softmax has the map's shape.

# %%
att = diagnostics.attention_memory("vit_base_patch16_224", run["img_size"], run["batch_physical"], dtype_bytes=4)
d = att.attrs
pwca_map = d["B"] * d["H"] * d["N"] * 2 * d["N"] * 4  # bytes of one block's PWCA score map
assert np.isclose(att.loc["pwca", "mb"] * 1e6, d["L"] * pwca_map)
rounded = -(-pwca_map // (2 * MiB)) * 2 * MiB  # the allocator's rounding for large requests
print(f"N = {d['N']}, H = {d['H']}, L = {d['L']}: one PWCA map {pwca_map / MiB:.1f} MiB, requested as "
      f"{rounded / MiB:.0f} MiB; the log: {oom['tried_to_allocate_mib']:.0f} MiB")
assert rounded / MiB == oom["tried_to_allocate_mib"]

# %% [markdown]
# ## The seed's step as its code runs it
#
# `PredecessorDCAL` (in `dcal_studies/predecessor.py`) is written from a reading of the seed's code; what decides
# its memory, with where it was read:
#
# - **Its own ViT-B with eager attention and dropout everywhere** (`models/attention_modules.py`,
#   `configs/fgvc_config.py`: `dropout: float = 0.1`): every softmax map is materialised, then dropped out
#   (`attn_dropout`), then the projection (`proj_dropout`) and the MLP twice (after GELU, after the second
#   linear). On a GPU `nn.Dropout` keeps a 1-byte bool mask per element for backward; at ViT-B/448, batch 4, the
#   masks on the attention maps alone are 1.3 GiB.
# - **The training forward** (`models/dual_vit.py`, `DualCrossAttentionViT.forward`, the path commented "Standard
#   forward without checkpointing", which SEED_EVIDENCE.md finds is the one that ran): per block, SA on image 1
#   (its map appended to the rollout history), SA on image 2 (the paired image evolves through every block to give
#   PWCA its keys and values), then PWCA with image 1's queries over both images' keys: a (B, H, N, 2N) map. Then
#   one GLCA block with its own projections (queries: CLS and the top 10 % patches by rollout, over all N keys)
#   and its MLP on all tokens.
# - **What the model keeps**: at the end of every forward, `self.attention_maps` is set: to the 12 SA maps in
#   evaluation, to `{}` in training (`dual_vit.py`, the end of `forward`; ≈ lines 435–441 per the review). The
#   evaluation's maps therefore live through the next training **forward** and are freed at its end, **before the
#   backward** in which the OOM was raised.
# - **The trainer** (`train.py`): FP16 autocast around forward and loss, `GradScaler`, `torch.optim.Adam` over the
#   model's and the loss's parameters; evaluation under `torch.no_grad()` in batches of 4 — the log's "1449/1449"
#   is ⌈5,794 / 4⌉, so the last evaluation batch holds 2 images, and those are the maps left on the module.
#
# The stored snapshot of the repository that this reading used does not hold commit `9b6147a` itself (the
# nearest stored versions of these files were read). One number ties the reading to the code that ran: the
# log's line 5, "Model initialized with 93.65M parameters".

# %%
with torch.device("meta"):
    predecessor_model = PredecessorDCAL(run["img_size"], run["num_classes"], **VIT_B16)
n_params = sum(p.numel() for p in predecessor_model.parameters())
print(f"PredecessorDCAL at ViT-B/16, {run['img_size']} px, {run['num_classes']} classes: {n_params / 1e6:.2f}M "
      f"parameters; the log: {run['parameters_millions']}M")
assert round(n_params / 1e6, 2) == run["parameters_millions"]

# %% [markdown]
# ### Thresholds, before the prediction
#
# Every number below is the PyTorch-allocated peak (what `torch.cuda.max_memory_allocated` counts), predicted by
# `predict_step_memory` for a CUDA target (its 512-byte blocks, CUDA autocast's fp32 softmax and LayerNorm,
# Adam's multi-tensor path). The claims and what decides each:
#
# - **the ordinary step needs what the OOM shows**: its predicted peak ≥ 14.34 GiB (allocated + the failed
#   request); and it **fits the GPU unfragmented**: below the usable 15.59 GiB (15 epochs of such steps ran);
# - **the evaluation's maps were alive in the failing backward** (this notebook's earlier reading): the first
#   step after an evaluation has a larger *backward* peak than an ordinary step, by more than the allocator's
#   2 MiB rounding;
# - **the first step after an evaluation is the run's largest**: its peak (any phase) exceeds the ordinary
#   step's by more than 2 MiB;
# - **the OOM's fragmentation is enough to fail the step**: ordinary peak + 1.25 GiB > 15.59 GiB.

# %%
ROUNDING_MIB = 2  # the allocator's rounding of a large block: the smallest difference we call one
thresholds = pd.Series({"the OOM's need (allocated + request), GiB": needed, "usable (capacity − context), GiB": usable,
                        "reserved but unallocated, GiB": fragmented, "smallest difference, MiB": ROUNDING_MIB})
thresholds.round(2)

# %% [markdown]
# ### The prediction
#
# Two calls of `diagnostics.predict_step_memory` on meta-built models: `predecessor_case` runs the seed's model
# through two training steps, an evaluation of the last batch (2 images) and the first training step after it;
# the second call runs the same training steps and an evaluation batch of 4 (the evaluation's peak) on a model
# that differs only in keeping its evaluation maps through training (this notebook's earlier reading of the
# seed: the control of the verdicts below). Their ordinary training steps must agree (to one 512-byte block).
# The prediction's evaluation runs under the same FP16 autocast as training; the seed's trainer (as stored)
# evaluates without autocast. The maps left on the module are fp32 either way (CUDA autocast's softmax is
# fp32), so the steps that matter here do not change; the evaluation's own peak would be higher in fp32 than the
# 2.74 GiB shown, and stays far below any training step.

# %%
# `KeepsEvalMaps` (dcal_studies.predecessor): the earlier reading of the seed, the evaluation's maps kept on
# the module through training — the control that could flip the verdict.
case = predecessor_case(batch_size=run["batch_physical"], img_size=run["img_size"], num_classes=run["num_classes"],
                        amp_dtype=torch.float16, eval_batch_size=2)
predecessor = case["predecessor"]
assert case["parameters"] == n_params
with torch.device("meta"):
    keeps = KeepsEvalMaps(run["img_size"], run["num_classes"], **VIT_B16)
x4 = (run["batch_physical"], 3, run["img_size"], run["img_size"])
p_keeps = diagnostics.predict_step_memory(keeps, (x4, x4), loss_fn=PredecessorLoss(), optimizer=predecessor_optimizer,
                                          amp_dtype=torch.float16, eval_inputs=(x4,), target="cuda")
BLOCK = 512  # bytes: the allocator's smallest block (a process's first prediction counts one more)
assert all(abs(p_keeps.train[k].peak_bytes - predecessor.train[k].peak_bytes) <= BLOCK for k in predecessor.train)


def phase_peaks(phases: dict) -> dict:
    return {name: p.peak_bytes / GiB for name, p in phases.items()}


steps = pd.DataFrame({"ordinary training step": phase_peaks(predecessor.train),
                      "first training step after an evaluation": phase_peaks(predecessor.train_after_eval)}).T
steps["evaluation step"] = np.nan
steps.loc["evaluation, batch 4", "evaluation step"] = p_keeps.eval_peak_bytes / GiB
steps.loc["evaluation, last batch (2)", "evaluation step"] = predecessor.eval_peak_bytes / GiB
steps.round(2)

# %%
comp = pd.Series(predecessor.train["backward"].composition) / GiB
print("the ordinary step's peak (backward), by what is alive (GiB):")
print(comp[comp > 0].round(2).to_string())

# %%
P = predecessor.peak_bytes / GiB  # the ordinary step's peak (its backward)
bwd_added = round((predecessor.train_after_eval["backward"].peak_bytes - predecessor.train["backward"].peak_bytes) / MiB, 2) + 0.0
P_after = predecessor.train_after_eval_peak_bytes / GiB
kept_maps = d["L"] * 2 * d["H"] * d["N"] ** 2 * 4 / GiB  # the last evaluation batch's 12 fp32 SA maps (B = 2)
print(f"ordinary step: {P:.2f} GiB at its {predecessor.peak_phase}; the OOM's need {needed:.2f}; usable {usable:.2f}")
print(f"first step after an evaluation: forward {predecessor.train_after_eval['forward'].peak_bytes / GiB:.2f} GiB "
      f"(+{P_after - P:.2f} over the ordinary step; the kept maps L·2·H·N²·4 B = {kept_maps:.2f} GiB), "
      f"backward + {bwd_added:.0f} MiB over the ordinary backward")
print(f"headroom of the ordinary step on the unfragmented GPU: {usable - P:.2f} GiB; the OOM's fragmentation: "
      f"{fragmented:.2f} GiB")

# %% [markdown]
# What the numbers say:
#
# - **The seed's ordinary training step needed 14.38 GiB**, every step of the run: more than the 14.34 GiB the
#   failing step had asked for when it failed, and 1.21 GiB under the 15.59 GiB the GPU had for tensors. The
#   fp32 softmax outputs are 5.3 GiB of it, and the other saved activations — the maps' fp16 copies, the
#   dropout masks, the MLP and projection outputs of three passes per block — 7.5 GiB.
# - **The evaluation's maps were not alive in the failing backward**: the seed clears them at the end of the
#   training forward, and the backward of the first step after an evaluation is the ordinary backward, to the
#   byte. What the evaluation does change is the forward before it: it runs with the last evaluation batch's 12
#   maps (0.66 GiB) alive, and peaks 0.55 GiB higher than any ordinary step, at 14.93 GiB: the largest step of
#   the run, and the only one that makes the allocator hold more than an ordinary step does.
# - **So the OOM was an ordinary backward that found the memory fragmented.** With 1.25 GiB of the cache
#   unusable for a 226 MiB block, the backward's 14.38 GiB no longer fits in 15.59 GiB (14.38 + 1.25 = 15.63).
#   How the cache came to be that fragmented is the allocator's history (block sizes and splits), which a
#   prediction of tensor sizes cannot give. The log is consistent with the one step that differs: an
#   evaluation at batch 4 and 2 (other block sizes than training), then a forward with 12 blocks of 56 MiB alive
#   that are freed between the forward and the backward — and it did not fail after evaluations 1 and 2, so the
#   layout, not a size, decided which evaluation failed.
#
# ### On a plot

# %%
fig = Figure(figsize=(9, 3.6), layout="constrained")
ax = fig.subplots()
bars = {"ordinary step": [predecessor.train[k].peak_bytes / GiB for k in ("forward", "backward")],
        "first step after\nan evaluation": [predecessor.train_after_eval[k].peak_bytes / GiB for k in ("forward", "backward")]}
xs = np.arange(len(bars))
for j, phase in enumerate(("forward", "backward")):
    b = ax.bar(xs + (j - 0.5) * 0.35, [v[j] for v in bars.values()], width=0.35, label=f"{phase} peak (predicted)")
    ax.bar_label(b, fmt="%.2f", fontsize=8)
ax.axhline(oom["total_capacity_gib"], color="grey", ls=":", lw=1, label="GPU capacity (15.89 GiB)")
ax.axhline(usable, color="black", lw=1.2, label=f"usable: capacity − CUDA context ({usable:.2f} GiB)")
ax.axhline(needed, color="crimson", ls="--", lw=1,
           label=f"the OOM: allocated + request ({needed:.2f} GiB)\n= usable − 1.25 GiB reserved but unallocated")
ax.set_xticks(xs, list(bars), fontsize=8)
ax.set_xlim(-0.6, 1.6)
ax.set_ylim(13, 16.2)
ax.set(ylabel="GiB allocated by PyTorch (axis from 13)",
       title="The seed's training step (ViT-B/16, 448 px, batch 4, FP16), predicted from its code")
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
fig

# %% [markdown]
# ### Why the old model said otherwise
#
# This notebook's previous model of the seed kept the evaluation's maps on the module through the whole next
# step, left dropout out, and predicted 13.7 GiB for the step after evaluation. Dropout alone is large: a bool
# mask per element of each map the step keeps (image 1's and image 2's SA maps, the PWCA map) and per element of
# the MLP's hidden activations and the block outputs:

# %%
B, H, N, C, L = d["B"], d["H"], d["N"], 768, d["L"]
masks_attention = L * B * H * N * (N + N + 2 * N)  # bytes: 1 per element of the SA, SA (image 2) and PWCA maps
masks_other = L * 3 * B * N * (3072 + 2 * C)  # per pass: after GELU, after the MLP, after the projection
print(f"dropout masks kept for backward: attention {masks_attention / GiB:.2f} GiB, MLP and projections "
      f"{masks_other / GiB:.2f} GiB; the ordinary step without them ≈ {P - (masks_attention + masks_other) / GiB:.1f} GiB, "
      f"under the OOM's {needed:.2f}")

# %% [markdown]
# ## "Memory accumulation": what the log allows
#
# The seed's diagnosis, "memory accumulation", is a leak: memory that grows from step to step because the loop
# keeps something alive. The classic one, a loss kept with its graph (`losses.append(loss)` before its
# backward, or a monitoring loss computed with autograd on), keeps every activation the step saved: at the
# seed's setting 12.8 GiB per micro-batch (the saved activations and maps above), full in one step. The log
# has no memory numbers per step, so it cannot show a leak; what it bounds is its size. Steps that ran put a
# ceiling on growth: the first step of epoch 11 (after 10 × 1,498 micro-batches and 2 evaluations) reached the
# after-evaluation forward peak plus any growth, the last step of epoch 15 (after 22,469 micro-batches and 2
# evaluations) the ordinary peak plus any growth, and both fitted in the usable 15.59 GiB. Growth per
# micro-batch g and per evaluation e, each alone (upper bounds: they assume no fragmentation in the steps that
# ran):

# %%
per_epoch = run["micro_batches_per_epoch"]
ceilings = {"first step of epoch 11": (P_after, 10 * per_epoch, 2),
            "last step of epoch 15": (P, run["epochs_logged"] * per_epoch - 1, 2)}
g_max = min((usable - peak) / n_mb for peak, n_mb, _ in ceilings.values()) * GiB  # bytes per micro-batch
e_max = min((usable - peak) / n_ev for peak, _, n_ev in ceilings.values())  # GiB per evaluation
graph_kept = (comp["attention_maps"] + comp["activations"]) * GiB  # bytes a kept graph would hold per micro-batch
print(f"growth per micro-batch ≤ {g_max / KiB:.0f} KiB; per evaluation ≤ {e_max:.2f} GiB; a kept graph: "
      f"{graph_kept / GiB:.1f} GiB per micro-batch")
assert g_max < 1e-4 * graph_kept

# %% [markdown]
# A leaked graph would have failed the second step. Any growth the log allows is under 46 KiB per micro-batch,
# or a third of a GiB per evaluation — and the failure needs none: the ordinary step already needs more than the
# failing step had asked for.
#
# ## The seed's fix, measured
#
# ### Batch 2 × accumulation 8
#
# The same public call on the same model at micro-batch 2 with accumulation 8 (micro-batches after the first run
# their forward with the accumulated gradients alive). Evaluating in batches of 2 (5,794 is even: every batch
# holds 2), the first training step after an evaluation adds the last batch's maps (0.66 GiB) to its forward,
# exactly, as the prediction at batch 4 showed (and `tests/test_predecessor.py` checks). Added to the forward
# peak with the accumulated gradients alive, which the first micro-batch of an epoch does not have, that is an
# upper bound of the step after an evaluation:

# %%
x2 = (2, 3, run["img_size"], run["img_size"])
predecessor_b2 = diagnostics.predict_step_memory(predecessor_model, (x2, x2), loss_fn=PredecessorLoss(),
                                          optimizer=predecessor_optimizer, amp_dtype=torch.float16,
                                          grad_accum_steps=8, target="cuda")
after_b2 = predecessor_b2.train["forward"].peak_bytes / GiB + kept_maps  # upper bound: the forward with the maps alive
worst_b2 = max(predecessor_b2.peak_bytes / GiB, after_b2)
print(f"batch 2 × 8: ordinary step {predecessor_b2.peak_bytes / GiB:.2f} GiB, first step after an evaluation "
      f"≤ {after_b2:.2f} GiB; worst + the OOM's fragmentation {worst_b2 + fragmented:.2f} GiB vs usable {usable:.2f} GiB")

# %% [markdown]
# Halving the micro-batch takes the seed's worst step from 14.93 GiB to at most 8.75 GiB (the weights and Adam's two
# moments, 1.05 GiB, do not shrink with the batch): it fits with several GiB to spare even with the OOM's
# fragmentation. The smaller batch fixed the OOM — not because anything accumulated, but because every step got
# smaller.
#
# ### Does 2 × 8 train on the same gradient as 4 × 4?
#
# Accumulating `loss / accum` over micro-batches gives the gradient of the mean loss over all images when the loss
# of an image depends on that image alone. PWCA breaks that: each image is paired with another image *of its
# micro-batch*. With a micro-batch of 2 the pairing is forced (the two images swap); in a batch of 4 it is one of
# the 9 derangements of 4. Four test images of the embedded benchmark, the demo-sized model (no drop path, no
# augmentation), the gradient of batch 4 against 2 × 2:

# %%
cfg = apply_overrides(preset("demo"), ["data.synthetic={num_classes: 10, train_per_class: 40, test_per_class: 20, seed: 0}"])
_, test_ds, num_classes = build_datasets(cfg, *normalisation(cfg.model.backbone))
idx = [int(np.flatnonzero(test_ds.labels == c)[0]) for c in range(4)]  # the first test image of classes 0-3
xs4 = torch.stack([test_ds[i]["image"] for i in idx])
ys4 = torch.tensor([test_ds[i]["label"] for i in idx])


def flat_grad(model, parts, pair_index=None):
    """Accumulate ½·Σ branch CE (the uncertainty loss at w = 0) over micro-batches `parts`; the flat gradient."""
    model.zero_grad(set_to_none=True)
    for part in parts:
        out = model(xs4[part], pair_index=pair_index)
        logits = [z for z in (out.sa_logits, out.glca_logits, out.pwca_logits) if z is not None]
        (0.5 * sum(F.cross_entropy(z, ys4[part]) for z in logits) / len(parts)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


SAME = 1e-5  # float32 sums in another order: relative differences ~1e-7, far below this
BIG, MICRO = [[0, 1, 2, 3]], [[0, 1], [2, 3]]
models = {}
for pwca in (False, True):
    torch.manual_seed(0)
    models[pwca] = dcal.build_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=64,
                                    drop_path_rate=0.0, pwca=pwca, **SMALL_VIT).train()
torch.manual_seed(1)
diff_off = rel(flat_grad(models[False], MICRO), flat_grad(models[False], BIG))
diff_on = rel(flat_grad(models[True], MICRO), flat_grad(models[True], BIG))
print(f"‖g(2 × 2) − g(4)‖ / ‖g(4)‖: PWCA off < {SAME:g}: {diff_off < SAME}; PWCA on (random pairs): {diff_on:.2f}")
assert diff_off < SAME and diff_on > 1e-3

# %% [markdown]
# With PWCA off, accumulation reproduces the large batch's gradient to float precision. With PWCA on it does not.
# Is it right *on average*? Every pairing: the PWCA loss of batch 4 under each of the 9 derangements
# (`pair_index` overrides the random draw), and the accumulated 2 × 2 gradient under each of the 3 ways to split
# the 4 images into two micro-batches (each split forces one pairing: one of the 3 double swaps among the 9).

# %%
model = models[True]
ders = [p for p in itertools.permutations(range(4)) if all(p[i] != i for i in range(4))]
rows, grads_big = [], []
for der in ders:
    model.zero_grad(set_to_none=True)
    out = model(xs4, pair_index=torch.tensor(der))
    pwca_loss = F.cross_entropy(out.pwca_logits, ys4)
    (0.5 * (F.cross_entropy(out.sa_logits, ys4) + F.cross_entropy(out.glca_logits, ys4) + pwca_loss)).backward()
    grads_big.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    rows.append({"pairing": str(der), "reachable by a 2 + 2 split": all(der[der[i]] == i for i in range(4)),
                 "PWCA loss, batch 4": pwca_loss.item()})
pairings = pd.DataFrame(rows)
splits = [[[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 3], [1, 2]]]
grads_split = [flat_grad(model, parts, torch.tensor([1, 0])) for parts in splits]  # micro-batch of 2: a swap
pairings.round(3)

# %%
g_big, g_split = torch.stack(grads_big).mean(0), torch.stack(grads_split).mean(0)
per_step = np.array([rel(g, g_big) for g in grads_big])
exp_diff = rel(g_split, g_big)
loss_all = pairings["PWCA loss, batch 4"]
loss_inv = pairings.loc[pairings["reachable by a 2 + 2 split"], "PWCA loss, batch 4"]
print(f"one pairing vs the mean over pairings: ‖g − E g‖ / ‖E g‖ from {per_step.min():.2f} to {per_step.max():.2f}")
print(f"mean over the 3 splits vs mean over the 9 pairings of batch 4: gradient < {SAME:g}: {exp_diff < SAME}; "
      f"PWCA loss {loss_inv.mean():.3f} vs {loss_all.mean():.3f}")
assert np.isclose(loss_all.mean(), loss_inv.mean(), atol=1e-5) and exp_diff < SAME
assert pairings["reachable by a 2 + 2 split"].sum() == 3 and loss_all.max() - loss_all.min() > 1e-3

# %% [markdown]
# Each image is paired with each of the 3 others with probability 1/3 under a random derangement of 4, and also
# under a random split into two micro-batches of 2. So the mean over splits equals the mean over pairings
# exactly, while any single step's gradient differs from it. Accumulation is right *in expectation over the data
# order*, which the shuffling sampler provides; per step it draws pairings from a smaller set (a micro-batch of 2
# always swaps).
#
# ### `torch.cuda.empty_cache()` every 100 batches
#
# `empty_cache()` returns the caching allocator's *unoccupied* cached segments to the driver: it lowers
# `memory_reserved`, never `memory_allocated`. PyTorch's documentation (`torch.cuda.memory.empty_cache`):
# "empty_cache() doesn't increase the amount of GPU memory available for PyTorch. However, it may help reduce
# fragmentation of GPU memory in certain cases." Before it raises an OOM the allocator already frees its
# unoccupied cached segments and retries, so what the message still calls "reserved but unallocated" sits in
# segments partly in use, which `empty_cache()` cannot return either. Whether calling it every 100 batches
# would have changed the cache's layout at epoch 16 needs the seed's GPU; it is not measured here.

# %% [markdown]
# ## Verdicts
#
# The thresholds were stated before the prediction (above); for the fix: batch 2 × 8 "avoids the OOM" when its
# worst step plus the OOM's 1.25 GiB of fragmentation stays under the usable 15.59 GiB; the same gradient means
# ‖Δg‖/‖g‖ < 1e-5. The prediction leaves out terms that only add to a step (cuBLAS workspaces, the GradScaler's
# scale, `clip_grad_norm_`'s norms: MiB each), so its peaks are lower bounds of what the seed's allocator counted.
# Two verdicts sit near their thresholds and say so: the ordinary step exceeds the OOM's 14.34 GiB, and with the
# 1.25 GiB of fragmentation exceeds the usable 15.59 GiB, by 0.04 GiB each (0.3 %) — as small as a change in how
# the predictor tracks memory (24 MiB between two of its versions) or a detail of the seed's code read
# differently. What they establish is that the seed's step ran at the edge of its GPU, not by how much.

# %%
v_map = judge("226 MiB is one fp32 PWCA score map of ViT-B/16 at 448 px, batch 4",
              abs(rounded / MiB - oom["tried_to_allocate_mib"]), 1.0, holds_if="<",
              quantity="|B·H·N·2N·4 B rounded to 2 MiB − the log's request| in MiB").expect(CONFIRMED)
v_edge = combine("the seed's ordinary training step was at the edge of its GPU", [
    judge("it needs the OOM's allocated + request", P, needed, quantity="predicted peak GiB"),
    judge("it fits the unfragmented GPU", P, usable, holds_if="<", quantity="predicted peak GiB"),
]).expect(CONFIRMED)
v_kept = judge("the evaluation's maps were still alive in the failing backward", bwd_added, ROUNDING_MIB,
               quantity="MiB the first backward after an evaluation adds").expect(REFUTED)
v_largest = judge("the first training step after an evaluation is the run's largest", round((P_after - P) * 1024),
                  ROUNDING_MIB, quantity="MiB its forward adds over the ordinary step").expect(CONFIRMED)
v_frag = judge("the OOM's 1.25 GiB reserved-but-unallocated is enough to fail the ordinary step",
               P + fragmented - usable, 0.0, quantity="GiB of peak + fragmentation over the usable memory").expect(CONFIRMED)
v_leak = not_testable("the OOM came from memory accumulating during training (the seed's root cause)",
                      f"the log has no per-step memory; growth ≤ {g_max / KiB:.0f} KiB per micro-batch or "
                      f"≤ {e_max:.2f} GiB per evaluation, and none is needed: the ordinary step needs "
                      f"{P:.2f} GiB ≥ the OOM's {needed:.2f}")
v_batch = judge("batch 2 × 8 instead of 4 × 4 avoids the OOM", worst_b2 + fragmented, usable, holds_if="<",
                quantity="worst step at 2 × 8 (upper bound) + 1.25 GiB fragmented, GiB").expect(CONFIRMED)
v_grad = combine("batch 2 × 8 trains on the same gradient as the large batch", [
    Verdict("without PWCA", CONFIRMED if diff_off < SAME else REFUTED, f"‖Δg‖/‖g‖ < {SAME:g}: {diff_off < SAME}"),
    Verdict("with PWCA, per step", CONFIRMED if diff_on < SAME else REFUTED, f"‖Δg‖/‖g‖ = {diff_on:.2f}"),
    Verdict("with PWCA, over the data order", CONFIRMED if exp_diff < SAME else REFUTED,
            f"means over pairings: ‖Δg‖/‖g‖ < {SAME:g}: {exp_diff < SAME}"),
]).expect(NUANCED)
v_cache = not_testable("torch.cuda.empty_cache() every 100 batches prevents the OOM",
                       f"it frees no allocated byte and the layout it could change needs the seed's GPU "
                       f"(CUDA here: {torch.cuda.is_available()})").expect(NOT_TESTABLE)
verdicts = [v_map, v_edge, v_kept, v_largest, v_frag, v_leak, v_batch, v_grad, v_cache]
print(report(verdicts))

# %% [markdown]
# **A control that flips a verdict.** "The evaluation's maps were still alive in the failing backward" is
# refuted by the seed's code, which clears them at the end of the training forward. The same check on the model
# that keeps them through the training step (`KeepsEvalMaps`, predicted above) comes out the other way:

# %%
v_kept_perturbed = judge(v_kept.claim, round((p_keeps.train_after_eval["backward"].peak_bytes
                                              - p_keeps.train["backward"].peak_bytes) / MiB),
                         ROUNDING_MIB, quantity="MiB the first backward after an evaluation adds")
print(flip(v_kept, v_kept_perturbed, "a model that keeps its evaluation maps in training"))

# %% [markdown]
# ## Against the seed's numbers
#
# | the seed's log | this notebook (the seed's code, predicted) |
# |---|---|
# | "Tried to allocate 226.00 MiB" | one fp32 PWCA map of ViT-B/16, 448 px, batch 4 = 225.7 MiB, rounded to 2 MiB |
# | "Model initialized with 93.65M parameters" | `PredecessorDCAL`: 93.65M |
# | 14.12 GiB allocated + 226 MiB asked = 14.34 GiB | the ordinary step: 14.38 GiB at its backward, every step |
# | 1.25 GiB reserved but unallocated, 0.30 GiB context | usable 15.59 GiB; 14.38 + 1.25 = 15.63 does not fit |
# | OOM at the first step after evaluation 3, in backward | that step's forward is the run's largest (14.93 GiB, the last evaluation batch's maps alive); its backward is the ordinary one |
# | "memory accumulation" | not needed; ≤ 46 KiB per micro-batch or ≤ 0.33 GiB per evaluation |
# | fix: batch 2 × 8 | worst step ≤ 8.75 GiB: fits with the fragmentation; the same gradient only in expectation with PWCA |
# | fix: `empty_cache()` | frees no allocated byte; not measurable without the GPU |

# %%
print(f"request: log {oom['tried_to_allocate_mib']:.0f} MiB, arithmetic {rounded / MiB:.0f} MiB")
print(f"the seed's step: ordinary {P:.2f} GiB, first step after an evaluation {P_after:.2f} GiB (forward), "
      f"evaluation {p_keeps.eval_peak_bytes / GiB:.2f} GiB; the log: ≥ {needed:.2f} GiB needed, {usable:.2f} GiB usable")
print(f"batch 2 × 8: worst step ≤ {worst_b2:.2f} GiB")

# %% [markdown]
# ## In your own run
#
# - **Read the OOM message before blaming a leak.** "X GiB is allocated by PyTorch" + "Tried to allocate Y" is
#   what the failing step needed at least; "Z GiB is reserved by PyTorch but unallocated" is fragmentation:
#   memory the cache holds in blocks that cannot serve the request. If Z is large next to Y, the step was at the
#   edge and the layout tipped it over; `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (set before CUDA
#   initialises) lets the allocator grow segments instead of leaving unusable gaps, the documented remedy.
# - **Predict your step before you run it**, with the same call this notebook used on the seed's model:
#   `diagnostics.predict_step_memory(model, inputs, loss_fn=..., optimizer=..., amp_dtype=torch.float16,
#   eval_inputs=...)` on your own `nn.Module` (built under `torch.device("meta")`: no weights needed). It gives the
#   training step, the evaluation step and the first training step after it, with what is alive at each peak.
#   For `dcal`'s model, `dcal memory --preset NAME --precision fp16 --gpu-memory 16`, or for any timm backbone
#   `dcal memory --model vit_base_patch16_224 --img-size 448 --batch-size 4 --precision fp16 --gpu-memory 16`,
#   answers whether it fits, with what the card must hold beside the tensors (CUDA context, workspaces, the
#   allocator's segments and fragmentation), and the largest micro-batch that does.
# - **Compare the prediction with the card**: keep the peak plus your fragmentation well under capacity minus the
#   CUDA context; a step within ~10 % of it will fail when an evaluation or a new input size reshuffles the cache.
# - **What to change**, largest effect first: attention that keeps no score map (PyTorch's
#   `scaled_dot_product_attention`, as `dcal.layers` does) — the score maps, their fp16 copies and their dropout
#   masks were about 9 GiB of the seed's 14.4; nothing kept on the module between evaluation and training; a
#   smaller micro-batch (mind PWCA's pairing above); gradient checkpointing on the path that actually runs. For a
#   real leak: keep no tensor that holds a graph (`loss.item()`), and watch memory per step with
#   `diagnostics.MemoryCallback` / `diagnostics.LeakDetector`.
#
# ## Summary
#
# - The seed's OOM asked for one fp32 PWCA score map's gradient (226 MiB) in a backward with 14.12 GiB allocated.
#   Rebuilt from its code (93.65M parameters, as its log says) and predicted with `predict_step_memory`, the
#   seed's *ordinary* training step needs 14.38 GiB — more than that — and the GPU had 15.59 GiB for tensors: every
#   step of the run was within 1.21 GiB of the limit, and the OOM's 1.25 GiB of fragmentation is enough to fail it.
# - The evaluation's maps were not alive in the failing backward (the seed clears them at the end of the training
#   forward); they make the forward of the first step after an evaluation the run's largest (14.93 GiB), the
#   one step that changes the allocator's layout. Which evaluation leaves the cache too fragmented is not
#   predictable from sizes; the log's evaluations 1 and 2 did not.
# - "Memory accumulation" is not needed and not shown: the log allows at most 46 KiB per micro-batch or
#   0.33 GiB per evaluation. Batch 2 × 8 makes every step smaller and fits with the fragmentation; with PWCA it
#   trains on the large batch's gradient only in expectation over pairings. `empty_cache()` frees no allocated
#   memory and could not be measured here.
