"""`dcal pretrain`: the project's own small pretrained backbone.

Real DCAL fine-tunes an ImageNet-pretrained ViT; offline we cannot download one, so the project trains
its own on a *different* procedurally generated task (the synthetic family ``pretrain``: other glyphs,
other classes; no benchmark image or label is ever seen) and ships the weights as a small safetensors
file. The demo then fine-tunes from it through `pretrained=PATH`, the path a user takes with timm weights.

Deterministic for a given machine and thread count: fixed seeds, `torch.set_num_threads(THREADS)`.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

from .config import config_to_dict, preset

__all__ = ["pretrain", "WEIGHTS_NAME", "THREADS"]

WEIGHTS_NAME = "dcal_vit_p8_synth.safetensors"
THREADS = 1


def pretrain(out_dir: Path, *, progress: bool = True, overrides: list[str] | None = None) -> dict:
    """Train the SA-only backbone on the pretrain task; write weights, recipe and log into `out_dir`."""
    from safetensors.torch import save_file

    from .config import apply_overrides
    from .train import build_trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "pretrain_run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    torch.set_num_threads(THREADS)
    cfg = apply_overrides(preset("pretrain"), overrides or [])
    cfg.train.progress = progress
    start = time.perf_counter()
    trainer = build_trainer(cfg, run_dir)
    trainer.fit()
    wall = time.perf_counter() - start
    weights = {k: v.detach().contiguous() for k, v in trainer.model.backbone.state_dict().items()}
    save_file(weights, str(out_dir / WEIGHTS_NAME), metadata={"backbone": cfg.model.backbone,
                                                              "timm_kwargs": json.dumps(cfg.model.timm_kwargs)})
    recipe = {
        "what": "SA-only timm ViT pre-trained on the synthetic 'pretrain' family (other glyphs and classes than "
                "the benchmark; no benchmark image or label seen)",
        "command": "dcal pretrain",
        "config": config_to_dict(cfg),
        "final_eval": trainer.last_eval,
        "wall_seconds": round(wall, 1),
        "threads": THREADS,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    with open(out_dir / "pretrain_recipe.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    shutil.copy(run_dir / "metrics.jsonl", out_dir / "pretrain_metrics.jsonl")
    shutil.rmtree(run_dir)  # the checkpoints are large; weights, recipe and log are what we keep
    return recipe
