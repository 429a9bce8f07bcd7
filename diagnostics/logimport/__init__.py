"""Import a training log of any shape into the `RunLog` the doctor, the plots and the run explorer take.

`import_log(path)` reads a `dcal` run folder or ``metrics.jsonl`` (as `load_run`); the ecosystem's own
formats with a native reader each — Hugging Face ``trainer_state.json`` (`hf`), Lightning's ``metrics.csv``
(`lightning`), timm's ``summary.csv`` and DeiT/MAE/BEiT ``log.txt`` (`deit`), OpenMMLab text logs and
``scalars.json`` (`mmengine`), Keras' CSVLogger and ``fit`` output (`keras`), notebook output and
TensorBoard event files; and, as the fallback, any other JSON-lines file, CSV or plain-text log (`text.py`
says which shapes). `detect_format` says how a format is recognised; ``LogSource.format`` names it. Labels become this project's run-record names through a table of aliases
(`aliases.METRIC_ALIASES`); ``mapping`` names what the table does not know. Everything that was
normalised, left out or could not be read is in ``RunLog.source`` (notes, unrecognised labels, problems
with their line), and how the run ended (a traceback, a CUDA OOM) in ``RunLog.end``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..runlog import METRICS_FILE, RunLog, RunLogError, load_run
from .aliases import CANONICAL_NAMES, EVAL_NAMES, METRIC_ALIASES, STEP_NAMES, parse_mapping
from .build import LogImportError, LogReaderFailure, to_runlog
from .crash import exception_kind, parse_oom
from .deit import is_deit_record, is_timm_summary_header, read_deit_log, read_timm_summary
from .hf import is_hf_trainer_state, read_hf_trainer_state
from .keras import is_keras_header, is_keras_stdout, read_keras_csv, read_keras_stdout
from .lightning import is_lightning_header, read_lightning_csv
from .mmengine import is_mmengine_scalars, is_mmengine_text, read_mmengine_scalars, read_mmengine_text
from .tables import read_csv, read_json_rows
from .tensorboard import event_files, read_tensorboard
from .text import read_text

__all__ = ["import_log", "detect_format", "FORMATS", "FORMAT_NAMES", "READERS", "LogImportError", "LogReaderFailure", "parse_mapping", "parse_oom",
           "exception_kind", "CANONICAL_NAMES", "STEP_NAMES", "EVAL_NAMES", "METRIC_ALIASES"]

# The formats `import_log` reads ("auto": chosen by the folder's content, the name and the first lines). The
# generic ones (jsonl, csv, text) are the fallback for a log no native reader recognises.
FORMATS = ("auto", "run", "hf-trainer-state", "lightning-csv", "timm-summary", "deit-log", "mmengine-text",
           "mmengine-scalars", "keras-csv", "keras-stdout", "notebook", "tensorboard", "jsonl", "csv", "text")
# What each format is, in words (the report's "read as" line).
FORMAT_NAMES = {"run": "a dcal run folder", "hf-trainer-state": "Hugging Face Trainer trainer_state.json",
                "lightning-csv": "PyTorch Lightning CSVLogger metrics.csv", "timm-summary": "timm summary.csv",
                "deit-log": "DeiT/MAE/BEiT log.txt (JSON lines)", "mmengine-text": "OpenMMLab mmengine text log",
                "mmengine-scalars": "OpenMMLab mmengine vis_data/scalars.json", "keras-csv": "Keras CSVLogger CSV",
                "keras-stdout": "Keras fit output", "notebook": "notebook output (IPython)",
                "tensorboard": "TensorBoard event file", "jsonl": "JSON lines, generic reader",
                "csv": "CSV, generic reader", "text": "text log, generic reader"}
# The reader that reads each format (named in the one-line message of an internal failure).
READERS = {"run": "diagnostics.runlog.load_run", "hf-trainer-state": "logimport.hf",
           "lightning-csv": "logimport.lightning", "timm-summary": "logimport.deit (timm summary.csv)",
           "deit-log": "logimport.deit", "mmengine-text": "logimport.mmengine", "mmengine-scalars": "logimport.mmengine",
           "keras-csv": "logimport.keras", "keras-stdout": "logimport.keras (text reader)",
           "notebook": "logimport.text (notebook output)", "tensorboard": "logimport.tensorboard",
           "jsonl": "logimport.tables", "csv": "logimport.tables", "text": "logimport.text"}
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


def _first_object(lines: list[str]) -> dict | None:
    for line in lines:
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


def _csv_header(head: str) -> list[str]:
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    return [c.strip().strip('"') for c in first.split(",")]


def detect_format(path: str | Path) -> str:
    """The format `import_log` would read `path` as (one of `FORMATS` but "auto"), by content and name:

    a folder with metrics.jsonl → run; ``*tfevents*`` → tensorboard; one JSON object with ``log_history`` →
    hf-trainer-state; JSON lines with ``kind`` → run, with ``train_*``/``test_*`` and ``epoch`` → deit-log,
    with ``step`` and ``data_time`` or ``a/b`` keys → mmengine-scalars, else jsonl; a CSV with ``epoch``,
    ``step`` and ``*_step``/``*_epoch`` (or ``val_*``) columns → lightning-csv, with ``eval_top1`` (or ``train_loss`` and
    ``eval_loss``) → timm-summary, with ``loss`` and ``val_*`` and no ``step`` → keras-csv, else csv; text with
    ``Epoch(train) [`` / ``Iter(val) [`` → mmengine-text, with ``Epoch k/N`` and Keras progress → keras-stdout,
    with ANSI colour codes or an IPython traceback → notebook, else text.

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
    lines = head.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first.lstrip().startswith("{") and not _is_json(first):
        if is_hf_trainer_state(_read_text_file(p)):
            return "hf-trainer-state"
    if p.suffix.lower() in (".jsonl", ".ndjson", ".json") or (first.lstrip().startswith("{") and _is_json(first)):
        if _is_run_jsonl(lines):
            return "run"
        obj = _first_object(lines)
        if obj is not None and isinstance(obj.get("log_history"), list):  # a trainer_state.json on one line
            return "hf-trainer-state"
        if obj is not None and is_deit_record(obj):
            return "deit-log"
        if obj is not None and is_mmengine_scalars(obj):
            return "mmengine-scalars"
        return "jsonl"
    if p.suffix.lower() in (".csv", ".tsv"):
        header = _csv_header(head)
        if is_lightning_header(header, p.name):
            return "lightning-csv"
        if is_timm_summary_header(header):
            return "timm-summary"
        if is_keras_header(header):
            return "keras-csv"
        return "csv"
    if is_mmengine_text(head):
        return "mmengine-text"
    if is_keras_stdout(head):
        return "keras-stdout"
    if re.search(r"\x1b\[[0-9;]*m|^\w+\s+Traceback \(most recent call last\)|^Cell In ?\[", head, re.M):
        return "notebook"
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
        LogReaderFailure: a reader failed on this file (a fault of the reader, not of the log): the message
            names the file, the format and the reader.
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
    try:
        if fmt == "run":
            return _run(p, num_classes, steps_per_epoch)
        reading = _read(p, fmt, user_map)
        return to_runlog(reading, p, fmt, num_classes=num_classes, steps_per_epoch=steps_per_epoch)
    except (LogImportError, RunLogError, FileNotFoundError):
        raise
    except ValueError as e:  # the readers' own refusals ("not a trainer_state.json")
        raise LogImportError(str(e)) from e
    except Exception as e:  # a fault in a reader, not in the log: say which, in one line
        raise LogReaderFailure(p, fmt, READERS.get(fmt, fmt), e) from e


def _read(p: Path, fmt: str, user_map: dict):
    if fmt == "tensorboard":
        return read_tensorboard(p, user_map)
    if p.is_dir():
        raise LogImportError(f"{p} is a folder; --format {fmt} reads a file")
    csv_readers = {"csv": read_csv, "lightning-csv": read_lightning_csv, "timm-summary": read_timm_summary,
                   "keras-csv": read_keras_csv}
    if fmt in csv_readers:
        return csv_readers[fmt](p, user_map)
    text = _read_text_file(p)
    if fmt == "hf-trainer-state":
        return read_hf_trainer_state(p, text, user_map)
    if fmt == "jsonl":
        return read_json_rows(p, text.splitlines(), user_map)
    if fmt == "deit-log":
        return read_deit_log(p, text.splitlines(), user_map)
    if fmt == "mmengine-scalars":
        return read_mmengine_scalars(p, text.splitlines(), user_map)
    if fmt == "mmengine-text":
        return read_mmengine_text(text, user_map)
    if fmt == "keras-stdout":
        return read_keras_stdout(text, user_map)
    return read_text(text, user_map, fmt=fmt)


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
