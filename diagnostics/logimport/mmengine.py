"""OpenMMLab logs: mmengine's text log (mmpretrain, mmdet, ... 1.x) and its ``vis_data/scalars.json``.

Text: only the runner's metric lines are read — ``Epoch(train) [e][i/n]  lr: ...  loss: ...``,
``Epoch(val) [e][i/n]  accuracy/top1: 73.5751``, ``Iter(train) [i/n]`` and ``Iter(val) [i/n]`` (and mmcv 0.x's
``Epoch [e][i/n]`` training lines). The config dump at the top (``lr=0.1``, ``step=[15]``) is not metrics: only
``max_epochs``/``max_iters`` (the run's stated length) and ``num_classes`` are taken from it. A training line's
step is the global iteration ``(e − 1)·n + i``; a validation at epoch ``e`` sits at ``e·n``. mmpretrain's
``accuracy/top1``/``top5`` are percentages (÷ 100) and validation metrics. ``time``, ``data_time`` and ``eta``
are timings, not read.

scalars.json: one JSON object per logging call. Training records carry ``epoch`` and ``step`` (the global
iteration); validation records carry ``step`` = the epoch number (mmengine's visualiser writes the epoch
there), which is placed at that epoch's last iteration exactly as in the text log.
"""
from __future__ import annotations

import re
from pathlib import Path

from .aliases import resolve
from .crash import EXCEPTION_LINE, TracebackReader
from .reading import Reading
from .tables import json_objects
from .text import COMPLETION, strip_prefix

__all__ = ["read_mmengine_text", "read_mmengine_scalars", "is_mmengine_text", "is_mmengine_scalars"]

_EPOCH_LINE = re.compile(r"Epoch(?:\((?P<mode>train|val|test)\))?\s*\[(?P<e>\d+)\](?:\s*\[\s*(?P<i>\d+)\s*/\s*(?P<n>\d+)\])?"
                         r"(?P<rest>.*)$")
_ITER_LINE = re.compile(r"Iter\((?P<mode>train|val|test)\)\s*\[\s*(?P<i>\d+)\s*/\s*(?P<n>\d+)\](?P<rest>.*)$")
_PAIR = re.compile(r"(?P<name>[A-Za-z_][\w/.\-]*):\s*(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
                   r"(?=[\s,]|$)")  # mmcv 0.x separates its pairs with ", "
_CONFIG = re.compile(r"\b(?P<name>max_epochs|max_iters|num_classes)\s*=\s*(?P<value>\d+)")
TIMINGS = ("time", "data_time", "eta")
_PERCENT = ("accuracy/top1", "accuracy/top5", "accuracy_top-1", "accuracy_top-5")
_SETTING = {"max_epochs": "planned_epochs", "max_iters": "planned_steps", "num_classes": "num_classes"}


def is_mmengine_text(head: str) -> bool:
    return bool(re.search(r"Epoch\((?:train|val|test)\)\s*\[|Iter\((?:train|val|test)\)\s*\[| - mmengine - ", head))


def is_mmengine_scalars(obj: dict) -> bool:
    return "step" in obj and ("data_time" in obj or any("/" in k for k in obj)) and "kind" not in obj


def _store(r: Reading, mapping: dict | None, line: int, mode: str, epoch: int | None, step: int | None,
           pairs: list[tuple[str, float]]) -> None:
    split = "val" if mode in ("val", "test") else "train"
    for name, value in pairs:
        if name in TIMINGS:
            continue
        res = resolve(name, split, mapping)
        if res is None:
            r.unrecognised.setdefault(name, line)
            continue
        if name in _PERCENT:
            value /= 100.0
            r.percent_labels.add(name)
        r.recognised.setdefault(name, res.name)
        r.records.setdefault((res.eval, epoch, step), {})[res.name] = (value * res.scale, line)
        r.last_metric_line = line
        if res.eval:
            r.last_eval_line = line
        else:
            r.last_train_line = line


