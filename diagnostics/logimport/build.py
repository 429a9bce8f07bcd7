"""A `Reading` (from any format) → the `RunLog` the doctor, the plots and the run explorer take: records
with a ``step`` index, accuracies on a 0–1 scale, how the run ended, and optimiser steps per epoch."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..runlog import LogSource, RunEnd, RunLog, frames_from_records
from .aliases import is_guess
from .crash import exception_kind
from .reading import Reading

__all__ = ["to_runlog", "LogImportError", "LogReaderFailure"]

# An accuracy column whose largest value is above 1 (and at most 100) is on a 0–100 scale: a fraction
# cannot exceed 1. Above 100 it is neither, and is reported.
PERCENT_SCALE_MAX = 100.0


class LogImportError(ValueError):
    """A log that cannot be imported: the message names the file, the format and why (and what was seen)."""


class LogReaderFailure(RuntimeError):
    """A reader failed on a file (a fault of the reader, not of the log): ``path``, ``format``, ``reader`` and
    the ``error`` it raised; the message is one line naming them (``dcal doctor`` prints it and exits 3)."""

    def __init__(self, path, format: str, reader: str, error: BaseException):
        self.path, self.format, self.reader, self.error = path, format, reader, error
        super().__init__(f"{path}: internal failure of the {reader} reader (format {format}): "
                         f"{type(error).__name__}: {error}")


def _unit(r: Reading) -> str:
    if r.has_step_markers:
        return "step"
    if r.has_epoch_markers:
        return "epoch"
    return "record"


def _records(r: Reading, unit: str) -> list[dict]:
    out, unindexed = [], []
    for (is_eval, epoch, step), values in r.records.items():
        if unit == "epoch":
            index = epoch
        elif unit == "step":
            index = step
        else:
            index = -step if step is not None and step < 0 else step
        if index is None or (unit != "record" and index is not None and index < 0):
            # values before the log's first epoch/step marker (e.g. a progress bar ahead of "Epoch 1:"):
            # they have no place on the run's axis
            unindexed += [line for _, line in values.values() if line is not None]
            continue
        rec = {"kind": "eval" if is_eval else "step", "step": index}
        if epoch is not None:
            rec["epoch"] = epoch
        rec.update({k: v for k, (v, _) in values.items()})
        bad = [k for k, (v, _) in values.items() if not math.isfinite(v)]
        if bad:
            rec["nonfinite"] = bad  # as the trainer marks a step: the log wrote nan/inf here
        out.append(rec)
    if unindexed:
        r.notes.append(f"{len(unindexed)} values before the first {unit} marker (lines {min(unindexed)}–"
                       f"{max(unindexed)}) were left out: they belong to no {unit}")
    return sorted(out, key=lambda x: (x["step"], x["kind"] == "eval"))


def _normalise_percent(records: list[dict], r: Reading) -> list[str]:
    """Accuracy columns on a 0–100 scale → 0–1 (in place); the notes that say so."""
    notes = []
    if r.percent_labels:
        notes.append("read as percentages and divided by 100: " + ", ".join(sorted(r.percent_labels)))
    columns = {k for rec in records for k in rec if "acc" in k}
    for col in sorted(columns):
        values = [rec[col] for rec in records if isinstance(rec.get(col), float) and math.isfinite(rec[col])]
        if not values or max(values) <= 1.0:
            continue
        if max(values) > PERCENT_SCALE_MAX:
            r.problems.append((None, f"{col}: values up to {max(values):g} are neither fractions nor percentages"))
            continue
        for rec in records:
            if col in rec:
                rec[col] = rec[col] / 100.0
        notes.append(f"{col} is on a 0–100 scale (largest value {max(values):g} > 1): divided by 100")
    return notes


def _at_line(markers: list, line: int, kind: str) -> int | None:
    """The last epoch (or step) marker at or before `line`."""
    seen = [n for ln, k, n in markers if k == kind and ln is not None and ln <= line]
    return seen[-1] if seen else None


def _end(r: Reading) -> tuple[RunEnd | None, list[str]]:
    """How the run ended: the last traceback (or bare exception line) with no metric after it."""
    notes = []
    candidates = [(tb.line or tb.start, tb) for tb in r.tracebacks]
    candidates += [(ln, (t, msg)) for ln, t, msg in r.exception_lines]
    candidates.sort(key=lambda c: c[0])
    for line, item in candidates:
        if line <= r.last_metric_line:
            text = f"{item.type}: {item.message}" if not isinstance(item, tuple) else f"{item[0]}: {item[1]}"
            notes.append(f"line {line}: an exception in the middle of the log ({text[:120]}); the run went on")
    late = [c for c in candidates if c[0] > r.last_metric_line]
    if r.completed_line is not None and not [c for c in late if c[0] > r.completed_line]:
        epochs = [k[1] for k in r.records if k[1] is not None]
        steps = [k[2] for k in r.records if k[2] is not None and k[2] >= 0]
        steps += [n for _, kind, n in r.markers if kind == "step"]  # HF's final summary names the last step
        return RunEnd(status="completed", epoch=max(epochs, default=None), line=r.completed_line,
                      step=max(steps, default=None) if r.has_step_markers else None), notes
    if not late:
        return None, notes
    line, item = late[-1]
    if isinstance(item, tuple):
        exc, start, context = {"type": item[0], "message": item[1], "where": None}, line, {}
    else:
        exc, start = item.as_exception(), item.start
        context = {"frames": item.frames, "user_where": item.user_where, "traceback_line": item.start}
    context["kind"] = exception_kind(exc["type"], exc["message"])
    bars = [p for p in r.progress if p["line"] < start]
    if bars:
        last = bars[-1]
        context["progress"] = [last["n"], last["total"]]
        context["progress_desc"] = last["desc"]
        earlier = [p for p in bars[:-1] if p["epoch"] != last["epoch"] or p["kind"] == "eval"]
        context["after_eval"] = bool(earlier and earlier[-1]["kind"] == "eval" and last["n"] == 0)
    if not context.get("after_eval"):
        context["after_eval"] = r.last_eval_line > r.last_train_line > 0
    return RunEnd(status="crashed", step=_at_line(r.markers, start, "step") if r.has_step_markers else None,
                  epoch=_at_line(r.markers, start, "epoch"), exception=exc, line=line, context=context), notes


def _setting(r: Reading, name: str) -> float | None:
    v = r.settings.get(name)
    return float(v[0]) if v else None


def _steps_per_epoch(r: Reading, given: float | None) -> tuple[float | None, str | None]:
    """Optimiser steps per epoch: given > stated in the log > progress-bar totals ÷ accumulation >
    training samples ÷ effective batch; with the sentence that says where the number came from."""
    if given is not None:
        return float(given), f"{given:g} optimiser steps per epoch (given: --steps-per-epoch)"
    stated = _setting(r, "steps_per_epoch")
    if stated:
        return stated, f"{stated:g} optimiser steps per epoch (stated in the log, line {r.settings['steps_per_epoch'][1]})"
    accum = _setting(r, "grad_accum_steps")
    how_accum = (f"gradient accumulation {accum:g} (log line {r.settings['grad_accum_steps'][1]})" if accum
                 else "no gradient accumulation (the log states none)")
    totals = Counter(p["total"] for p in r.progress if p["kind"] == "train" and p["total"] > 0)
    if totals:
        total, count = totals.most_common(1)[0]
        spe = total / (accum or 1.0)
        return spe, (f"{spe:g} optimiser steps per epoch = {total} batches per epoch (the training progress "
                     f"bars, {count} of them) ÷ {how_accum}")
    samples, batch = _setting(r, "train_samples"), _setting(r, "global_batch")
    if samples and not batch and _setting(r, "batch_size"):
        batch = _setting(r, "batch_size") * (accum or 1.0)
    if samples and batch:
        spe = samples / batch
        return spe, f"{spe:g} optimiser steps per epoch = {samples:g} training samples ÷ batch {batch:g} (log)"
    return None, None


def to_runlog(r: Reading, path: Path, fmt: str, *, num_classes: int | None = None,
              steps_per_epoch: float | None = None) -> RunLog:
    """The `RunLog` of a reading. Raises `LogImportError` when it holds no metric and no crash."""
    unit = _unit(r)
    records = _records(r, unit)
    notes = list(r.notes) + _normalise_percent(records, r)
    guessed = [label for label, name in r.recognised.items() if name == "val_acc" and is_guess(label)]
    if guessed:
        notes.append(f"{', '.join(repr(g) for g in guessed)} read as the validation accuracy: the log names it only "
                     "a validation metric/score, the only one it logs; if it is not an accuracy, the accuracy "
                     "findings do not apply (--map val_acc=NAME names the accuracy)")
    end, end_notes = _end(r)
    notes += end_notes
    if not records and end is None:
        seen = ", ".join(f"{k!r} (line {v})" for k, v in list(r.unrecognised.items())[:12]) or "none"
        raise LogImportError(
            f"{path}: no metric could be read as a {r.format or fmt} log ({r.lines} {r.unit}s; labels seen but not "
            f"recognised: {seen}"
            + (f"; could not read: line {r.problems[0][0]}: {r.problems[0][1]}" if r.problems else "")
            + ")" + (". Name them with --map CANONICAL=NAME (Python: mapping=), or pick the format with --format"
                     if r.unrecognised else ": the log holds no metric (no training happened in it, or it was "
                     "written in a shape no reader knows: pick the format with --format)"))
    steps, evals = frames_from_records(records)
    if unit == "record":
        notes.append("no epoch or step marker in the log: records are numbered in the order they appear")
    spe, spe_source = _steps_per_epoch(r, steps_per_epoch)
    settings = {k: v[0] for k, v in r.settings.items()}
    source = LogSource(format=r.format or fmt, path=path, lines=r.lines, recognised=dict(r.recognised),
                       unrecognised=dict(r.unrecognised), problems=list(r.problems), notes=notes, settings=settings)
    if r.problems:
        lines = sorted({ln for ln, _ in r.problems if ln is not None})
        source.notes.append(f"{len(r.problems)} values or {r.unit}s could not be read"
                            + (f" ({r.unit}s {', '.join(map(str, lines[:8]))}{', ...' if len(lines) > 8 else ''})"
                               if lines else "") + "; each is listed with why")
    if r.prose_lines:
        source.notes.append(f"{r.prose_lines} {r.unit}s held no value that was read (prose, or only labels not "
                            "recognised)")
    log = RunLog(path=path, steps=steps, evals=evals, config=None, end=end, source=source, step_unit=unit,
                 steps_per_epoch=spe, steps_per_epoch_source=spe_source,
                 num_classes_given=num_classes)
    _check_finite_index(log)
    return log


def _check_finite_index(log: RunLog) -> None:
    for df in (log.steps, log.evals):
        if "step" in df.columns and len(df) and not np.isfinite(df["step"].to_numpy(dtype=float)).all():
            raise LogImportError(f"{log.path}: a record has no usable step or epoch index")
