"""Reading a run folder: `metrics.jsonl` (step and eval records) and, when present, `config.yaml`.

The trainer writes one JSON object per line: ``{"kind": "step", ...}`` per optimiser step and
``{"kind": "eval", ...}`` per evaluation, and a run that ends (completed or crashed) a last
``{"kind": "end", "status": "completed"|"crashed", "step", "epoch", "exception": null|{"type", "message",
"where"}}`` (read into `RunLog.end`). The layout, the record kinds and the encoding are `dcal.runfolder`'s
(the writer's): a field that does not apply is ``null`` (NaN in a float column), a non-finite value the
string ``"nan"``/``"inf"``/``"-inf"`` (read back as that float; older run folders hold ``null`` there, read as
NaN too); extra fields are kept; records of another kind are ignored. A killed run may leave its last line cut
short: that line is dropped with a warning. A malformed line anywhere else is an error naming the file and
the line, since everything after it would be read out of context.
"""
from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from dcal.runfolder import CONFIG_FILE, END_STATUSES, METRICS_FILE, RECORD_KINDS, decode_record

__all__ = ["RunLog", "RunEnd", "LogSource", "RunLogError", "RunLogWarning", "load_run", "read_metrics",
           "frames_from_records", "as_frames", "run_end_from_record", "METRICS_FILE", "CONFIG_FILE", "END_STATUSES"]



class RunLogError(ValueError):
    """A run folder or metrics file that cannot be read; the message names the file (and the line)."""


class RunLogWarning(UserWarning):
    """Something read past (a truncated last line); the message names the file and the line."""


@dataclass
class RunEnd:
    """How a run ended: ``status`` "completed" or "crashed", the last ``step``/``epoch`` it reached, and the
    ``exception`` (``{"type", "message", "where"}``, None when it completed). ``line`` is the log line the
    exception was read from (text logs); ``context`` what the log said just before it (e.g. the last
    progress bar ``{"progress": [0, 1498]}``, ``"after_eval": True``) and, for a traceback, its frames."""

    status: str
    step: int | None = None
    epoch: int | None = None
    exception: dict | None = None
    line: int | None = None
    context: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in END_STATUSES:
            raise ValueError(f"RunEnd.status must be one of {END_STATUSES}, got {self.status!r}")
        if self.exception is not None:
            missing = {"type", "message"} - set(self.exception)
            if missing:
                raise ValueError(f"RunEnd.exception needs the fields type and message; missing {sorted(missing)}")


@dataclass
class LogSource:
    """How a log that is not a run folder was read (`diagnostics.import_log`): the ``format``, the number
    of ``lines`` (or rows/events), which labels became which canonical names (``recognised``), the labels
    left out (``unrecognised``: label → first line), what could not be read (``problems``: (line, why)),
    every normalisation applied (``notes``, e.g. accuracies on a 0–100 scale divided by 100) and the run
    settings the log states (``settings``: batch size, accumulation steps, ...)."""

    format: str
    path: Path
    lines: int = 0
    recognised: dict = field(default_factory=dict)
    unrecognised: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)


@dataclass
class RunLog:
    """One run: its step and eval records, its resolved config (None without config.yaml), and what the
    reader had to skip (`warnings`).

    ``end`` is how the run ended (None when the log does not say); ``source`` how an imported log was read
    (None for a run folder); ``step_unit`` is "step" when ``step`` counts optimiser steps, "epoch" when the
    log has one record per epoch (then ``step`` is the epoch) and "record" when it has no index at all;
    ``steps_per_epoch`` (with ``steps_per_epoch_source``, a sentence) says how many optimiser steps an epoch
    holds when known; ``num_classes_given`` is a number of classes stated by the user (it wins).
    """

    path: Path
    steps: pd.DataFrame
    evals: pd.DataFrame
    config: dict | None = None
    warnings: list[str] = field(default_factory=list)
    end: RunEnd | None = None
    source: LogSource | None = None
    step_unit: str = "step"
    steps_per_epoch: float | None = None
    steps_per_epoch_source: str | None = None
    num_classes_given: int | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def num_classes(self) -> int | None:
        """The user's ``num_classes_given``, else the last eval record's ``num_classes``, else config
        ``derived.num_classes``, else a number of classes the imported log states."""
        if self.num_classes_given is not None:
            return int(self.num_classes_given)
        if "num_classes" in self.evals:
            known = self.evals["num_classes"].dropna()
            if len(known):
                return int(known.iloc[-1])
        value = config_get(self.config, "derived", "num_classes")
        if isinstance(value, numbers.Number) and value > 0:
            return int(value)
        stated = self.source.settings.get("num_classes") if self.source else None
        return int(stated) if isinstance(stated, numbers.Number) and stated >= 2 else None


def config_get(config: dict | None, *keys, default=None):
    """``config[k0][k1]...`` or `default` when any level is missing (or the config is None)."""
    node = config
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def _metrics_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no metrics file: {p} does not exist (a run folder holds {METRICS_FILE})")
    return p


