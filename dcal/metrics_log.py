"""`MetricsLogger`: the trainer's callback that writes its records to the run folder's metrics.jsonl.

The format (record kinds, the ``end`` record, how a non-finite value is written) and the writer are
`dcal.runfolder`'s, which `diagnostics.watch` writes through too; the names below are re-exported from there.
Hand-written on purpose: a line per record with `json` and a flush is the whole format (what DeiT's
`log.txt` does); a logging library would add a dependency and a second format for readers to cope with.
"""
from __future__ import annotations

from pathlib import Path

from .callbacks import Callback
from .runfolder import (
    AMP_OVERFLOW,
    METRICS_FILE,
    RunWriter,
    encode_record,
    end_record,
    metrics_size,
    truncate_metrics,
)

__all__ = ["MetricsLogger", "end_record", "clean_record", "metrics_size", "truncate_metrics", "METRICS_FILE",
           "AMP_OVERFLOW"]

# The record as metrics.jsonl holds it (non-finite floats as "nan"/"inf"/"-inf"): `dcal.runfolder`'s encoding.
clean_record = encode_record


class MetricsLogger(Callback):
    """Writes the step and eval records, and the run's ``end`` record, to metrics.jsonl (runs last).

    Args:
        run: the run folder's `RunWriter`, or the run folder (or its metrics.jsonl) to open one on (appending:
            the trainer has already refused a folder that holds another run).
    """

    order = 100

    def __init__(self, run: RunWriter | str | Path):
        if not isinstance(run, RunWriter):
            path = Path(run)
            run = RunWriter(path.parent if path.name == METRICS_FILE else path, resume=True)
        self.run = run

    @property
    def path(self) -> Path:
        return self.run.metrics_path

    def before_fit(self, trainer):
        self.run.open()

    def after_step(self, trainer):
        self.run.write(trainer.record)

    def after_eval(self, trainer):
        self.run.write(trainer.eval_record)

    def after_fit(self, trainer):
        end = getattr(trainer, "end_record", None)
        if end is not None:  # written also when the run died before this logger's before_fit
            self.run.write(end)
        self.run.close()
