"""Small readings of a `RunLog` the checks share: branch switches from the config, the late window, the
model's shape for the memory arithmetic, labels and number formats."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..runlog import RunLog, config_get
from ..stats import BRANCHES, has_values
from .rules import LATE_FRACTION

__all__ = ["LABEL", "LATE_FRACTION", "ModelShape", "branch_enabled", "int_or_none", "late_start",
           "longest_streak", "fmt", "acc_label", "record_unit", "data_losses", "loss_label", "series",
           "is_branch_column"]

LABEL = {"sa": "SA", "glca": "GLCA", "pwca": "PWCA", "fused": "fused"}



@dataclass(frozen=True)
class ModelShape:
    """What the attention-memory estimate needs: a timm backbone name, the input side, the micro-batch;
    ``source`` says where they came from (the run's config, or the command line)."""

    backbone: str
    img_size: int
    batch_size: int
    source: str = "given"

    @classmethod
    def from_config(cls, config: dict | None) -> ModelShape | None:
        backbone = config_get(config, "model", "backbone")
        img, batch = config_get(config, "data", "img_size"), config_get(config, "train", "batch_size")
        if isinstance(backbone, str) and int_or_none(img) and int_or_none(batch):
            return cls(backbone, int(img), int(batch), "the run's config")
        return None


def branch_enabled(config: dict | None, branch: str) -> bool | None:
    """config model.<branch> read as on/off: a bool, a dict's ``enabled``, a count of blocks; None if absent."""
    value = config_get(config, "model", branch)
    if isinstance(value, dict):
        return bool(value.get("enabled", True))
    if isinstance(value, (bool, numbers.Number)):
        return bool(value)
    return None


def int_or_none(value) -> int | None:
    return int(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else None


def late_start(log: RunLog) -> float | None:
    """First step of the late window: the last third of the run, or the end of warm-up if later; None when
    there are no records or the run ended within its warm-up."""
    frames = [df["step"] for df in (log.steps, log.evals) if "step" in df.columns and len(df)]
    if not frames:
        return None
    steps = pd.concat(frames)
    first, last = float(steps.min()), float(steps.max())
    warmup = int_or_none(config_get(log.config, "derived", "warmup_steps")) or 0
    if warmup >= last:
        return None  # the run never left warm-up (a smoke test): being at chance says nothing yet
    return max(float(warmup), first + LATE_FRACTION * (last - first))


def longest_streak(mask: np.ndarray) -> tuple[int, int]:
    """(length, start index) of the longest run of True."""
    best, best_start, run, start = 0, 0, 0, 0
    for i, m in enumerate(mask):
        if m:
            if run == 0:
                start = i
            run += 1
            if run > best:
                best, best_start = run, start
        else:
            run = 0
    return best, best_start


def fmt(x: float) -> str:
    return f"{x:.4g}"


def acc_label(col: str) -> str:
    """``acc_sa`` → "SA", ``val_acc`` → "validation", ``train_acc_glca`` → "train GLCA"."""
    if col == "val_acc":
        return "validation"
    prefix = "train " if col.startswith("train_") else ("validation " if col.startswith("val_") else "")
    rest = col.removeprefix("train_").removeprefix("val_").removeprefix("acc").lstrip("_")
    return (prefix + LABEL.get(rest, rest)).strip() or col


def record_unit(log: RunLog) -> str:
    """What ``step`` counts, for messages: "step" or "epoch" (or "record")."""
    return log.step_unit


def data_losses(steps: pd.DataFrame) -> list[str]:
    """The training losses that are data losses (a cross-entropy, comparable with ln C): DCAL's branch losses
    when logged, else a plain ``loss``, unless the log has uncertainty weights (then the total holds the w_i
    terms and may go negative)."""
    branches = [f"loss_{b}" for b in BRANCHES if has_values(steps, f"loss_{b}")]
    if branches:
        return branches
    weighted = any(has_values(steps, f"w_{b}") for b in BRANCHES)
    return [] if weighted or not has_values(steps, "loss") else ["loss"]


def is_branch_column(col: str) -> bool:
    """``loss_sa``, ``acc_glca``, ``train_acc_pwca``: a column of one of DCAL's branches."""
    return str(col).rsplit("_", 1)[-1] in BRANCHES


def loss_label(col: str) -> str:
    """``loss_sa`` → "SA loss", ``loss`` → "training loss", ``val_loss`` → "validation loss"."""
    if col == "loss":
        return "training loss"
    if col == "val_loss":
        return "validation loss"
    branch = col.removeprefix("val_").removeprefix("loss_")
    return ("validation " if col.startswith("val_") else "") + f"{LABEL.get(branch, branch)} loss"


def series(df: pd.DataFrame, col: str, start: float | None = None) -> pd.DataFrame:
    """``step`` and `col` where `col` is finite (from `start` on, when given), in step order."""
    if col not in df.columns or "step" not in df.columns:
        return pd.DataFrame({"step": pd.Series(dtype=float), col: pd.Series(dtype=float)})
    d = df[["step", col]].apply(pd.to_numeric, errors="coerce").dropna()
    d = d[np.isfinite(d[col].to_numpy(dtype=float))]
    if start is not None:
        d = d[d["step"] >= start]
    return d.sort_values("step", kind="stable").reset_index(drop=True)
