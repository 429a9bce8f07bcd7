"""DeiT / MAE / BEiT ``log.txt`` (one JSON object per epoch: ``train_*`` and ``test_*`` averages, ``epoch``,
``n_parameters``) and timm's ``summary.csv`` (``epoch,train_loss,eval_loss,eval_top1,eval_top5,lr``).

Both write accuracies in percent (``test_acc1`` 81.8, ``eval_top1`` 81.8): they are divided by 100. A DeiT
variant that evaluates at several resolutions (``test_96_acc1``, ``test_192_acc1``, ``test_384_acc1``) has
one validation accuracy read — the highest resolution's, the model's final output — and the note names it
and the ones left out (``--map val_acc=test_192_acc1`` picks another).
"""
from __future__ import annotations

import re
from pathlib import Path

from .reading import Reading
from .tables import csv_rows, json_objects, rows_to_reading

__all__ = ["read_deit_log", "read_timm_summary", "is_deit_record", "is_timm_summary_header"]

_RES_ACC = re.compile(r"^test_(?P<res>\d+)_(?P<k>acc[15])$")
_PERCENT = re.compile(r"(?:^|_)(?:acc[15]|top[15])$")


def is_deit_record(obj: dict) -> bool:
    return "epoch" in obj and any(k.startswith("train_") for k in obj) and any(
        k.startswith("test_") or k == "n_parameters" for k in obj)


def is_timm_summary_header(columns: list[str]) -> bool:
    cols = set(columns)
    return "epoch" in cols and ("eval_top1" in cols or {"train_loss", "eval_loss"} <= cols)


def _percent(rows: list[tuple[int, dict]], r_notes: list[str]) -> tuple[list[tuple[int, dict]], set]:
    """Accuracy values ÷ 100 (they are percentages); the labels divided."""
    labels, out = set(), []
    for line, row in rows:
        new = {}
        for k, v in row.items():
            if _PERCENT.search(k):
                try:
                    v = float(v) / 100.0
                    labels.add(k)
                except (TypeError, ValueError):
                    pass  # not a number: rows_to_reading reports it with its line
            new[k] = v
        out.append((line, new))
    if labels:
        r_notes.append("accuracies in percent, divided by 100: " + ", ".join(sorted(labels)))
    return out, labels


def read_deit_log(path: Path, lines: list[str], mapping: dict | None) -> Reading:
    rows, problems = json_objects(lines)
    notes = []
    resolutions = sorted({int(m["res"]) for _, row in rows for k in row if (m := _RES_ACC.match(k))})
    user = set((mapping or {}).values())
    if resolutions and not user & {k for _, row in rows for k in row}:
        best = resolutions[-1]
        keep = {f"test_{best}_acc1": "test_acc1", f"test_{best}_acc5": "test_acc5"}
        dropped = sorted({k for _, row in rows for k in row if _RES_ACC.match(k) and k not in keep})
        rows = [(ln, {keep.get(k, k): v for k, v in row.items() if k not in dropped}) for ln, row in rows]
        notes.append(f"accuracy logged at {len(resolutions)} resolutions ({', '.join(map(str, resolutions))} px): "
                     f"test_{best}_acc1 (the highest) is the validation accuracy; left out: {', '.join(dropped)} "
                     "(pick another with --map val_acc=NAME)")
    rows, labels = _percent(rows, notes)
    r = rows_to_reading(rows, "line", mapping)
    r.lines, r.format = len(lines), "deit-log"
    r.problems = problems + r.problems
    r.notes += notes
    return r


def read_timm_summary(path: Path, mapping: dict | None) -> Reading:
    rows, _ = csv_rows(path)
    notes: list[str] = []
    rows, _ = _percent(rows, notes)
    r = rows_to_reading(rows, "row", mapping)
    r.format = "timm-summary"
    r.notes += notes
    return r
