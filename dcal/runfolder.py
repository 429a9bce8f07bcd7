"""The run folder, a public format: its layout, its records and their encoding, and `RunWriter`, its one writer.

Both writers of run folders, the trainer (`dcal.train`, through `dcal.metrics_log.MetricsLogger` and
`dcal.checkpoint.Checkpointer`) and `diagnostics.watch`, write through `RunWriter`; the reader
(`diagnostics.runlog`: `load_run`, `read_metrics`) uses the names and `decode_record` defined here.

==================  =========================================================================================
file                what it holds
==================  =========================================================================================
``config.yaml``     the resolved config (`dcal train`: every section plus ``derived``; `watch`: what it knows)
``metrics.jsonl``   one JSON object per line, flushed as written; its ``kind`` is one of `RECORD_KINDS`
``train.log``       human-readable lines (eval results, non-finite and leak findings)
``last.pt``         the trainer's checkpoint after every epoch (written atomically)
``best.pt``         the trainer's checkpoint at the best fused accuracy
==================  =========================================================================================

Records (`RECORD_KINDS`): ``step`` (one per optimiser step: ``step``, ``epoch``, ``lr``, ``loss``,
``loss_<branch>``, ``w_<branch>``, ``grad_norm``, ``time``, and what callbacks add; a step the fp16 GradScaler
skipped has ``skipped: true, skip_reason: "amp-overflow"``), ``eval`` (one per evaluation) and ``end``, the
last line a run writes when it completes or dies of any exception::

    {"kind": "end", "status": "completed" | "crashed", "step": int, "epoch": int | null,
     "exception": null | {"type": str, "message": str, "where": "file:line in function"}}

A run killed with SIGKILL writes no ``end``. On resume, records written after the checkpoint are dropped (the
resumed run writes them again) except ``end`` records, which stay as the history of earlier attempts.

Encoding (`encode_record`): ``null`` means the field does not apply (an ablated branch's loss, no
uncertainty weighting). A non-finite float is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (JSON
has no NaN; the doctor's JSON evidence uses the same strings), so a NaN loss and an absent one stay apart.
`decode_record` turns those strings back into floats; run folders written before this encoding hold
``null`` for a non-finite value (and files written by other tools may hold the bare ``NaN``/``Infinity``
that Python's json writes): both still read, as NaN and as None.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["CONFIG_FILE", "METRICS_FILE", "LOG_FILE", "LAST_CHECKPOINT", "BEST_CHECKPOINT", "RECORD_KINDS",
           "END_STATUSES", "AMP_OVERFLOW", "NONFINITE", "RunWriter", "RunFolderError", "end_record",
           "encode_record", "decode_record", "metrics_size", "truncate_metrics"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
RECORD_KINDS = ("step", "eval", "end")
END_STATUSES = ("completed", "crashed")
# A step record's ``skip_reason`` when the fp16 GradScaler skipped the step (its scaled gradients overflowed,
# and it lowered its scale): by design, not a fault; the doctor passes over such steps.
AMP_OVERFLOW = "amp-overflow"
# How a non-finite float is written in metrics.jsonl, and read back.
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class RunFolderError(ValueError):
    """A record or a run folder the writer refuses; the message names the file and the field."""


# ----------------------------------------------------------------------------- encoding
def _encode(value: Any, where: str) -> Any:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported: readers stay torch-free
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v, f"{where}.{k}") for k, v in value.items()}
    raise RunFolderError(f"cannot write {type(value).__name__} to {METRICS_FILE} (field {where})")


def encode_record(record: Mapping[str, Any]) -> dict:
    """A record as metrics.jsonl holds it: tensors and numpy scalars as Python numbers or lists, non-finite
    floats as ``"nan"``/``"inf"``/``"-inf"`` (at any depth), None as null."""
    return {str(k): _encode(v, str(k)) for k, v in record.items()}


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in NONFINITE:
        return NONFINITE[value]
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def decode_record(record: dict) -> dict:
    """A parsed metrics.jsonl record with ``"nan"``/``"inf"``/``"-inf"`` back as floats (null stays None)."""
    return {k: _decode(v) for k, v in record.items()}


def end_record(status: str, step: int, epoch: int | None, error: BaseException | None = None) -> dict:
    """The ``end`` record; `error` is described by type, message and its last traceback frame."""
    if status not in END_STATUSES:
        raise RunFolderError(f"end record: status must be one of {END_STATUSES}, got {status!r}")
    exc = None
    if error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else None
        exc = {"type": type(error).__name__, "message": str(error), "where": where}
    return {"kind": "end", "status": status, "step": step, "epoch": epoch, "exception": exc}


# ----------------------------------------------------------------------------- the writer
class RunWriter:
    """Writes one run folder: records to metrics.jsonl (one line each, flushed), config.yaml, train.log.

    Args:
        out_dir: the run folder (created when missing).
        resume: continue a run already in the folder; without it a folder whose metrics.jsonl holds records is
            refused (`RunFolderError` naming the file), so that two runs never share one log.

    The metrics file opens on the first record (or `open`) and closes with `close` (also a context manager);
    writing after `close` opens it again, appending.
    """

    def __init__(self, out_dir: str | Path, *, resume: bool = False):
        self.out_dir = Path(out_dir)
        if not resume and self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            raise RunFolderError(f"{self.metrics_path} already holds a run; resume it or write to another folder")
        self._file = None

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def config_path(self) -> Path:
        return self.out_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_FILE

    def checkpoint_path(self, which: str) -> Path:
        """``last`` or ``best``: where the trainer's checkpoint of that name goes."""
        names = {"last": LAST_CHECKPOINT, "best": BEST_CHECKPOINT}
        if which not in names:
            raise RunFolderError(f"checkpoint name must be one of {sorted(names)}, got {which!r}")
        return self.out_dir / names[which]

    def open(self) -> RunWriter:
        if self._file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.metrics_path, "a", encoding="utf-8")
        return self

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def write(self, record: Mapping[str, Any]) -> dict:
        """Append one record (its ``kind`` one of `RECORD_KINDS`); returns it as written."""
        kind = record.get("kind")
        if kind not in RECORD_KINDS:
            raise RunFolderError(f"{self.metrics_path}: record kind must be one of {RECORD_KINDS}, got {kind!r}")
        line = encode_record(record)
        self.open()
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()
        return line

    def write_end(self, status: str, step: int, epoch: int | None, error: BaseException | None = None) -> dict:
        """The ``end`` record (see `end_record`), written and returned."""
        return self.write(end_record(status, step, epoch, error))

    def write_config(self, config: Mapping[str, Any]) -> None:
        """config.yaml, replaced whole (written to a temporary file, then renamed)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_name(CONFIG_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(dict(config), f, sort_keys=False)
        os.replace(tmp, self.config_path)

    def log(self, message: str) -> None:
        """Append a line to train.log."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(message + "\n")


# ----------------------------------------------------------------------------- resume
def metrics_size(out_dir: str | Path | None) -> int:
    """Bytes of metrics.jsonl now (0 without a run folder or file): what a checkpoint remembers."""
    if out_dir is None:
        return 0
    p = Path(out_dir) / METRICS_FILE
    return p.stat().st_size if p.exists() else 0


def truncate_metrics(out_dir: str | Path, size: int) -> None:
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
