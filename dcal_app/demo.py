"""`make demo`: fine-tune DCAL from the project's pretrained backbone on the embedded benchmark, on CPU."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

__all__ = ["run_demo"]


def run_demo(out_dir: Path, overrides: list[str] | None = None) -> int:
    import torch

    import diagnostics
    from dcal.config import apply_overrides, preset
    from dcal.runfolder import CONFIG_FILE
    from dcal.train import build_trainer

    from .callbacks import default_callbacks

    out_dir = Path(out_dir)
    if out_dir.exists() and (out_dir / CONFIG_FILE).exists():
        print(f"removing the previous demo run in {out_dir}")
        shutil.rmtree(out_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    cfg = apply_overrides(preset("demo"), overrides or [])
    trainer = build_trainer(cfg, out_dir, callbacks=default_callbacks())
    trainer.fit()
    ev = trainer.last_eval
    report = out_dir / "doctor.html"
    findings = diagnostics.doctor.diagnose(out_dir)
    diagnostics.doctor.write_html(out_dir, findings, report)
    wall = time.perf_counter() - start

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    print()
    print(f"DCAL demo ({cfg.model.backbone}, {cfg.derived['num_classes']} classes, {cfg.data.img_size} px, "
          f"{trainer.step} steps) finished in {wall:.0f} s")
    print(f"  accuracy  SA {f(ev['acc_sa'])}  GLCA {f(ev['acc_glca'])}  fused {f(ev['acc_fused'])}")
    print(f"  GLCA part hit-rate {f(ev.get('part_hit'))} (chance {f(ev.get('part_hit_chance'))}), "
          f"distractor hit-rate {f(ev.get('distractor_hit'))}")
    print(f"  top-1 selected patch on the part {f(ev.get('part_hit_top1'))}, "
          f"on a distractor {f(ev.get('distractor_hit_top1'))}")
    print(f"  doctor: {len(findings)} finding(s), "
          f"{sum(x.severity == 'error' for x in findings)} error(s) → {report}")
    print(f"  run folder: {out_dir}")
    return 0
