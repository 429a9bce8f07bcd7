"""DCAL vs its SA baseline, measured side by side: `python -m benchmarks.run [--quick] [--device cpu|cuda]
[--out FILE.json] [--threads N]`.

Every row is a ratio B/A of two things measured in the same process, alternating A and B pair by pair after
a warm-up; the ratio column is the median of the per-pair ratios and its interquartile range. Next to it:
the FLOP ratio of the same two calls (`dcal.flops.count_flops`), the floor a measured ratio can approach,
and the target. Rows:

- train/<case>: one optimiser step (forward, backward, AdamW) of DCAL (UncertaintyLoss over the SA, GLCA and
  PWCA cross-entropies) vs the SA-only model built by the same code (``glca=False, pwca=False``).
- infer/<case>: ``DCAL.predict`` vs the plain timm forward of the same weights (``model.backbone``), eval and
  no_grad.
- rollout/<case>: our CLS-row chain (`dcal.attention_rollout`) vs the full-matrix product; and the chain as
  a fraction of one DCAL training step.
- memory/deit448: peak training memory, DCAL vs SA, with and without gradient checkpointing.
- overhead/<case>: the tier-1 NaN checks and the memory callback per step, when `diagnostics` provides them.
- watch/<case>, watch-amortised/<case>: a hand-written loop's step with `diagnostics.watch` attached vs without
  (`benchmarks/watch.py`): the median per-pair ratio, and the ratio of total times.

- infer-parts/<case>: where `DCAL.predict`'s time over timm goes, stage by stage (`cases.inference_stages`):
  the SA blocks computing their attention weights vs timm, then the rollout chain, then selection + GLCA;
  each row B/A of two adjacent stages, so the three ratios multiply to the whole.

`--only SECTION[,SECTION]` runs some sections: train, infer, parts, rollout, memory, overhead, watch.

Clock and allocator (both recorded in the JSON's ``machine``): on CPU each call is timed in process CPU time
(`--clock cpu`, the default; `--clock wall` for wall time; CUDA always wall), so that other jobs on a shared
machine do not enter the ratios. glibc's malloc adapts its mmap and trim thresholds to what the process has
freed so far, so how many pages a call faults in depends on what ran before it: measured, 0 to 15k minor
faults per `DCAL.predict` at 224 px b8 (7-10 % of its time), 0 for the timm forward, for the same code.
`--malloc fixed` (glibc only) fixes both thresholds with `mallopt` for the whole run (mmap above 32 MiB, never
trim), as `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` would, so that A and B compare compute;
`--malloc default` keeps the C library's policy; `--malloc auto` (the default) is `fixed` on glibc, else
`default`. Warm-up: the training and inference rows keep warming up (up to `STEADY_PAIRS` more pairs) until
no call faults in new pages, which the first steps of a run do (`timing.py` says how many); the row's note
gives the warm-up pairs' page faults.

Writes JSON (`--out`) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch

from .cases import (
    CASES,
    Case,
    chain_rollout,
    flops_of,
    full_product_rollout,
    inference_stages,
    make_train_step,
    random_maps,
)
from .memory import peak_memory
from .timing import ab_timing, quantiles, timing
from .watch import bench_watch

__all__ = ["main", "run", "Settings", "PRESETS"]


@dataclass(frozen=True)
class Settings:
    """How many A/B pairs each kind of row gets, and which cases run."""

    cases: tuple[str, ...]
    memory_case: str
    train_pairs: int
    infer_pairs: int
    rollout_pairs: int
    budget_s: float  # per row: stop adding pairs after this long (at least 3 pairs)
    overhead_case: str = "demo"
    flops: bool = True
    watch_pairs: int = 40
    sections: tuple[str, ...] = ("train", "infer", "parts", "rollout", "memory", "overhead", "watch")
    clock: str = "cpu"  # cpu: process CPU time on CPU devices (wall on CUDA); wall: wall time everywhere
    malloc: str = "auto"  # fixed: glibc mmap/trim thresholds fixed (see the docstring); default; auto: fixed on glibc


PRESETS = {
    "full": Settings(("deit224", "deit448", "demo"), "deit448", 15, 21, 11, budget_s=75.0, watch_pairs=80),
    "quick": Settings(("deit224", "deit448", "demo"), "deit448", 5, 7, 5, budget_s=20.0),
    "tiny": Settings(("tiny",), "tiny", 3, 3, 3, budget_s=5.0, overhead_case="tiny"),  # the smoke test
}


# ----------------------------------------------------------------------------- helpers
def machine(device: torch.device, threads: int) -> dict:
    """CPU model, cores, thread count, versions, load: what a reader needs to judge the numbers."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        cpu = platform.processor() or cpu
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "device": str(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


CLOCKS = ("cpu", "wall")
MALLOC = ("auto", "fixed", "default")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _clock(s: Settings, device: torch.device) -> Callable[[], float]:
    """What each call is timed with: process CPU time on CPU with ``clock="cpu"``, else wall time."""
    if s.clock not in CLOCKS:
        raise ValueError(f"Settings.clock must be one of {CLOCKS}, got {s.clock!r}")
    return time.process_time if s.clock == "cpu" and device.type == "cpu" else time.perf_counter


def set_malloc(mode: str) -> str:
    """Apply the allocator policy `mode` (see the module docstring) and return how it reads in the report.

    Raises RuntimeError for ``"fixed"`` where the C library has no glibc ``mallopt`` or refuses a value.
    """
    if mode not in MALLOC:
        raise ValueError(f"Settings.malloc must be one of {MALLOC}, got {mode!r}")
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process already runs on
    if mode == "default" or (mode == "auto" and mallopt is None):
        return "C library default" + (" (no glibc mallopt here)" if mode == "auto" else "")
    if mallopt is None:
        raise RuntimeError("--malloc fixed needs glibc's mallopt, which this C library lacks: use --malloc default")
    for name, param, value in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, 32 << 20),
                               ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 1 << 30)):
        if mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({name}, {value}) failed: use --malloc default")
    return "glibc, mallopt: mmap threshold 32 MiB, trim threshold 1 GiB"


