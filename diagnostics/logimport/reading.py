"""What a reader of any format hands to `build`: metric records with the line each value came from, the
labels it recognised and left out, what it could not read, the settings the log states, its progress
bars and markers, and the tracebacks it saw."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Reading"]


@dataclass
class Reading:
    """``records``: (is_eval, epoch, step) → {canonical name: (value, line)}; a step of None means the
    reader saw no step index; a negative step numbers records of a log with no index at all.
    ``recognised``: label → canonical name; ``unrecognised``: label → first line; ``problems``: (line, why);
    ``settings``: name → (value, line); ``progress``: progress bars ({line, epoch, n, total, desc, kind});
    ``markers``: (line, "epoch"|"step", n); ``tracebacks`` (`crash.Traceback`); ``exception_lines``:
    (line, type, message) outside tracebacks; ``percent_labels``: labels whose values were percentages;
    ``format``: the format the reader recognised (`LogSource.format`); ``completed_line``: the line that says
    the run finished ("Training completed", Keras' "early stopping", HF's final train summary), if any.
    Settings the issue names for `truncated-log`: ``planned_epochs``/``planned_steps`` (a log's stated end)."""

    lines: int = 0
    unit: str = "line"  # what `lines` counts: "line", "row", "event"
    records: dict = field(default_factory=dict)
    recognised: dict = field(default_factory=dict)
    unrecognised: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    progress: list = field(default_factory=list)
    markers: list = field(default_factory=list)
    tracebacks: list = field(default_factory=list)
    exception_lines: list = field(default_factory=list)
    last_metric_line: int = 0
    last_eval_line: int = 0
    last_train_line: int = 0
    has_step_markers: bool = False
    has_epoch_markers: bool = False
    percent_labels: set = field(default_factory=set)
    prose_lines: int = 0
    format: str = ""
    completed_line: int | None = None
