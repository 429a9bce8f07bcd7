"""The ablation table of the README: SA-only, SA+PWCA, SA+GLCA and DCAL with each GLCA head, DCAL with the seed's
uniform fallback and with random local queries, and DCAL from scratch, on the embedded benchmark at the demo
preset's budget, mean ± std over seeds (final and first-epoch numbers); plus chance and the linear baselines.

  python tools/ablation.py [--seeds 0 1 2] [--jobs 2] [--out runs/ablation] [--only NAME ...]

Each run is `dcal train --preset demo --seed S` with the variant's switches, one thread per process; finished
runs (a run folder with its metrics.jsonl) are read, not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dcal.runfolder import METRICS_FILE, decode_record

# Every GLCA head ("cls": GLCA's CLS output; "mean": mean of CLS + the k local outputs; "local": mean of the
# k local outputs), each with and without PWCA; then what the rollout buys: the default head with the
# seed's uniform fallback selection and with random local queries (DCAL_METHOD.md §3).
VARIANTS = {
    "SA only": ["model.glca=false", "model.pwca=false"],
    "SA + PWCA": ["model.glca=false"],
    "SA + GLCA, pool=cls": ["model.pwca=false", "model.glca_pool=cls"],
    "SA + GLCA, pool=mean": ["model.pwca=false", "model.glca_pool=mean"],
    "SA + GLCA, pool=local": ["model.pwca=false", "model.glca_pool=local"],
    "DCAL, pool=cls": ["model.glca_pool=cls"],
    "DCAL, pool=mean": ["model.glca_pool=mean"],
    "DCAL, pool=local": ["model.glca_pool=local"],
    "DCAL, default head, uniform selection": ["model.glca_selection=uniform"],
    "DCAL, default head, random selection": ["model.glca_selection=random"],
    "DCAL from scratch (no pretraining)": ["model.pretrained=false"],
}
FIELDS = ("acc_sa", "acc_glca", "acc_fused", "part_hit", "distractor_hit", "part_hit_top1", "distractor_hit_top1")
# The same run after its first epoch (62 optimiser steps): on the decoy benchmark every variant reaches
# 1.000 by epoch 2, so how fast a variant gets there is what still tells the variants apart.
EARLY_FIELDS = ("acc_glca", "acc_fused", "part_hit_top1")


def run(name: str, seed: int, out: Path) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name.split(" (")[0].replace("+", "plus")).strip("_")
    run_dir = out / f"{slug}-s{seed}"
    metrics = run_dir / METRICS_FILE
    if not metrics.exists():
        args = [sys.executable, "-m", "dcal_app", "train", "--preset", "demo", "--out", str(run_dir), "--seed", str(seed),
                "--no-diagnostics", "--set", "train.progress=false"]
        for s in VARIANTS[name]:
            args += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{name} seed {seed} failed:\n{r.stderr[-2000:]}")
    recs = [decode_record(json.loads(line)) for line in metrics.read_text().splitlines()]
    evals = [r for r in recs if r["kind"] == "eval"]
    ev, first = evals[-1], evals[0]
    steps = [r for r in recs if r["kind"] == "step"]
    return {"variant": name, "seed": seed, "wall_s": steps[-1]["time"], **{k: ev.get(k) for k in FIELDS},
            **{f"{k}@1": first.get(k) for k in EARLY_FIELDS}, "first_eval_step": first["step"]}


def fmt(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--only", nargs="+", default=None, help="run only the variants whose name contains one of these")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in VARIANTS if args.only is None or any(o in n for o in args.only)]
    jobs = [(name, s) for name in names for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: run(j[0], j[1], args.out), jobs))
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1))

    import torch

    from dcal.data import SyntheticSpec, load_or_generate
    from dcal.data.probes import baseline_accuracies

    torch.manual_seed(0)
    base = baseline_accuracies(load_or_generate(SyntheticSpec(num_classes=10, seed=0)))
    lines = ["| variant | SA acc | GLCA acc | fused acc | part hit | distractor hit | top-1 on part | top-1 on distractor "
             "| GLCA acc, epoch 1 | fused acc, epoch 1 | top-1 on part, epoch 1 | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        cells = [fmt([r[k] for r in rs]) for k in FIELDS] + [fmt([r[f"{k}@1"] for r in rs]) for k in EARLY_FIELDS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt([r['wall_s'] for r in rs])} |")
    lines.append("")
    lines.append(f"Chance: accuracy 0.100. Linear baselines (test accuracy): {json.dumps({k: round(v, 3) for k, v in base.items()})}")
    table = "\n".join(lines)
    (args.out / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
