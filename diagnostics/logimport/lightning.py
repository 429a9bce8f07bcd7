"""PyTorch Lightning's `CSVLogger` ``metrics.csv``: a header of every name logged, one sparse row per
``log`` call (a step row holds the ``*_step`` values, an epoch-end row the ``*_epoch`` and ``val_*`` ones),
with ``epoch`` and ``step`` columns.

- ``name_step`` / ``name_epoch`` (``on_step=True, on_epoch=True``) are kept apart: the per-step values are the
  step records; the epoch means are left out when per-step values exist (mixing them would put a mean among
  the raw values), and used as the step records at the epoch's last step when they are all there is.
- ``val_*`` / ``test_*`` / ``valid_*`` are evaluations at their row's step.
- ``lr-Adam`` (``LearningRateMonitor``; ``lr-AdamW/pg1`` for a second group) is the learning rate of the first
  group.
- A name with no split (a bare ``acc``) is decided by the rows it is logged in (`bare_split`): only in rows
  that also hold validation values → validation; only with training values → training; otherwise training,
  and a note says it could not be told.
"""
from __future__ import annotations

import re
from pathlib import Path

from .aliases import SPLIT_WORDS, normalise, resolve, resolve_index
from .reading import Reading
from .tables import csv_rows, rows_to_reading

__all__ = ["read_lightning_csv", "is_lightning_header", "bare_split"]

_LR_MONITOR = re.compile(r"^lr-[A-Za-z]\w*(?:/pg1)?$")


def is_lightning_header(columns: list[str], name: str = "") -> bool:
    """``epoch`` and ``step`` columns, with ``*_step``/``*_epoch``, ``val_*`` or ``lr-*`` ones, or the file's
    name ``metrics.csv`` (CSVLogger's)."""
    cols = set(columns)
    return {"epoch", "step"} <= cols and name == "metrics.csv" or {"epoch", "step"} <= cols and any(c.endswith(("_step", "_epoch")) or c.startswith("val_")
                                             or _LR_MONITOR.match(c) for c in cols)


def _split_of(col: str) -> str | None:
    words = normalise(col).split()
    for w in (words[:1] + words[-1:]) if words else []:
        if w in SPLIT_WORDS:
            return SPLIT_WORDS[w]
    return None


def bare_split(col: str, rows: list[dict]) -> tuple[str, str]:
    """("val"|"train", why) for a column without a split word, from the rows it is logged in."""
    with_val = with_train = 0
    for row in rows:
        if row.get(col) in (None, ""):
            continue
        others = {_split_of(c) for c, v in row.items() if c != col and v not in (None, "") and resolve_index(c) is None}
        with_val += "val" in others
        with_train += "train" in others
    if with_val and not with_train:
        return "val", f"'{col}' is logged only in rows with validation values ({with_val} rows): read as validation"
    if with_train and not with_val:
        return "train", f"'{col}' is logged only in rows with training values ({with_train} rows): read as training"
    return "train", (f"'{col}' names no split and its rows do not tell (with validation values in {with_val}, "
                     f"with training values in {with_train}): read as training")


def read_lightning_csv(path: Path, mapping: dict | None) -> Reading:
    rows, columns = csv_rows(path)
    raw = [rec for _, rec in rows]
    rename, notes = {}, []
    stepwise = {c[: -len("_step")] for c in columns if c.endswith("_step")}
    for c in columns:
        if c.endswith("_step"):
            rename[c] = c[: -len("_step")]
        elif c.endswith("_epoch"):
            base = c[: -len("_epoch")]
            if base in stepwise:
                rename[c] = None
                notes.append(f"'{c}' (the epoch mean of '{base}_step') left out: the per-step values are read")
            else:
                rename[c] = base
        elif _LR_MONITOR.match(c):
            rename[c] = "lr" if not c.endswith("/pg1") else None
        elif (resolve_index(c) is None and _split_of(c) is None and c not in (mapping or {}).values()
              and resolve(c) is not None):
            split, why = bare_split(c, raw)
            if split == "val":
                rename[c] = f"val_{c}"
            notes.append(why)
    rows = []
    for i, rec in enumerate(raw):
        row = {}
        for c, v in rec.items():
            new = rename.get(c, c)
            if new is not None and v != "":
                row[new] = v
        rows.append((i + 2, row))
    r = rows_to_reading(rows, "row", mapping)
    r.format = "lightning-csv"
    original = {new: c for c, new in rename.items() if new is not None}
    r.recognised = {original.get(label, label): name for label, name in r.recognised.items()}
    r.notes += notes
    return r
