"""Reading a plain-text training log, whatever shape a hand-rolled trainer printed it in.

Each line is cleaned (ANSI colours; for ``\\r``-updated progress bars, the last update), its prefix taken
off (time stamps, elapsed times, ``INFO``/logger names), then read for:

- epoch / step markers: ``Epoch 5/100``, ``EPOCH 5 SUMMARY``, ``[epoch 5]``, ``Train Epoch: 5``,
  ``epoch=5``, ``Step 1200``; the metrics that follow belong to that epoch (and step);
- metrics: ``name: value`` and ``name=value`` pairs, several per line (``|``, ``,``, `` - `` between
  them), tqdm postfixes (``[.., L=7.98, lr=1e-4]``), and ``name value`` pairs where the name is a known
  one (``loss 0.345 | lr 0.0001``); values with ``%`` are divided by 100, memory values with a unit are
  converted to MB;
- sections: a line that is only ``Validation:`` (or ``=== Test ===``) makes unprefixed names validation
  ones until the next section or marker;
- progress bars: their totals (batches per epoch) and the last position (where a crash happened);
- run settings stated in the log (batch size, accumulation steps, number of classes, ...);
- tracebacks and bare exception lines (`crash.py`): the last one, with no metric after it, is how the run
  ended.

A parenthesised remark after a value (``1.17% (Best: 15.38% @ epoch 5)``) is a remark, not a metric.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .aliases import SPLIT_WORDS, Label, normalise, resolve, resolve_index, resolve_setting
from .crash import EXCEPTION_LINE, TracebackReader
from .reading import Reading
from .unwrap import unwrap

__all__ = ["read_text", "strip_prefix", "COMPLETION"]

# A line that says training finished (the run reached its end rather than being cut off).
COMPLETION = re.compile(
    r"\b(?:training|train|fit)\s+(?:is\s+|has\s+)?(?:completed?|finished|done|ended)\b|\bfinished training\b"
    r"|\bdone training\b|\bearly stopping\b|`?Trainer\.fit`? stopped|\bmax_(?:epochs|steps)=\d+`? reached", re.I)
# A two-column summary table ("Metric   Train   Validation", then "Loss   0.7133   0.6376").
_TABLE_HEAD = re.compile(r"^(?:metric|name)?\s*(?P<a>train(?:ing)?)\s+(?P<b>val(?:id(?:ation)?)?|test|eval)\s*$", re.I)
_TABLE_ROW = re.compile(r"^(?P<name>[A-Za-z][\w ()/-]*?)\s{2,}(?P<a>[-+]?\d[\d.eE+-]*|-)(?:\s+(?P<b>[-+]?\d[\d.eE+-]*|-))?\s*$")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Line prefixes, taken off repeatedly: date-times, clock or elapsed times, "[12.3s]", log levels (and any
# logger name before them), separators.
_PREFIXES = [re.compile(p, re.I) for p in (
    r"^\[?\d{4}[-/]\d{2}[-/]\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?\]?",
    r"^\[?\d{1,3}:\d{2}(?::\d{2})?(?:[.,]\d+)?\]?(?=\s|$|[\]|\-])",
    r"^\[\s*\d+(?:\.\d+)?\s*(?:s|sec|secs|seconds|ms|min|m|h)\s*\]",
    r"^\d+(?:\.\d+)?\s*(?:s|sec|secs)\s*(?=[|\-\]])",
    # Level names are matched in capitals only (as `logging` writes them): case-insensitive, "CUDA error:"
    # in "RuntimeError: CUDA error: out of memory" was taken for a level and the exception's head was lost.
    r"^(?-i:.{0,60}?(?<![\w(])(?:INFO|WARNING|WARN|DEBUG|ERROR|CRITICAL)(?![\w(]))\s*(?::[\w.]+)?\s*[:\-|\]]*",
    r"^[\-|:>\]\s]+",
)]
_TQDM = re.compile(r"(?P<desc>.*?)(?::\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>\d+(?:\.\d+)?)/(?P<total>\d+(?:\.\d+)?)"
                   r"\s*(?:\[(?P<inner>[^\]]*)\])?")
_MARKER = re.compile(r"(?<![\w@])(?<!best )(?<!best_)(?P<kind>epoch|step|iter|iteration|global[ _]step)\b['\"]?\s*[:=#]?\s*\[?\s*"
                     r"(?P<n>\d+)(?:\s*(?:/|of)\s*(?P<total>\d+))?", re.I)
_WORD = r"[A-Za-z_][\w.\-/@]*"
_NAME = rf"(?P<name>{_WORD}(?:[ ](?:\([\w\s\-/]+\)|{_WORD})){{0,4}})"
_NUM = r"(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)\b)"
_UNIT = r"(?:\s*(?P<unit>%|[KMGT]i?B\b))?"
_END = r"(?=$|[\s,;|)\]}])"
_Q = r"['\"]?"  # a quoted name: "{'loss': 0.5}" (a printed dict, as Hugging Face's Trainer logs)
_PAIR = re.compile(rf"{_Q}{_NAME}{_Q}\s*[:=]\s*{_NUM}{_UNIT}{_END}", re.I)
_SPACED = re.compile(rf"(?<![\w.])(?P<name>{_WORD}(?: {_WORD})?)\s+{_NUM}{_UNIT}{_END}", re.I)
_FRACTION = re.compile(rf"{_NAME}\s*[:=]\s*(?P<a>\d+)\s*/\s*(?P<b>\d+)(?:\s*\([\d.]+%\))?{_END}")
_BAD_VALUE = re.compile(rf"{_NAME}\s*[:=]\s*(?P<raw>[^\s,;|]+)")
# "1.17% (Best: 15.38% @ epoch 5)": a parenthesised remark right after a value (not "w1 (SA): 0.1")
_REMARK = re.compile(r"(?P<keep>[:=]\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*%?)\s*\([^()]*\)")
_HEADER = re.compile(r"^[=\-#*\s]*(?P<name>[A-Za-z][\w \-/()]*?)\s*(?::\s*|[=\-#*\s]+)$")
_MEM_UNITS = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3, "KIB": 1024 / 1e6, "MIB": 2**20 / 1e6,
              "GIB": 2**30 / 1e6}


def _clean(raw: str) -> str:
    line = _ANSI.sub("", raw)
    if "\r" in line:  # a progress bar rewritten in place: its last state
        parts = [p for p in line.split("\r") if p.strip()]
        line = parts[-1] if parts else ""
    return line.rstrip()


def strip_prefix(line: str) -> str:
    """The line without its time stamps, log level and separators."""
    prev = None
    line = line.strip()
    while prev != line:
        prev = line
        for p in _PREFIXES:
            cut = p.sub("", line, count=1).lstrip()
            if cut != line and cut:
                line = cut
    return line


@dataclass
class _State:
    epoch: int | None = None
    step: int | None = None
    section: str | None = None
    metrics_in_line: int = 0
    table: bool = False  # inside a Train/Validation summary table
    in_bar: bool = False  # the line being read is a progress bar (its postfix: running per-batch values)


class _Reader:
    def __init__(self, mapping: dict[str, str] | None):
        self.mapping = mapping or {}
        self.out = Reading()
        self.state = _State()
        self.tb = TracebackReader()
        self.record_counter = 0
        self.lineno = 0
        self.line_split: str | None = None
        self.values_read = 0
        self.bar_records: dict = {}  # values read from progress-bar postfixes, kept apart (see finish)
        self.totals: dict = {"epoch": [], "step": []}  # (n, total) of "Epoch 3/26", "[Step 1800/10000]"

    # --- one line
    def line(self, lineno: int, raw: str) -> None:
        self.lineno = lineno
        text = _clean(raw)
        body = strip_prefix(text)
        if self.tb.feed(lineno, text, body):
            return
        if not body or set(body) <= set("=-_*#~ "):
            return
        m = EXCEPTION_LINE.match(body)
        if m and m["msg"] is not None and not m["type"].endswith("Warning"):
            self.out.exception_lines.append((lineno, m["type"], m["msg"].strip()))
            return
        if COMPLETION.search(body):
            self.out.completed_line = lineno
        if self._table(lineno, body):
            return
        body = _REMARK.sub(r"\g<keep>", body)
        found = self._progress(lineno, body)
        self.state.in_bar = found is not None
        if found is not None:
            body = found
        before = self.values_read
        self._markers(body)
        if self._header(body):
            return
        self._metrics(lineno, body)
        if self.values_read == before and not _MARKER.search(body):
            self.out.prose_lines += 1

    def _progress(self, lineno: int, body: str) -> str | None:
        """A tqdm bar: note it, and return the text left to read (its description and postfix)."""
        m = _TQDM.search(body) if "%|" in body else None  # the search is slow: only where a bar can be
        if not m:
            return None
        desc = m["desc"] or ""
        self._markers(desc)
        kind = "eval" if any(w in SPLIT_WORDS and SPLIT_WORDS[w] == "val" for w in normalise(desc).split()) else "train"
        self.out.progress.append({"line": lineno, "epoch": self.state.epoch, "n": int(float(m["n"])),
                                  "total": int(float(m["total"])), "desc": desc.strip(), "kind": kind})
        inner = m["inner"] or ""
        postfix = inner.split(",", 2)[-1] if inner.count(",") >= 2 else ""  # after elapsed<eta, rate
        return desc + " | " + postfix + " | " + body[m.end():]

    def _table(self, lineno: int, body: str) -> bool:
        """A Train/Validation summary table: its rows are read as (train, validation) pairs."""
        if _TABLE_HEAD.match(body):
            self.state.table = True
            return True
        if not self.state.table:
            return False
        if set(body) <= set("-=+| "):
            return True
        m = _TABLE_ROW.match(body)
        if not m:
            self.state.table = False
            return False
        for value, split in ((m["a"], "train"), (m["b"], "val")):
            if value and value != "-":
                label = resolve(m["name"].strip(), split, self.mapping)
                if label is not None and re.fullmatch(_NUM, value, re.I):
                    self.out.recognised.setdefault(f"{m['name'].strip()} ({split} column)", label.name)
                    self._store(lineno, label, float(value))
        return True

    def _markers(self, body: str) -> None:
        for m in _MARKER.finditer(body):
            n = int(m["n"])
            kind = "epoch" if m["kind"].lower() == "epoch" else "step"
            if m["total"] and not self.state.in_bar:
                self.totals[kind].append((n, int(m["total"]), self.lineno))
            self.out.markers.append((self.lineno, m["kind"].lower(), n))
            if m["kind"].lower() == "epoch":
                if n != self.state.epoch:
                    self.state.section = None
                self.state.epoch = n
                self.out.has_epoch_markers = True
            else:
                self.state.step = n
                self.out.has_step_markers = True

    def _header(self, body: str) -> bool:
        """A section header ("Validation:", "=== Test ==="): sets the split of the names under it."""
        m = _HEADER.match(body)
        if not m or _MARKER.search(body) or any(ch.isdigit() for ch in m["name"][-1:]):
            return False
        words = normalise(m["name"]).split()
        if not words or len(words) > 6:
            return False
        splits = {SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS}
        self.state.section = splits.pop() if len(splits) == 1 else None
        return True

    def _metrics(self, lineno: int, body: str) -> None:
        pairs = list(_PAIR.finditer(body))
        taken = [m.span() for m in pairs]
        spaced = [m for m in _SPACED.finditer(body) if not any(a <= m.start() < b for a, b in taken)]
        fractions = [m for m in _FRACTION.finditer(body) if not any(a <= m.start() < b for a, b in taken)]
        self.line_split = self._line_split(body, pairs + spaced + fractions)
        for m in pairs:
            self._one(lineno, m["name"], m["value"], m["unit"], spaced=False)
        for m in spaced:
            self._one(lineno, m["name"], m["value"], m["unit"], spaced=True)
        for m in fractions:  # "Accuracy: 9700/10000 (97%)": an accuracy written as a count
            label = self._label(m["name"])
            if label is not None and "acc" in label.name and int(m["b"]) > 0:
                self._one(lineno, m["name"], str(int(m["a"]) / int(m["b"])), None, spaced=False)
            taken.append(m.span())
        for m in _BAD_VALUE.finditer(body):
            if any(a <= m.start() < b for a, b in taken) or _MARKER.match(m.group(0)):
                continue
            label = self._label(m["name"])
            raw = m["raw"]
            if label is not None and not re.match(_NUM, raw, re.I) and not raw.startswith("["):
                self.out.problems.append((lineno, f"{m['name'].strip()!r} has the value {raw!r}, not a number"))
        self.line_split = None

    def _line_split(self, body: str, matches: list) -> str | None:
        """The split a line names before its first metric ("Test set: Average loss: ...", "valid on 'valid'
        subset | loss 3.8"): the default split of that line's names."""
        starts = [m.start() for m in matches if resolve(m["name"], None, self.mapping) is not None]
        prefix = body[:min(starts)] if starts else ""
        splits = {SPLIT_WORDS[w] for w in normalise(prefix).split() if w in SPLIT_WORDS}
        return splits.pop() if len(splits) == 1 else None

    def _label(self, name: str) -> Label | None:
        return resolve(name, self.line_split or self.state.section, self.mapping)

    def _one(self, lineno: int, name: str, value: str, unit: str | None, spaced: bool) -> None:
        name = name.strip()
        if spaced and " " in name and self._label(name) is None:
            name = name.split()[-1]  # "done loss 0.5": the known name is the last word
        index = resolve_index(name)
        if index is not None:
            return  # epoch=5, step=1200: read by the markers
        setting = resolve_setting(name)
        label = self._label(name)
        if setting is not None and label is None:
            self.out.settings.setdefault(setting, (float(value), lineno))
            return
        if label is None:
            if not spaced:
                self.out.unrecognised.setdefault(name, lineno)
            return
        v = float(value)
        if unit == "%":
            v /= 100.0
            self.out.percent_labels.add(name)
        elif unit:
            if not label.name.startswith("mem_"):
                self.out.problems.append((lineno, f"{name!r} has a unit {unit!r}; only memory is read with units"))
                return
            v *= _MEM_UNITS[unit.upper()]
        elif label.percent:
            v /= 100.0
            self.out.percent_labels.add(name)
        v *= label.scale
        self.out.recognised.setdefault(name, label.name)
        self._store(lineno, label, v)

    def _store(self, lineno: int, label: Label, value: float) -> None:
        st = self.state
        key = (label.eval, st.epoch, st.step)
        if st.epoch is None and st.step is None:
            # No index anywhere yet: a new record per line that holds metrics.
            if st.metrics_in_line != lineno:
                self.record_counter += 1
                st.metrics_in_line = lineno
            key = (label.eval, None, -self.record_counter)
        target = self.bar_records if self.state.in_bar else self.out.records
        target.setdefault(key, {})[label.name] = (value, lineno)
        self.values_read += 1
        self.out.last_metric_line = lineno
        if label.eval:
            self.out.last_eval_line = lineno
        else:
            self.out.last_train_line = lineno

    def finish(self) -> Reading:
        self.out.tracebacks = self.tb.finish()
        # A progress bar's postfix holds running per-batch values: read only where no plain line (an epoch
        # summary, "val_loss=...") gave that record its values.
        dropped = 0
        for key, values in self.bar_records.items():
            if key in self.out.records:
                dropped += 1
            else:
                self.out.records[key] = values
        if dropped:
            self.out.notes.append(f"{dropped} records' progress-bar postfix values (running per-batch values) "
                                  "were left out: the log's summary lines give those records")
        for kind, seen in self.totals.items():
            planned = _planned(seen)
            if planned:
                self.out.settings.setdefault(f"planned_{kind}s", planned)
        if any(math.isnan(v) for r in self.out.records.values() for v, _ in r.values()):
            self.out.notes.append("some values are NaN (written 'nan' in the log)")
        return self.out


def _planned(seen: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """(total, line) when "k/N" markers state the run's length: one N throughout and k never going back
    (a counter that restarts is per epoch, e.g. "step 40/171" of every epoch: not the run's length)."""
    if not seen or len({total for _, total, _ in seen}) != 1:
        return None
    ns = [n for n, _, _ in seen]
    if any(b < a for a, b in zip(ns, ns[1:])):
        return None
    return seen[0][1], seen[0][2]


def read_text(text: str, mapping: dict[str, str] | None = None, *, fmt: str = "text") -> Reading:
    """Read a text log (see the module docstring). `mapping`: the user's names, canonical → label; `fmt`:
    the format name the reading reports (the Keras and notebook readers are this reader)."""
    reader = _Reader(mapping)
    lines = text.splitlines()
    logical, width = unwrap(lines)
    reader.out.lines = len(lines)
    reader.out.format = fmt
    if width:
        reader.out.notes.append(f"hard-wrapped at {width} columns (a console capture): {len(lines)} lines joined "
                                f"into {len(logical)}; line numbers are the file's")
    skipped = 0
    for k, (i, raw) in enumerate(logical):
        if "%|" in raw and k + 1 < len(logical) and _same_bar(raw, logical[k + 1][1]):
            skipped += 1  # a progress bar redrawn on the next line: only its last state is read
            continue
        reader.line(i, raw)
    return reader.finish()


def _same_bar(line: str, nxt: str) -> bool:
    """`nxt` redraws the progress bar `line` draws: the same text before the percentage (a tqdm bar written
    once per update, each on its own line), and the counter did not restart."""
    if "%|" not in nxt or "\r" in line:
        return False
    a, b = line.split("%|", 1), nxt.split("%|", 1)
    return a[0][:-3] == b[0][:-3] and a[0][-3:].strip().isdigit() and b[0][-3:].strip().isdigit() and \
        int(b[0][-3:]) >= int(a[0][-3:])