def read_mmengine_text(text: str, mapping: dict | None) -> Reading:
    lines = text.splitlines()
    r = Reading(lines=len(lines), format="mmengine-text", has_epoch_markers=True)
    tb = TracebackReader()
    per_epoch: int | None = None  # iterations per training epoch, from "[i/n]"
    last_step = 0
    vals = []
    for lineno, raw in enumerate(lines, start=1):
        body = strip_prefix(raw)
        if tb.feed(lineno, raw.rstrip(), body):
            continue
        m = EXCEPTION_LINE.match(body)
        if m and m["msg"] is not None and not m["type"].endswith("Warning"):
            r.exception_lines.append((lineno, m["type"], m["msg"].strip()))
            continue
        if COMPLETION.search(body):
            r.completed_line = lineno
        m = _ITER_LINE.search(body) or _EPOCH_LINE.search(body)
        if not m:
            for c in _CONFIG.finditer(raw):
                r.settings.setdefault(_SETTING[c["name"]], (int(c["value"]), lineno))
            continue
        d = m.groupdict()
        mode = d.get("mode") or "train"
        pairs = [(p["name"], float(p["value"])) for p in _PAIR.finditer(d["rest"])]
        epoch = int(d["e"]) if d.get("e") else None
        if mode == "train":
            i, n = int(d["i"]) if d.get("i") else None, int(d["n"]) if d.get("n") else None
            if epoch is not None and i is not None and n:
                per_epoch, step = n, (epoch - 1) * n + i
            else:
                step = i
            if step is None:
                r.problems.append((lineno, "a training line with no iteration [i/n]"))
                continue
            last_step = max(last_step, step)
            r.has_step_markers = True
            r.markers.append((lineno, "step", step))
            _store(r, mapping, lineno, mode, epoch, step, pairs)
        else:
            vals.append((lineno, mode, epoch, pairs, last_step))
        if epoch is not None:
            r.markers.append((lineno, "epoch", epoch))
    for lineno, mode, epoch, pairs, seen in vals:
        if r.has_step_markers:
            step = epoch * per_epoch if epoch is not None and per_epoch else seen
            _store(r, mapping, lineno, mode, epoch, step, pairs)
        else:
            _store(r, mapping, lineno, mode, epoch, None, pairs)
    r.tracebacks = tb.finish()
    if r.percent_labels:
        r.notes.append("mmpretrain accuracies are percentages: divided by 100")
    r.notes.append("only the runner's Epoch(...)/Iter(...) lines are metrics (the config dump is not)")
    return r


def read_mmengine_scalars(path: Path, lines: list[str], mapping: dict | None) -> Reading:
    r = Reading(lines=len(lines), format="mmengine-scalars", has_epoch_markers=True)
    train, vals = [], []
    objects, r.problems = json_objects(lines)
    for lineno, obj in objects:
        if not isinstance(obj.get("step"), int):
            r.problems.append((lineno, "not a record with an integer 'step'"))
            continue
        pairs = [(k, float(v)) for k, v in obj.items() if k not in ("step", "epoch") and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
        (train if "epoch" in obj else vals).append((lineno, obj.get("epoch"), obj["step"], pairs))
    firsts = {}
    for _, epoch, step, _ in train:
        firsts.setdefault(epoch, step)
    # iterations per epoch: the distance between the first logged iteration of two consecutive epochs
    gaps = [firsts[e + 1] - firsts[e] for e in firsts if isinstance(e, int) and e + 1 in firsts]
    per_epoch = gaps[0] if gaps and len(set(gaps)) == 1 else None
    for lineno, epoch, step, pairs in train:
        r.has_step_markers = True
        r.markers.append((lineno, "step", step))
        _store(r, mapping, lineno, "train", epoch, step, pairs)
    for lineno, _, step, pairs in vals:  # a validation record's step is its epoch
        if train:
            at = (step * per_epoch if per_epoch else
                  max((s for _, e, s, _ in train if isinstance(e, int) and e <= step), default=0))
            _store(r, mapping, lineno, "val", step, at, pairs)
        else:
            _store(r, mapping, lineno, "val", step, None, pairs)
    if vals:
        r.notes.append(f"validation records' 'step' is the epoch ({len(vals)} records): placed at the epoch's last "
                       "iteration" + (f" ({per_epoch} iterations per epoch)" if per_epoch else ""))
    if r.percent_labels:
        r.notes.append("mmpretrain accuracies are percentages: divided by 100")
    return r


