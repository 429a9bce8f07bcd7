"""Import a training log of any shape into the `RunLog` the doctor, the plots and the run explorer take.

`import_log(path)` reads a `dcal` run folder or ``metrics.jsonl`` (as `load_run`), any other JSON-lines
file of metric objects, a CSV, a TensorBoard event file or folder, or a plain-text log (`text.py` says
which shapes). Labels become this project's run-record names through a table of aliases
(`aliases.METRIC_ALIASES`); ``mapping`` names what the table does not know. Everything that was
normalised, left out or could not be read is in ``RunLog.source`` (notes, unrecognised labels, problems
with their line), and how the run ended (a traceback, a CUDA OOM) in ``RunLog.end``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..runlog import METRICS_FILE, RunLog, RunLogError, load_run
from .aliases import CANONICAL_NAMES, EVAL_NAMES, METRIC_ALIASES, STEP_NAMES, parse_mapping
from .build import LogImportError, to_runlog
from .crash import exception_kind, parse_oom
from .tables import read_csv, read_json_rows
from .tensorboard import event_files, read_tensorboard
from .text import read_text

__all__ = ["import_log", "detect_format", "FORMATS", "LogImportError", "parse_mapping", "parse_oom",
           "exception_kind", "CANONICAL_NAMES", "STEP_NAMES", "EVAL_NAMES", "METRIC_ALIASES"]

FORMATS = ("auto", "run", "jsonl", "csv", "tensorboard", "text")
# How much of a file `detect_format` looks at (bytes): enough for a header and a few records.
SNIFF_BYTES = 64 * 1024


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        raise LogImportError(f"{path}: a binary file that is not a TensorBoard event file (its name has no "
                             "'tfevents'); pass --format tensorboard if it is one")
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        return head.decode("latin-1")


def _is_run_jsonl(lines: list[str]) -> bool:
    """A dcal metrics file: its JSON objects carry ``kind`` step/eval/end."""
    for line in lines:
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(obj, dict) and obj.get("kind") in ("step", "eval", "end")
    return False


def _is_json(line: str) -> bool:
    """A JSON object (not a printed Python dict, which a text log may hold: ``{'loss': 0.5}``)."""
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def detect_format(path: str | Path) -> str:
    """The format `import_log` would read `path` as: run, jsonl, csv, tensorboard or text.

    Raises FileNotFoundError for a missing path and `LogImportError` for a folder with nothing to read.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        if (p / METRICS_FILE).is_file():
            return "run"
        if event_files(p):
            return "tensorboard"
        raise LogImportError(f"{p}: a folder with neither {METRICS_FILE} (a dcal run) nor a TensorBoard event "
                             "file (*tfevents*); pass the log file itself")
    if "tfevents" in p.name:
        return "tensorboard"
    head = _sniff(p)
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    if p.suffix.lower() in (".jsonl", ".ndjson", ".json") or (first.lstrip().startswith("{") and _is_json(first)):
        return "run" if _is_run_jsonl(head.splitlines()) else "jsonl"
    if p.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    return "text"


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")


def import_log(path: str | Path, *, format: str = "auto", num_classes: int | None = None,
               mapping=None, steps_per_epoch: float | None = None) -> RunLog:
    """A `RunLog` from any training log.

    Args:
        path: a run folder, a metrics.jsonl or other JSON-lines file, a CSV, a TensorBoard event file or
            folder, or a text log.
        format: "auto" (by the folder's content, the name and the first lines) or one of `FORMATS`.
        num_classes: C, for the chance-level checks (wins over what the log or config says).
        mapping: names the alias table does not know: ``{"val_acc": "Val Top-1"}`` or
            ``["val_acc=Val Top-1", ...]`` (canonical = the log's label).
        steps_per_epoch: optimiser steps per epoch, for a log with one record per epoch (otherwise derived
            from the log when it can be; `RunLog.steps_per_epoch_source` says how).

    Raises:
        FileNotFoundError: `path` does not exist.
        LogImportError: nothing could be read (the message says what was seen), or a bad argument.
        RunLogError: a malformed dcal run file.
    """
    if format not in FORMATS:
        raise LogImportError(f"format must be one of {FORMATS}, got {format!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 2):
        raise LogImportError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if steps_per_epoch is not None and not steps_per_epoch > 0:
        raise LogImportError(f"steps_per_epoch must be > 0, got {steps_per_epoch!r}")
    try:
        user_map = parse_mapping(mapping)
    except ValueError as e:
        raise LogImportError(str(e)) from e
    p = Path(path)
    fmt = detect_format(p) if format == "auto" else format
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if fmt == "run":
        return _run(p, num_classes, steps_per_epoch)
    try:
        reading = _read(p, fmt, user_map)
    except ValueError as e:
        if isinstance(e, (LogImportError, RunLogError)):
            raise
        raise LogImportError(str(e)) from e
    return to_runlog(reading, p, fmt, num_classes=num_classes, steps_per_epoch=steps_per_epoch)


def _read(p: Path, fmt: str, user_map: dict):
    if fmt == "tensorboard":
        return read_tensorboard(p, user_map)
    if p.is_dir():
        raise LogImportError(f"{p} is a folder; --format {fmt} reads a file")
    if fmt == "csv":
        return read_csv(p, user_map)
    text = _read_text_file(p)
    if fmt == "jsonl":
        return read_json_rows(p, text.splitlines(), user_map)
    return read_text(text, user_map)


def _run(p: Path, num_classes: int | None, steps_per_epoch: float | None) -> RunLog:
    log = load_run(p)
    log.num_classes_given = num_classes
    spe = steps_per_epoch
    if spe is None:
        from ..runlog import config_get

        spe = config_get(log.config, "derived", "steps_per_epoch")
        source = "config derived.steps_per_epoch" if spe else None
    else:
        source = "given (--steps-per-epoch)"
    log.steps_per_epoch, log.steps_per_epoch_source = (float(spe), source) if spe else (None, None)
    return log
