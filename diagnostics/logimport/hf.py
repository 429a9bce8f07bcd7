"""Hugging Face `Trainer`'s ``trainer_state.json``: one JSON object whose ``log_history`` is a list of records.

A record with ``loss`` (and ``learning_rate``, ``grad_norm``) is a training record at its ``step``; one with
``eval_*`` keys is an evaluation (``eval_accuracy`` → val_acc, ``eval_loss`` → val_loss, through the alias
table: ``eval`` is a validation split word). The last record of a finished ``train()`` holds ``train_runtime``
and ``train_loss`` — the mean loss of the whole run, not a value at its step — so it is read as the
completion mark, not as a metric. ``max_steps`` and ``num_train_epochs`` are the run's stated length. HF's
``epoch`` is fractional (0.48); ``step`` is the index. Throughput and timing keys are not metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

from .reading import Reading
from .tables import rows_to_reading

__all__ = ["read_hf_trainer_state", "is_hf_trainer_state", "NOT_METRICS"]

# Keys of a log_history record that describe speed or size, not training.
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "total_flos", "num_input_tokens_seen")


def is_hf_trainer_state(text: str) -> bool:
    """The text is one JSON object with a ``log_history`` list."""
    if not text.lstrip().startswith("{") or '"log_history"' not in text:
        return False
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("log_history"), list)


def read_hf_trainer_state(path: Path, text: str, mapping: dict | None) -> Reading:
    """Records of ``log_history`` (numbered from 1 in problems and notes); raises ValueError when the file is
    not a trainer_state.json."""
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}); a "
                         "trainer_state.json is one JSON object") from e
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{path}: no 'log_history' list: not a Hugging Face trainer_state.json")
    rows, problems, completed, skipped, markers = [], [], None, set(), []
    for i, rec in enumerate(history, start=1):
        if not isinstance(rec, dict):
            problems.append((i, f"log_history record {i} is a {type(rec).__name__}, not an object"))
            continue
        if "train_runtime" in rec:  # the end-of-train() summary: its train_loss is the run's mean
            completed = i
            if isinstance(rec.get("step"), int):
                markers.append((i, "step", rec["step"]))
            continue
        row = {}
        for k, v in rec.items():
            if k == "epoch" or any(k.endswith(s) for s in NOT_METRICS):
                skipped.add(k)
                continue
            row[k] = v
        rows.append((i, row))
    r = rows_to_reading(rows, "record", mapping)
    r.lines, r.format, r.completed_line = len(history), "hf-trainer-state", completed
    r.markers += markers
    r.problems = problems + r.problems
    for key, name in (("max_steps", "planned_steps"), ("num_train_epochs", "planned_epochs")):
        if isinstance(state.get(key), (int, float)) and not isinstance(state.get(key), bool) and state[key] > 0:
            r.settings[name] = (int(state[key]), f"'{key}'")
    r.notes.append("log_history records are the lines (numbered from 1); the index is 'step' (HF's fractional "
                   "'epoch' is not used)" + (f"; not metrics, left out: {', '.join(sorted(skipped - {'epoch'}))}"
                                             if skipped - {"epoch"} else ""))
    evals = {k for _, row in rows for k in row if k.startswith("eval_")}
    if evals and not any(res == "val_acc" for res in r.recognised.values()):
        r.notes.append(f"no accuracy was logged (evaluation keys: {', '.join(sorted(evals))}); an F1 or other "
                       "score is not read as accuracy, so the accuracy checks (chance-level on accuracy, "
                       "accuracy-collapse) could not run")
    return r