def row(name: str, what: str, a_label: str, b_label: str, a: dict, b: dict, ratio: dict, *, unit: str = "s",
        pairs: int | None = None, flop_ratio: float | None = None, target: float | None = None,
        strict: bool = False, note: str = "") -> dict:
    """One table row; `met` compares the median ratio with the target (``<`` if strict, else ``<=``)."""
    met = None if target is None else (ratio["median"] < target if strict else ratio["median"] <= target)
    return {"name": name, "what": what, "a_label": a_label, "b_label": b_label, "unit": unit, "a": a, "b": b,
            "ratio": ratio, "pairs": pairs, "flop_ratio": flop_ratio, "target": target,
            "target_op": "<" if strict else "<=", "met": met, "note": note}


# Training and inference rows compare steady calls: after the first warm-up pair, up to this many more until
# no call faults in `timing.STEADY_FAULTS` pages (`benchmarks/timing.py` says why and what it measured).
STEADY_PAIRS = 5


def _warmup_note(t: dict) -> str:
    f = t["warmup_faults"]
    if f and f[-1][0] is not None:
        return f"warm-up: {len(f)} pair(s), page faults {' '.join(f'{a}/{b}' for a, b in f)}"
    return f"warm-up: {len(f)} pair(s)"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections
def bench_train(case: Case, s: Settings, device: torch.device) -> tuple[dict, dict]:
    """Training step DCAL vs SA. Returns the row and the DCAL step times (for the rollout fraction)."""
    sa = make_train_step(case, device, dcal_branches=False)
    dc = make_train_step(case, device, dcal_branches=True)
    flop_ratio = None
    if s.flops:
        flop_ratio = flops_of(dc.forward_backward) / flops_of(sa.forward_backward)
    t = ab_timing(sa, dc, repeats=s.train_pairs, steady=STEADY_PAIRS, budget_s=s.budget_s, sync=_sync(device),
                  clock=_clock(s, device))
    r = row(f"train/{case.name}", f"training step (fwd+bwd+AdamW), {case.label}", "SA", "DCAL",
            t["a"], t["b"], t["ratio"], pairs=t["pairs"], flop_ratio=flop_ratio, target=case.train_target,
            note="FLOPs: forward+backward (the optimiser step is not counted); " + _warmup_note(t))
    return r, t["b"]


