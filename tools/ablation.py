"""The ablation table of the README: SA-only, SA+GLCA, SA+PWCA, DCAL (and DCAL from scratch) on the
embedded benchmark, the demo preset's budget, mean ± std over seeds; plus chance and the linear baselines.

  python tools/ablation.py [--seeds 0 1 2] [--jobs 2] [--out runs/ablation]

Each run is `dcal train --preset demo --seed S` with the variant's switches, one thread per process.
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

VARIANTS = {
    "SA only": ["model.glca=false", "model.pwca=false"],
    "SA + GLCA": ["model.pwca=false"],
    "SA + PWCA": ["model.glca=false"],
    "DCAL (SA + GLCA + PWCA)": [],
    "DCAL, glca_pool=mean": ["model.glca_pool=mean"],
    "DCAL from scratch (no pretraining)": ["model.pretrained=false"],
}
FIELDS = ("acc_sa", "acc_glca", "acc_fused", "part_hit", "distractor_hit", "part_hit_top1", "distractor_hit_top1")


def run(name: str, seed: int, out: Path) -> dict:
    run_dir = out / f"{name.split(' (')[0].replace(' ', '_').replace('+', 'plus').replace(',', '')}-s{seed}"
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        args = [sys.executable, "-m", "dcal", "train", "--preset", "demo", "--out", str(run_dir), "--seed", str(seed),
                "--no-diagnostics", "--set", "train.progress=false"]
        for s in VARIANTS[name]:
            args += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{name} seed {seed} failed:\n{r.stderr[-2000:]}")
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    ev = [r for r in recs if r["kind"] == "eval"][-1]
    steps = [r for r in recs if r["kind"] == "step"]
    return {"variant": name, "seed": seed, "wall_s": steps[-1]["time"], **{k: ev.get(k) for k in FIELDS}}


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
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, s) for name in VARIANTS for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: run(j[0], j[1], args.out), jobs))
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1))

    import torch

    from dcal.data import SyntheticSpec, load_or_generate
    from dcal.data.probes import baseline_accuracies

    torch.manual_seed(0)
    base = baseline_accuracies(load_or_generate(SyntheticSpec(num_classes=10, seed=0)))
    lines = ["| variant | SA acc | GLCA acc | fused acc | part hit | distractor hit | top-1 on part | top-1 on distractor | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        lines.append(f"| {name} | " + " | ".join(fmt([r[k] for r in rs]) for k in FIELDS) + f" | {fmt([r['wall_s'] for r in rs])} |")
    lines.append("")
    lines.append(f"Chance: accuracy 0.100. Linear baselines (test accuracy): {json.dumps({k: round(v, 3) for k, v in base.items()})}")
    table = "\n".join(lines)
    (args.out / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
