"""Keras: `CSVLogger`'s CSV and the console output of ``model.fit``.

CSV: ``epoch,accuracy,loss,val_accuracy,val_loss[,lr]`` (or the same without ``epoch``, as some tools write
it). Each row is an epoch; without an ``epoch`` column the rows are numbered 0, 1, ... as `CSVLogger` numbers
them, and a note says so. ``val_*`` are the validation values of that epoch.

``fit`` stdout (``Epoch 3/26`` then ``485/485 ━━━━ 48s 98ms/step - accuracy: 0.99 - loss: 0.004 - val_accuracy:
...``): read by the text reader (`text.py`), which takes the ``Epoch k/N`` markers (N: the planned epochs),
the ``name: value`` pairs of the epoch's last progress line, and ``Epoch 26: early stopping`` as the
completion line.
"""
from __future__ import annotations

import re
from pathlib import Path

from .reading import Reading
from .tables import csv_rows, rows_to_reading
from .text import read_text

__all__ = ["read_keras_csv", "read_keras_stdout", "is_keras_header", "is_keras_stdout"]


def is_keras_header(columns: list[str]) -> bool:
    cols = set(columns)
    return "step" not in cols and "loss" in cols and any(c.startswith("val_") for c in cols)


def is_keras_stdout(head: str) -> bool:
    return bool(re.search(r"^Epoch \d+/\d+\s*$", head, re.M)) and bool(
        re.search(r"\d+/\d+ (?:\[[=>.]|━)|\s- (?:loss|accuracy|acc): ", head))


def read_keras_csv(path: Path, mapping: dict | None) -> Reading:
    rows, columns = csv_rows(path)
    numbered = "epoch" not in columns
    rows = [(line, ({"epoch": str(i)} if numbered else {}) | rec) for i, (line, rec) in enumerate(rows)]
    r = rows_to_reading(rows, "row", mapping)
    r.format = "keras-csv"
    r.notes.append("each row is an epoch" + (" (no epoch column: rows numbered from 0, as Keras' CSVLogger numbers "
                                             "epochs)" if numbered else ""))
    return r


def read_keras_stdout(text: str, mapping: dict | None) -> Reading:
    return read_text(text, mapping, fmt="keras-stdout")
