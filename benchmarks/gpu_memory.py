"""Predicted vs measured GPU memory of a training step, and the CUDA paths of the memory profiler.

    python benchmarks/gpu_memory.py [--models vit_base_patch16_224,deit_tiny_patch16_224] [--sizes 224,448]
        [--precisions fp32,fp16] [--batches 2,4,8] [--variants dcal,sa] [--out DIR] [--predict-only]

For every case (model × image size × precision × batch × DCAL / SA-only) it predicts the step's peak with
`diagnostics.predict_step_memory` (meta tensors, target ``cuda``) and measures the same step on the GPU
(`diagnostics.MemoryProfiler` with source ``cuda``: ``torch.cuda.max_memory_allocated`` per phase, reset
per step and phase), then prints a markdown table with the prediction error per row (goal: within ±10 %).
It also exercises `record_history` (a memory_viz snapshot of one step) and `oom_snapshot` (the OOM observer
on a deliberate out-of-memory allocation). Exits with status 2 and a message when no CUDA device is there;
``--predict-only`` prints the predictions alone (any machine).

The step is the predictor's own (`diagnostics.memory.predict._Step`): forward + default loss under
autocast, backward, AdamW step, ``zero_grad(set_to_none=True)``, two optimiser steps, the max over both.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

import dcal  # noqa: E402
from diagnostics.memory import MemoryProfiler, oom_snapshot, predict_step_memory, record_history  # noqa: E402
from diagnostics.memory.step import Batch, Step, default_loss, default_optimizer  # noqa: E402

GOAL = 0.10  # the bar for the GPU: prediction within ±10 % of torch.cuda.max_memory_allocated
MiB = 2 ** 20
PRECISIONS = {"fp32": None, "fp16": torch.float16}


class _CudaPhases:
    """The predictor's step's phase protocol, backed by a CUDA `MemoryProfiler` (it reads the peaks)."""

    def __init__(self, prof: MemoryProfiler):
        self.prof = prof

    def begin_phase(self, name: str) -> None:
        self.prof.phase_begin(name)

    def end_phase(self) -> tuple[int, list]:
        self.prof.phase_end()
        return 0, []  # the peaks are read from the profiler's step records

    def ident(self, t) -> None:  # storages are not followed on the GPU (no composition here)
        return None


def build(backbone: str, img: int, variant: str, device=None) -> torch.nn.Module:
    """The case's model: DCAL or the SA-only baseline, random weights, 200 classes."""
    on = variant == "dcal"
    ctx = torch.device("meta") if device is None else torch.device(device)
    with ctx:
        return dcal.build_model(backbone, num_classes=200, img_size=img, pretrained=False, glca=on, pwca=on)


def measure(backbone: str, img: int, variant: str, amp, batch: int) -> dict:
    """Peak of the training step on the GPU, per phase (bytes), via MemoryProfiler(source='cuda')."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(backbone, img, variant, "cuda")
    x = torch.randn(batch, 3, img, img, device="cuda")
    opt = default_optimizer(model, default_loss)
    prof = MemoryProfiler("cuda", source="cuda")
    step = Step(model, default_loss, opt, amp, 1, "cuda", _CudaPhases(prof))
    phases: dict[str, int] = {}
    for first in (True, False):
        prof.step_begin()
        step.train(Batch((x,), {}, ()), first=first)
        for name, mb in prof.step_end()["phase_peaks"].items():
            phases[name] = max(phases.get(name, 0), int(mb * 1e6))
    del model, x, opt, step
    torch.cuda.empty_cache()
    return {"peak_bytes": max(phases.values()), "phases": phases}


def check_snapshot_and_oom(out: Path) -> dict:
    """record_history writes a memory_viz snapshot; oom_snapshot dumps one when an allocation fails."""
    snap = out / "step_snapshot.pickle"
    with record_history(snap):
        model = build("deit_tiny_patch16_224", 224, "dcal", "cuda")
        model(torch.randn(2, 3, 224, 224, device="cuda")).sa_logits.sum().backward()
        del model
    oom = out / "oom_snapshot.pickle"
    total = torch.cuda.get_device_properties(0).total_memory
    raised = False
    with warnings.catch_warnings(record=True) as caught, oom_snapshot(oom):
        warnings.simplefilter("always")
        try:
            torch.empty(2 * total, dtype=torch.uint8, device="cuda")
        except torch.cuda.OutOfMemoryError:
            raised = True
    return {"snapshot_bytes": snap.stat().st_size if snap.exists() else 0, "oom_raised": raised,
            "oom_snapshot_bytes": oom.stat().st_size if oom.exists() else 0,
            "oom_warning": any("memory snapshot written" in str(w.message) for w in caught)}


def table(rows: list[dict]) -> str:
    head = ("| model | variant | px | precision | batch | predicted MiB | measured MiB | error | fwd / bwd / opt "
            "measured MiB |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        m = r.get("measured")
        if m is None:
            meas, err, ph = r.get("status", "–"), "–", "–"
        else:
            meas = f"{m['peak_bytes'] / MiB:.0f}"
            err = f"{(r['predicted'] - m['peak_bytes']) / m['peak_bytes']:+.1%}"
            ph = " / ".join(f"{m['phases'].get(k, 0) / MiB:.0f}" for k in ("forward", "backward", "optimizer"))
        lines.append(f"| {r['model']} | {r['variant']} | {r['img']} | {r['precision']} | {r['batch']} | "
                     f"{r['predicted'] / MiB:.0f} | {meas} | {err} | {ph} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_base_patch16_224,deit_tiny_patch16_224")
    p.add_argument("--sizes", default="224,448")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--batches", default="2,4,8")
    p.add_argument("--variants", default="dcal,sa")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_memory_out"), help="folder for JSON and snapshots")
    p.add_argument("--predict-only", action="store_true", help="no GPU needed: predictions only")
    a = p.parse_args(argv)
    if not a.predict_only and not torch.cuda.is_available():
        print("benchmarks/gpu_memory.py: no CUDA device (torch.cuda.is_available() is False); this script measures "
              "GPU memory. Use --predict-only for the predictions alone.", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = itertools.product(a.models.split(","), [int(s) for s in a.sizes.split(",")], a.precisions.split(","),
                              [int(b) for b in a.batches.split(",")], a.variants.split(","))
    rows = []
    for model, img, prec, batch, variant in cases:
        t = time.perf_counter()
        pred = predict_step_memory(build(model, img, variant), (batch, 3, img, img), amp_dtype=PRECISIONS[prec],
                                   target="cuda")
        row = {"model": model, "variant": variant, "img": img, "precision": prec, "batch": batch,
               "predicted": pred.peak_bytes, "predicted_phases": {k: v.peak_bytes for k, v in pred.train.items()},
               "predict_s": round(time.perf_counter() - t, 2)}
        if not a.predict_only:
            try:
                row["measured"] = measure(model, img, variant, PRECISIONS[prec], batch)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__, "rows": rows}
    if not a.predict_only:
        result["profiler_cuda_paths"] = check_snapshot_and_oom(out)
        errs = [abs(r["predicted"] - r["measured"]["peak_bytes"]) / r["measured"]["peak_bytes"]
                for r in rows if "measured" in r]
        result["max_abs_error"] = max(errs) if errs else None
        result["within_goal"] = bool(errs) and max(errs) <= GOAL
    (out / "gpu_memory.json").write_text(json.dumps(result, indent=1))
    print(table(rows))
    if not a.predict_only:
        print(f"\nmax |error| {result['max_abs_error']:.1%} (goal ±{GOAL:.0%}); CUDA paths: "
              f"{json.dumps(result['profiler_cuda_paths'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
