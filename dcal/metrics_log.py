"""The run's `metrics.jsonl`: one JSON object per line, flushed as written (kinds ``step``, ``eval``, ``end``).

Hand-written on purpose: a line per record with `json` and a flush is the whole format (what DeiT's
`log.txt` does); a logging library would add a dependency and a second format for readers to cope with.

The ``end`` record is the last line a run writes, when it completes or dies of any exception::

    {"kind": "end", "status": "completed" | "crashed", "step": int, "epoch": int,
     "exception": null | {"type": str, "message": str, "where": "file:line in function"}}

A run killed with SIGKILL writes none. On resume, records written after the checkpoint are dropped (the
resumed run writes them again) except ``end`` records, which stay as the history of earlier attempts:
a resumed file may hold ``end`` records before its last one.
"""
from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import numpy as np
import torch

from .callbacks import Callback

__all__ = ["MetricsLogger", "end_record", "clean_record", "metrics_size", "truncate_metrics", "METRICS_FILE",
           "AMP_OVERFLOW"]

METRICS_FILE = "metrics.jsonl"
# A step record's ``skip_reason`` when the fp16 GradScaler skipped the step (its scaled gradients overflowed,
# and it lowered its scale): by design, not a fault; the doctor passes over such steps.
AMP_OVERFLOW = "amp-overflow"


class MetricsLogger(Callback):
    """Writes the step and eval records, and the run's ``end`` record, to metrics.jsonl (runs last)."""

    order = 100

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = None

    def before_fit(self, trainer):
        self.file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict):
        self.file.write(json.dumps(record, allow_nan=False, default=_jsonable) + "\n")
        self.file.flush()

    def after_step(self, trainer):
        self._write(clean_record(trainer.record))

    def after_eval(self, trainer):
        self._write(clean_record(trainer.eval_record))

    def after_fit(self, trainer):
        end = getattr(trainer, "end_record", None)
        if end is not None:
            if self.file is None:  # the run died before this logger's before_fit
                self.file = open(self.path, "a", encoding="utf-8")
            self._write(clean_record(end))
        if self.file:
            self.file.close()
            self.file = None


def end_record(status: str, step: int, epoch: int, error: BaseException | None = None) -> dict:
    """The ``end`` record; `error` is described by type, message and its last traceback frame."""
    exc = None
    if error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else None
        exc = {"type": type(error).__name__, "message": str(error), "where": where}
    return {"kind": "end", "status": status, "step": step, "epoch": epoch, "exception": exc}


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to metrics.jsonl")


def clean_record(record: dict) -> dict:
    """Non-finite floats become null (JSON has no NaN); the `nonfinite` finding names them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def metrics_size(out_dir: Path | None) -> int:
    """Bytes of metrics.jsonl now (0 without a run folder or file): what a checkpoint remembers."""
    if out_dir is None:
        return 0
    p = Path(out_dir) / METRICS_FILE
    return p.stat().st_size if p.exists() else 0


def truncate_metrics(out_dir: Path, size: int) -> None:
    """Drop records written after the checkpoint (the resumed run writes them again: no duplicates), but
    keep the ``end`` records among them as history."""
    p = Path(out_dir) / METRICS_FILE
    if not p.exists() or p.stat().st_size <= size:
        return
    with open(p, "r+b") as f:
        f.seek(size)
        ends = [line for line in f.read().splitlines(keepends=True) if _is_end(line)]
        f.seek(size)
        f.truncate()
        f.write(b"".join(ends))


def _is_end(line: bytes) -> bool:
    if not line.endswith(b"\n"):  # the last line of a killed run may be cut short: not a record
        return False
    return json.loads(line).get("kind") == "end"
