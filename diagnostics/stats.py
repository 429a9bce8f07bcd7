"""Statistics and column helpers shared by the doctor, the plots and the leak detector (defined once)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from dcal.branches import BRANCHES  # DCAL's three branches, in the order every record and plot uses

__all__ = ["BRANCHES", "finite", "has_values", "GrowthFit", "fit_growth"]



def finite(s: pd.Series) -> pd.Series:
    """The finite values of `s`; a non-numeric column is read with `pd.to_numeric` (unparseable → dropped)."""
    if not pd.api.types.is_numeric_dtype(s):
        s = pd.to_numeric(s, errors="coerce")
    return s[np.isfinite(s.astype(float))]


def has_values(df: pd.DataFrame, col: str) -> bool:
    """True when `df` has column `col` with at least one finite value."""
    return col in df.columns and len(finite(df[col])) > 0


@dataclass(frozen=True)
class GrowthFit:
    """A least-squares line through (step, value) points, and how steadily the series grows.

    slope: value units per step; t_stat: slope / its standard error (inf for a perfect line);
    start: the fitted value at the first step; growth: slope × (last step − first step);
    growth_fraction: the fraction of consecutive intervals in which the value rose; n: points.
    """

    slope: float
    intercept: float
    t_stat: float
    start: float
    growth: float
    growth_fraction: float
    first_step: float
    last_step: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def fit_growth(steps: Sequence[float], values: Sequence[float]) -> GrowthFit | None:
    """Fit a memory (or tensor-count) series: the one growth statistic of the doctor and `LeakDetector`.

    Returns None with fewer than 3 points or when all steps are equal (no slope is defined).
    Raises ValueError on non-finite or mis-matched input, naming it.
    """
    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fit_growth: steps and values must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fit_growth: steps and values must be finite (drop missing samples first)")
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    dx = x - x.mean()
    sxx = float((dx ** 2).sum())
    slope = float((dx * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x.mean())
    resid = y - (slope * x + intercept)
    sigma = math.sqrt(float((resid ** 2).sum()) / (len(x) - 2)) if len(x) > 2 else 0.0
    se = sigma / math.sqrt(sxx)
    t = math.inf if se == 0 else slope / se
    if se == 0 and slope == 0:
        t = 0.0
    rose = float((np.diff(y) > 0).mean())
    return GrowthFit(slope=slope, intercept=intercept, t_stat=t, start=float(slope * x[0] + intercept),
                     growth=float(slope * (x[-1] - x[0])), growth_fraction=rose, first_step=float(x[0]),
                     last_step=float(x[-1]), n=int(len(x)))