def _parse_lines(path: Path) -> tuple[list[dict], list[str]]:
    """Records from a JSON-lines file; a bad last line is a warning, a bad line elsewhere an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RunLogError(f"{path}: cannot be read ({e})") from e
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, notes = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                notes.append(f"{path}:{i + 1}: last line is truncated or malformed ({e.msg}); it was ignored "
                             "(the run was probably killed while writing it)")
                continue
            raise RunLogError(f"{path}:{i + 1}: malformed JSON ({e.msg} at column {e.colno}): "
                              f"{line[:80]!r}") from e
        if not isinstance(rec, dict):
            raise RunLogError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        if "kind" not in rec:
            raise RunLogError(f"{path}:{i + 1}: record has no 'kind' field (expected one of {RECORD_KINDS})")
        records.append(decode_record(rec))
    return records, notes


def _is_number(v) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def _frame(records: list[dict]) -> pd.DataFrame:
    """Records → DataFrame: numeric fields as float (null → NaN), `step`/`epoch` as int when complete."""
    df = pd.DataFrame.from_records([{k: v for k, v in r.items() if k != "kind"} for r in records])
    for col in df.columns:
        values = [v for v in df[col].tolist() if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if all(_is_number(v) for v in values):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("step", "epoch"):
        if col in df and len(df) and df[col].notna().all() and (df[col] % 1 == 0).all():
            df[col] = df[col].astype("int64")
    return df


def frames_from_records(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, evals) from a list of records as metrics.jsonl holds them (other kinds are ignored)."""
    if not isinstance(records, (list, tuple)):
        raise TypeError(f"expected a list of records (dicts), got {type(records).__name__}")
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise TypeError(f"record {bad[0]} is a {type(records[bad[0]]).__name__}, not a dict")
    steps = _frame([r for r in records if r.get("kind") == "step"])
    evals = _frame([r for r in records if r.get("kind") == "eval"])
    return steps, evals


def read_metrics(path_or_run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, evals) DataFrames from a run folder or a metrics.jsonl path.

    A truncated last line is dropped with a `RunLogWarning`; a malformed line elsewhere raises
    `RunLogError` naming the file and line; a missing file raises `FileNotFoundError`.
    """
    path = _metrics_path(path_or_run_dir)
    records, notes = _parse_lines(path)
    for note in notes:
        warnings.warn(note, RunLogWarning, stacklevel=2)
    return frames_from_records(records)


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunLogError(f"{path}: cannot be parsed as YAML ({e})") from e
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise RunLogError(f"{path}: expected a mapping of sections, got {type(cfg).__name__}")
    return cfg


def run_end_from_record(record: dict, where: str) -> RunEnd:
    """A `RunEnd` from an ``{"kind": "end", ...}`` record; `where` (file:line) names it in errors."""
    status = record.get("status")
    if status not in END_STATUSES:
        raise RunLogError(f"{where}: end record status must be one of {END_STATUSES}, got {status!r}")
    exc = record.get("exception")
    if exc is not None and (not isinstance(exc, dict) or not {"type", "message"} <= set(exc)):
        raise RunLogError(f"{where}: end record exception must be null or an object with type, message (and "
                          f"where), got {exc!r}")
    if status == "crashed" and exc is None:
        raise RunLogError(f"{where}: end record says 'crashed' but holds no exception")
    step, epoch = record.get("step"), record.get("epoch")
    return RunEnd(status=status, step=step if _is_number(step) else None,
                  epoch=epoch if _is_number(epoch) else None, exception=exc)


def _run_end(records: list[dict], path: Path) -> RunEnd | None:
    """The last end record (a resumed run appends after an earlier end; the last one is how it ended)."""
    ends = [i for i, r in enumerate(records) if r.get("kind") == "end"]
    if not ends:
        return None
    i = ends[-1]
    if any(r.get("kind") in ("step", "eval") for r in records[i + 1:]):
        return None  # the run was resumed after that end: it has not ended yet
    return run_end_from_record(records[i], f"{path} (end record {len(ends)})")


def load_run(run_dir: str | Path) -> RunLog:
    """A `RunLog` from a run folder (or its metrics.jsonl): records, config (None when absent), warnings,
    and how the run ended (`RunLog.end`, from its end record; None when there is none).

    Raises `FileNotFoundError` when there is no metrics file, `RunLogError` when a file is malformed.
    """
    metrics = _metrics_path(run_dir)
    records, notes = _parse_lines(metrics)
    steps, evals = frames_from_records(records)
    config = _read_config(metrics.parent / CONFIG_FILE)
    return RunLog(path=metrics.parent, steps=steps, evals=evals, config=config, warnings=notes,
                  end=_run_end(records, metrics))


def as_frames(data) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, evals) from what the plotting helpers accept: a `RunLog`, a list of records, a dict
    ``{"steps": df, "evals": df}`` or a (steps, evals) tuple. A lone DataFrame is taken as the step
    records."""
    if isinstance(data, RunLog):
        return data.steps, data.evals
    if isinstance(data, pd.DataFrame):
        return data, pd.DataFrame()
    if isinstance(data, dict):
        unknown = set(data) - {"steps", "evals"}
        if unknown:
            raise TypeError(f"a dict of frames takes the keys 'steps' and 'evals', got {sorted(unknown)}")
        return data.get("steps", pd.DataFrame()), data.get("evals", pd.DataFrame())
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, pd.DataFrame) for d in data):
        return data
    if isinstance(data, list):
        return frames_from_records(data)
    raise TypeError("expected a RunLog, a DataFrame of step records, a (steps, evals) tuple, a dict "
                    f"{{'steps', 'evals'}} or a list of records; got {type(data).__name__}")
