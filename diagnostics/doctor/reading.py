"""The doctor's input: a `RunLog` from a path of any format (`diagnostics.import_log`) or as given, with
the user's number of classes and steps per epoch applied."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..logimport import import_log
from ..runlog import RunLog

__all__ = ["read_log"]


def read_log(path_or_log: str | Path | RunLog, *, format: str = "auto", num_classes: int | None = None,
             mapping=None, steps_per_epoch: float | None = None) -> RunLog:
    """A `RunLog` from a run folder or any log `import_log` reads, or the given one (a copy, when
    `num_classes` or `steps_per_epoch` is given for it).

    Raises FileNotFoundError, `diagnostics.runlog.RunLogError` or `diagnostics.logimport.LogImportError`.
    """
    if not isinstance(path_or_log, RunLog):
        return import_log(path_or_log, format=format, num_classes=num_classes, mapping=mapping,
                          steps_per_epoch=steps_per_epoch)
    changes = {}
    if num_classes is not None:
        changes["num_classes_given"] = num_classes
    if steps_per_epoch is not None:
        changes.update(steps_per_epoch=float(steps_per_epoch), steps_per_epoch_source=(
            f"{steps_per_epoch:g} optimiser steps per epoch (given)"))
    return dataclasses.replace(path_or_log, **changes) if changes else path_or_log
