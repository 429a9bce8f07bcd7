"""TensorBoard event files, read with TensorBoard's own reader (`EventAccumulator`): every scalar tag is a
label, its ``step`` the index. A folder is searched for event files; a sub-folder's name is part of its
tags' labels (Keras writes ``train/`` and ``validation/`` runs with the same tag names)."""
from __future__ import annotations

from pathlib import Path

from ..extras import MissingExtraError, require
from .aliases import resolve
from .build import LogImportError
from .reading import Reading

__all__ = ["read_tensorboard", "event_files"]

EVENT_GLOB = "*tfevents*"


def event_files(path: Path) -> list[Path]:
    """The event files at `path` (a file, or every one under a folder)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob(EVENT_GLOB) if p.is_file())


def _scalars(folder_or_file: Path) -> dict[str, list]:
    try:
        reader = require("tensorboard.backend.event_processing.event_accumulator",
                         f"reading the TensorBoard event file {folder_or_file}")
    except MissingExtraError as e:  # the user's environment, not a fault of the reader: dcal doctor exits 2
        raise LogImportError(str(e)) from e
    SCALARS, EventAccumulator = reader.SCALARS, reader.EventAccumulator  # noqa: N806 (TensorBoard's names)

    acc = EventAccumulator(str(folder_or_file), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags().get(SCALARS, [])}


def read_tensorboard(path: Path, mapping: dict | None) -> Reading:
    """Scalars of every event file at `path`; raises ValueError when there is none."""
    files = event_files(path)
    if not files:
        raise ValueError(f"{path}: no TensorBoard event file ({EVENT_GLOB}) found")
    r = Reading(unit="event")
    r.has_step_markers = True
    folders = sorted({f.parent for f in files}) if path.is_dir() else [path]
    for where in folders:
        prefix = "" if not path.is_dir() or where == path else " ".join(where.relative_to(path).parts)
        for tag, events in _scalars(where).items():
            label = f"{prefix} {tag}".strip()
            res = resolve(label, None, mapping)
            r.lines += len(events)
            if res is None:
                r.unrecognised.setdefault(label, f"tag {tag!r}" + (f" in {prefix}/" if prefix else ""))
                continue
            r.recognised.setdefault(label, res.name)
            if res.percent:
                r.percent_labels.add(label)
            for ev in events:
                v = ev.value / 100.0 if res.percent else ev.value
                r.records.setdefault((res.eval, None, int(ev.step)), {})[res.name] = (v * res.scale, None)
    return r