def bench_infer(case: Case, s: Settings, device: torch.device) -> dict:
    """DCAL.predict vs the timm forward of the same weights, eval + no_grad."""
    model = case.build(device).eval()
    x, _ = case.batch_on(device)
    timm_fwd = lambda: model.backbone(x)  # noqa: E731
    ours = lambda: model.predict(x)  # noqa: E731
    with torch.no_grad():
        flop_ratio = flops_of(ours) / flops_of(timm_fwd) if s.flops else None
        t = ab_timing(timm_fwd, ours, repeats=s.infer_pairs, steady=STEADY_PAIRS, budget_s=s.budget_s,
                      sync=_sync(device), clock=_clock(s, device))
    return row(f"infer/{case.name}", f"inference (eval, no_grad), {case.label}", "timm", "DCAL.predict",
               t["a"], t["b"], t["ratio"], pairs=t["pairs"], flop_ratio=flop_ratio, target=case.infer_target,
               note=_warmup_note(t))


def bench_infer_parts(case: Case, s: Settings, device: torch.device) -> list[dict]:
    """`DCAL.predict` over timm in three adjacent A/B rows: + attention weights, + rollout, + selection/GLCA."""
    model = case.build(device).eval()
    x, _ = case.batch_on(device)
    stages = inference_stages(model, x)
    steps = (("weights", "timm", "weights", "SA blocks computing their attention weights"),
             ("rollout", "weights", "rollout", "the rollout chain over those maps"),
             ("glca", "rollout", "predict", "the top-k selection, GLCA and the fused probabilities"))
    rows = []
    with torch.no_grad():
        for name, a, b, what in steps:
            t = ab_timing(stages[a], stages[b], repeats=s.infer_pairs, steady=STEADY_PAIRS, budget_s=s.budget_s,
                          sync=_sync(device), clock=_clock(s, device))
            rows.append(row(f"infer-parts/{case.name}/{name}", f"inference breakdown, {case.label}: + {what}",
                            a, b, t["a"], t["b"], t["ratio"], pairs=t["pairs"], note=_warmup_note(t)))
    return rows


def bench_rollout(case: Case, s: Settings, device: torch.device, dcal_step: dict | None) -> list[dict]:
    """Chain vs full-matrix rollout on L random (B, N, N) maps; the chain as a fraction of a DCAL step."""
    model = case.build(device, pwca=False)
    L, N = len(model.backbone.blocks), model.num_patches + model.num_prefix_tokens
    del model
    maps = random_maps(case.batch, N, L, device)
    err = (chain_rollout(maps) - full_product_rollout(maps)).abs().max().item()
    flop_ratio = None
    if s.flops:
        flop_ratio = flops_of(lambda: chain_rollout(maps)) / flops_of(lambda: full_product_rollout(maps))
    t = ab_timing(lambda: full_product_rollout(maps), lambda: chain_rollout(maps), repeats=s.rollout_pairs,
                  budget_s=s.budget_s, sync=_sync(device), clock=_clock(s, device))
    rows = [row(f"rollout/{case.name}", f"rollout over L={L} maps (B={case.batch}, N={N})", "full N×N×N product",
                "CLS-row chain", t["a"], t["b"], t["ratio"], pairs=t["pairs"], flop_ratio=flop_ratio,
                note=f"max |chain - full| = {err:.1e}")]
    if dcal_step is not None:
        frac = {k: t["b"][k] / dcal_step["median"] for k in ("median", "q1", "q3")}
        frac["iqr"] = frac["q3"] - frac["q1"]
        rows.append(row(f"rollout-share/{case.name}", f"rollout chain / one DCAL training step, {case.label}",
                        "DCAL train step", "rollout chain", dcal_step, t["b"], frac, target=0.02,
                        note="ratio of medians (chain quartiles over the step median)"))
    return rows


def bench_memory(case: Case, device: torch.device) -> list[dict]:
    """Peak memory of one training step (after a warm-up step, so that the AdamW state exists)."""
    peaks = {}
    method = None
    for label, branches, ckpt in (("SA", False, False), ("DCAL", True, False),
                                  ("SA+ckpt", False, True), ("DCAL+ckpt", True, True)):
        step = make_train_step(case, device, dcal_branches=branches, grad_checkpointing=ckpt)
        step()
        m = peak_memory(step, device, resident=step.resident())
        peaks[label], method = m["peak_bytes"], m["method"]
        del step, m
        _free(device)

    def one(b: float) -> dict:
        return {"median": float(b), "q1": float(b), "q3": float(b), "iqr": 0.0}

    def r(name, a, b, target, strict=False):
        ratio = one(peaks[b] / peaks[a])
        return row(f"memory/{case.name}/{name}", f"peak training memory, {case.label}", a, b, one(peaks[a]),
                   one(peaks[b]), ratio, unit="bytes", pairs=1, target=target, strict=strict, note=method)

    return [r("dcal_vs_sa", "SA", "DCAL", 2.3), r("dcal_ckpt_vs_sa", "SA", "DCAL+ckpt", 1.0, strict=True),
            r("dcal_ckpt_vs_sa_ckpt", "SA+ckpt", "DCAL+ckpt", None)]


