"""Predicted vs measured GPU memory of a training step, PyTorch-allocated and device-level, and the CUDA paths
of the memory profiler.

    python benchmarks/gpu_memory.py [--models vit_base_patch16_224,deit_tiny_patch16_224] [--sizes 224,448]
        [--precisions fp32,fp16] [--batches 2,4,8] [--variants dcal,sa] [--out DIR] [--predict-only]

For every case (model × image size × precision × batch × DCAL / SA-only) it predicts the step with
`diagnostics.predict_step_memory` (meta tensors, target ``cuda``): the PyTorch-allocated peak and the
device-level figure (`diagnostics.memory.device_memory`: + allocator segments, fragmentation allowance,
cuBLAS workspaces, CUDA context). It then measures the same step on the GPU, two numbers:

- allocated: ``torch.cuda.max_memory_allocated`` per phase (`diagnostics.MemoryProfiler`, source ``cuda``,
  reset per step and phase), against the predicted tensors plus the cuBLAS workspaces (allocated through
  the caching allocator too: `DeviceMemory.allocated_bytes`);
- device: what the card held at the step's peak, ``(total − free) − memory_reserved()`` before the step
  (`torch.cuda.mem_get_info`: the CUDA context, library handles, other processes) plus
  ``max_memory_reserved()`` over the step;

and prints a markdown table with the error of each prediction (goal: within ±10 %). It also exercises
`record_history` (a memory_viz snapshot of one step) and `oom_snapshot` (the OOM observer on a deliberate
out-of-memory allocation). Exits with status 2 and a message when no CUDA device is there; ``--predict-only``
prints the predictions alone (any machine).

The step is the predictor's own (`diagnostics.memory.step.Step`): forward + default loss under autocast,
backward, AdamW step, ``zero_grad(set_to_none=True)``, two optimiser steps, the max over both.
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
from diagnostics.memory import (  # noqa: E402
    MemoryProfiler,
    device_memory,
    oom_snapshot,
    predict_step_memory,
    record_history,
)
from diagnostics.memory.step import Batch, Step, default_loss, default_optimizer  # noqa: E402

GOAL = 0.10  # the bar for the GPU: each prediction within ±10 % of its measurement
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
    """Peaks of the training step on the GPU (bytes): allocated per phase (MemoryProfiler(source='cuda')) and
    the device-level peak (module docstring)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    outside = (total - free) - torch.cuda.memory_reserved()  # context, handles, other processes
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
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    res = {"peak_bytes": torch.cuda.max_memory_allocated(), "phases": phases,
           "reserved_peak_bytes": torch.cuda.max_memory_reserved(), "outside_allocator_bytes": outside,
           "device_bytes": outside + torch.cuda.max_memory_reserved(), "used_after_bytes": total - free_after}
    del model, x, opt, step
    torch.cuda.empty_cache()
    return res


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


def _err(pred: int, meas: int) -> str:
    return f"{(pred - meas) / meas:+.1%}"


def table(rows: list[dict]) -> str:
    head = ("| model | variant | px | precision | batch | allocated: predicted / measured MiB | error | "
            "device: predicted / measured MiB | error |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        m = r.get("measured")
        pa, pd_ = r["predicted_allocated"] / MiB, r["predicted_device"] / MiB
        if m is None:
            status = r.get("status", "not measured")
            alloc, dev = f"{pa:.0f} / {status}", f"{pd_:.0f} / {status}"
            ea = ed = "–"
        else:
            alloc, dev = f"{pa:.0f} / {m['peak_bytes'] / MiB:.0f}", f"{pd_:.0f} / {m['device_bytes'] / MiB:.0f}"
            ea, ed = _err(r["predicted_allocated"], m["peak_bytes"]), _err(r["predicted_device"], m["device_bytes"])
        lines.append(f"| {r['model']} | {r['variant']} | {r['img']} | {r['precision']} | {r['batch']} | "
                     f"{alloc} | {ea} | {dev} | {ed} |")
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
    card = {}  # the GPU's architecture and size (cuBLASLt workspace); without one, device_memory's defaults
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        card = {"sm_major": props.major, "gpu_bytes": props.total_memory}
    rows = []
    for model, img, prec, batch, variant in cases:
        t = time.perf_counter()
        pred = predict_step_memory(build(model, img, variant), (batch, 3, img, img), amp_dtype=PRECISIONS[prec],
                                   target="cuda")
        dev = device_memory(pred, **card)
        row = {"model": model, "variant": variant, "img": img, "precision": prec, "batch": batch,
               "predicted": pred.peak_bytes, "predicted_phases": {k: v.peak_bytes for k, v in pred.train.items()},
               "predicted_allocated": dev.allocated_bytes, "predicted_device": dev.device_bytes,
               "predicted_terms": dev.as_dict()["terms"],
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
        for key, pred_key, meas_key in (("allocated", "predicted_allocated", "peak_bytes"),
                                        ("device", "predicted_device", "device_bytes")):
            errs = [abs(r[pred_key] - r["measured"][meas_key]) / r["measured"][meas_key] for r in rows if "measured" in r]
            result[f"max_abs_error_{key}"] = max(errs) if errs else None
            result[f"within_goal_{key}"] = bool(errs) and max(errs) <= GOAL
    (out / "gpu_memory.json").write_text(json.dumps(result, indent=1))
    print(table(rows))
    if not a.predict_only:
        errs = {k: result[f"max_abs_error_{k}"] for k in ("allocated", "device")}
        print("\nmax |error|: " + ", ".join(f"{k} {'–' if v is None else f'{v:.1%}'}" for k, v in errs.items())
              + f" (goal ±{GOAL:.0%}); CUDA paths: {json.dumps(result['profiler_cuda_paths'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
