"""What the doctor says: a `Finding` (a public code, a severity, a message with the numbers, the numbers
in ``evidence``), the codes it can give, and the JSON form of the evidence."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

__all__ = ["Finding", "SEVERITIES", "CODES", "jsonable"]

SEVERITIES = ("error", "warning", "info")
CODES = ("nonfinite", "chance-level", "uncertainty-at-chance", "uncertainty-clamped", "uncertainty-lag",
         "accuracy-collapse", "loss-rising", "memory-growth", "selection-static", "lr-rule",
         "coupled-weight-decay", "crash", "oom", "truncated-log", "empty-log", "log-import", "check-skipped",
         "overfitting", "accuracy-regression", "divergence", "unstable")


@dataclass
class Finding:
    """One thing the doctor found: a public `code`, a `severity`, a message with the numbers, and the
    numbers themselves in `evidence` (JSON-serialisable)."""

    code: str
    severity: str
    message: str
    evidence: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding severity must be one of {SEVERITIES}, got {self.severity!r}")
        self.evidence = jsonable(self.evidence)

    def to_dict(self) -> dict:
        return asdict(self)


def jsonable(x):
    """Evidence → plain JSON: numpy scalars to Python, non-finite floats to the strings "nan"/"inf"."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, np.ndarray, pd.Series)):
        return [jsonable(v) for v in list(x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        x = float(x)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if x is None or isinstance(x, str):
        return x
    return str(x)