def bench_overheads(case: Case, s: Settings, device: torch.device) -> list[dict]:
    """Per-step cost of the tier-1 NaN checks and of the memory callback on DCAL training steps."""
    return [_nan_check_overhead(case, s, device), _memory_callback_overhead(case, s, device)]


def _nan_check_overhead(case: Case, s: Settings, device: torch.device) -> dict:
    name = f"overhead/{case.name}/nan_checks"
    try:
        from diagnostics.nonfinite import finite_checks
    except ImportError as e:
        return _skipped(name, "tier-1 NaN checks per step", f"skipped: {e}")
    step = make_train_step(case, device, dcal_branches=True)
    sync = _sync(device)

    def checked():
        step()
        grads = [p.grad for p in step.model.parameters() if p.grad is not None]
        values = {**{k: v.detach() for k, v in step.last.items()}, "w": step.loss_fn.weights().detach(),
                  "grad_norm": torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))}
        if finite_checks(values):
            raise RuntimeError("non-finite values in a benchmark step")

    step()
    clock = _clock(s, device)
    t = timing(step, repeats=s.train_pairs, sync=sync, clock=clock)
    c = timing(checked, repeats=s.train_pairs, sync=sync, clock=clock)
    # The check is microseconds against a step of hundreds of milliseconds: an A/B ratio of whole steps would
    # only show noise, so time it alone (with the grad norm it needs) and divide by the step.
    values = {**{k: v.detach() for k, v in step.last.items()}, "w": step.loss_fn.weights().detach()}
    grads = [p.grad for p in step.model.parameters() if p.grad is not None]

    def check_only():
        values["grad_norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        finite_checks(values)

    alone = timing(check_only, repeats=50, sync=sync, clock=clock)
    frac = {k: alone[k] / t["median"] for k in ("median", "q1", "q3")}
    frac["iqr"] = frac["q3"] - frac["q1"]
    return row(name, f"tier-1 NaN checks (diagnostics.nonfinite.finite_checks: losses, w, grad norm), {case.label}",
               "DCAL train step", "checks", quantiles(t["s"]), quantiles(alone["s"]), frac, target=0.01,
               note=f"checks timed alone / step median; whole steps with checks: {c['median'] / t['median']:.3f}×")


def _memory_callback_overhead(case: Case, s: Settings, device: torch.device) -> dict:
    name = f"overhead/{case.name}/memory_callback"
    try:
        from diagnostics.memory import MemoryCallback
    except ImportError as e:
        return _skipped(name, "memory callback per step", f"skipped: {e}")
    from types import SimpleNamespace

    plain = make_train_step(case, device, dcal_branches=True)
    hooked = make_train_step(case, device, dcal_branches=True)
    cb = MemoryCallback()
    trainer = SimpleNamespace(model=hooked.model, loss_fn=hooked.loss_fn, optimizer=hooked.optimizer, device=device,
                              step=0, epoch=0, micro_step=0, record={}, cfg=None, out_dir=None, log=lambda m: None)
    cb.before_fit(trainer)
    t = ab_timing(plain, lambda: hooked.with_events(cb, trainer), repeats=2 * s.train_pairs,
                  budget_s=s.budget_s, sync=_sync(device), clock=_clock(s, device))
    mean_ratio = sum(t["b_s"]) / sum(t["a_s"])
    measured = len(getattr(cb, "measured_steps", []))
    return row(name, f"memory callback (diagnostics.memory.MemoryCallback, all step events), {case.label}",
               "DCAL train step", "+ callback", t["a"], t["b"], t["ratio"], pairs=t["pairs"], target=1.02,
               note=f"{measured} of {t['pairs'] + 1} steps measured (the callback samples on CPU); "
                    f"ratio of total times {mean_ratio:.3f}")


def _skipped(name: str, what: str, note: str) -> dict:
    return {"name": name, "what": what, "skipped": True, "note": note}


# ----------------------------------------------------------------------------- report
def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 2**20:.1f} MiB"
    return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"


