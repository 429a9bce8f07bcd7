"""Trainer checkpoints: the `Checkpointer` callback (last.pt each epoch, best.pt on a new best), atomic
writes, and reading a checkpoint back with `weights_only=True`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .callbacks import Callback
from .config import Config, config_from_dict
from .errors import CheckpointError
from .runfolder import BEST_CHECKPOINT, LAST_CHECKPOINT

__all__ = ["Checkpointer", "save_atomic", "load_checkpoint", "config_of_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "dcal-checkpoint-1"


class Checkpointer(Callback):
    """Writes last.pt after every epoch (and best.pt on a new best fused accuracy), atomically."""

    order = 90

    def __init__(self, out_dir: Path, save_best: bool = True):
        self.out_dir = Path(out_dir)
        self.save_best = save_best

    def after_epoch(self, trainer):
        trainer.save_checkpoint(self.out_dir / LAST_CHECKPOINT)
        ev = trainer.last_eval
        if self.save_best and ev is not None and ev.get("step") == trainer.step:
            score = ev.get("acc_fused")
            if score is not None and score > trainer.best_score:
                trainer.best_score = score
                trainer.save_checkpoint(self.out_dir / BEST_CHECKPOINT)


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill leaves the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a trainer checkpoint with `weights_only=True`, raising CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many types; name the file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a dcal trainer checkpoint (no format marker)")
    return ckpt


def config_of_checkpoint(ckpt: dict) -> Config:
    return config_from_dict(ckpt["config"])
