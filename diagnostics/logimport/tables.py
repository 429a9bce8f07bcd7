"""Tables of metrics: CSV (one row per epoch or step, as pandas' `read_csv` reads it) and JSON lines that
are not a `dcal` run record (one object per line; nested objects flattened with ``/``). A column is a
label: resolved through the alias table, an ``epoch``/``step`` column is the index. A row holding both
training and validation values becomes a step record and an eval record at the same index."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from .aliases import resolve, resolve_index, resolve_setting
from .reading import Reading

__all__ = ["read_csv", "read_json_rows", "rows_to_reading"]

_NUMBER = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf(?:inity)?)\s*(%?)\s*$",
                     re.I)


def _value(raw) -> tuple[float | None, bool, str | None]:
    """(value, is_percent, why-not) of a cell: numbers pass, "15.38%" is 0.1538, empty is None."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None, False, None
    if isinstance(raw, bool):
        return None, False, f"{raw!r} is a boolean, not a number"
    if isinstance(raw, (int, float)):
        return float(raw), False, None
    text = str(raw)
    if not text.strip():
        return None, False, None
    m = _NUMBER.match(text)
    if not m:
        return None, False, f"{text[:40]!r} is not a number"
    v = float(m.group(1))
    return (v / 100.0, True, None) if m.group(2) else (v, False, None)


def rows_to_reading(rows: list[tuple[int, dict]], unit: str, mapping: dict | None) -> Reading:
    """Rows (line or row number, {label: cell}) → a `Reading`."""
    r = Reading(lines=len(rows), unit=unit)
    labels: dict[str, object] = {}
    for _, row in rows:
        for label in row:
            if label not in labels:
                labels[label] = resolve_index(label) or resolve(label, None, mapping) or resolve_setting(label)
    index = {v: k for k, v in labels.items() if v in ("epoch", "step")}
    r.has_epoch_markers, r.has_step_markers = "epoch" in index, "step" in index
    for lineno, row in rows:
        idx = {}
        for kind, label in index.items():
            v, _, why = _value(row.get(label))
            if why:
                r.problems.append((lineno, f"column {label!r}: {why}"))
            idx[kind] = int(v) if v is not None and math.isfinite(v) else None
        if not index:
            idx["step"] = -lineno  # no index column: rows in order
        for label, cell in row.items():
            res = labels[label]
            if res in ("epoch", "step"):
                continue
            if res is None:
                if _value(cell)[0] is not None:
                    r.unrecognised.setdefault(label, lineno)
                continue
            v, percent, why = _value(cell)
            if why:
                r.problems.append((lineno, f"column {label!r}: {why}"))
                continue
            if v is None:
                continue
            if isinstance(res, str):  # a run setting (num_classes, batch_size, ...) given per row
                r.settings.setdefault(res, (v, lineno))
                continue
            if percent or res.percent:
                v = v / 100.0 if res.percent and not percent else v
                r.percent_labels.add(label)
            r.recognised.setdefault(label, res.name)
            key = (res.eval, idx.get("epoch"), idx.get("step"))
            r.records.setdefault(key, {})[res.name] = (v * res.scale, lineno)
            r.last_metric_line = lineno
    return r


def csv_rows(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """A CSV (or TSV, by its extension) with a header line: its rows as (file line, {column: text}) and its
    column names, stripped; cells stay text (empty where a sparse logger left them blank)."""
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as CSV ({e})") from e
    rows = [(i + 2, {str(k).strip(): v for k, v in rec.items()}) for i, rec in enumerate(df.to_dict("records"))]
    return rows, [str(c).strip() for c in df.columns]


def read_csv(path: Path, mapping: dict | None) -> Reading:
    """Rows of a CSV (or TSV, by its extension) with a header line."""
    return rows_to_reading(csv_rows(path)[0], "row", mapping)


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out


def json_objects(lines: list[str]) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """The JSON objects of a JSON-lines file as (line number, object); a line that is malformed JSON or not an
    object is a problem (line number, why). Blank lines are skipped."""
    objects, problems = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((i, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            problems.append((i, f"a JSON {type(obj).__name__}, not an object"))
            continue
        objects.append((i, obj))
    return objects, problems


def read_json_rows(path: Path, lines: list[str], mapping: dict | None) -> Reading:
    """Rows of a JSON-lines file of metric objects; a malformed line is a problem (line number and why)."""
    objects, problems = json_objects(lines)
    rows = [(i, _flatten(obj)) for i, obj in objects]
    if not rows and problems:
        try:
            whole = json.loads("\n".join(lines))
        except json.JSONDecodeError:
            whole = None
        if whole is not None:
            raise ValueError(f"{path}: one JSON document (a JSON {type(whole).__name__}), not JSON lines of metric "
                             "records, and not a Hugging Face trainer_state.json (it has no 'log_history' list)")
    r = rows_to_reading(rows, "line", mapping)
    r.lines = len(lines)
    r.problems = problems + r.problems
    return r