def markdown(rows: list[dict]) -> str:
    lines = ["| measurement | A | B | B/A (median) | IQR | FLOP ratio | target | met? |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | | | | | | | {r['note']} |")
            continue
        u = r["unit"]
        a = f"{r['a_label']}: {_fmt(r['a']['median'], u)}"
        b = f"{r['b_label']}: {_fmt(r['b']['median'], u)}"
        ratio = r["ratio"]
        fr = "—" if r["flop_ratio"] is None else f"{r['flop_ratio']:.3g}"
        tgt = "—" if r["target"] is None else f"{r['target_op']} {r['target']:g}"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['name']} | {a} | {b} | {ratio['median']:.3g} | {ratio['q1']:.3g}–{ratio['q3']:.3g} "
                     f"| {fr} | {tgt} | {met} |")
    return "\n".join(lines)


def run(settings: Settings, device: torch.device, threads: int, log=print) -> dict:
    """Run every section; return the JSON-able result (machine, settings, rows, wall time)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    info = machine(device, threads)
    info["malloc"] = set_malloc(settings.malloc)
    info["clock"] = "process CPU time" if _clock(settings, device) is time.process_time else "wall time"
    rows: list[dict] = []
    steps: dict[str, dict] = {}

    def add(new):
        for r in new if isinstance(new, list) else [new]:
            rows.append(r)
            if not r.get("skipped"):
                log(f"  {r['name']}: {r['ratio']['median']:.3f} (IQR {r['ratio']['q1']:.3f}–{r['ratio']['q3']:.3f})"
                    f"  [{time.perf_counter() - t0:.0f} s]")
            else:
                log(f"  {r['name']}: {r['note']}")

    on = set(settings.sections)
    for name in settings.cases if on & {"train", "infer", "parts", "rollout"} else ():
        case = CASES[name]
        log(f"{case.name}: {case.label}")
        if "train" in on:
            r, steps[name] = bench_train(case, settings, device)
            add(r)
            _free(device)
        if "infer" in on:
            add(bench_infer(case, settings, device))
            _free(device)
        if "parts" in on:
            add(bench_infer_parts(case, settings, device))
            _free(device)
        if "rollout" in on:
            add(bench_rollout(case, settings, device, steps.get(name)))
    if "memory" in on:
        log(f"memory: {CASES[settings.memory_case].label}")
        add(bench_memory(CASES[settings.memory_case], device))
    over = settings.overhead_case
    if on & {"overhead", "watch"}:
        log(f"overheads: {CASES[over].label}")
    if "overhead" in on:
        add(bench_overheads(CASES[over], settings, device))
    if "watch" in on:
        add(bench_watch(CASES[over], settings.watch_pairs, device, row))
    info["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    wall = time.perf_counter() - t0
    return {"machine": info, "settings": settings.__dict__, "rows": rows, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer pairs per row (< 3 min on 2 CPU cores)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="overrides --quick (tiny: smoke test)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: stable on a shared machine)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    p.add_argument("--clock", choices=CLOCKS, default="cpu", help="time calls in process CPU time (default, CPU "
                   "only) or wall time (CUDA: always wall)")
    p.add_argument("--malloc", choices=MALLOC, default="auto",
                   help="fixed: glibc malloc thresholds fixed for the run; default: the C library's own policy; "
                        "auto (default): fixed on glibc")
    p.add_argument("--only", default=None, metavar="SECTION[,SECTION]",
                   help=f"run only these sections, of {', '.join(Settings.sections)}")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    preset = args.preset or ("quick" if args.quick else "full")
    settings = PRESETS[preset]
    settings = Settings(**{**settings.__dict__, "clock": args.clock, "malloc": args.malloc})
    if args.no_flops:
        settings = Settings(**{**settings.__dict__, "flops": False})
    if args.only:
        only = tuple(x.strip() for x in args.only.split(","))
        unknown = sorted(set(only) - set(Settings.sections))
        if unknown:
            p.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(Settings.sections)}")
        settings = Settings(**{**settings.__dict__, "sections": only})
    device = torch.device(args.device)
    result = run(settings, device, args.threads, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["preset"] = preset
    m = result["machine"]
    print(f"\nMachine: {m['cpu']} ({m['cpu_affinity']} cores available), {m['torch_threads']} torch thread(s), "
          f"{m['device']}{' ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, timm {m['timm']}; "
          f"load {m['load_avg_start'][0]:.1f}→{m['load_avg_end'][0]:.1f}; preset {preset}; "
          f"wall {result['wall_s']:.0f} s; timed in {m['clock']}; malloc: {m['malloc']}\n")
    print(markdown(result["rows"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
