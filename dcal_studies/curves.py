"""Reading an accuracy curve against the Σlr it spent (notebooks 01 and 03)."""
from __future__ import annotations

import pandas as pd

from diagnostics.doctor import COLLAPSE_FRACTION

__all__ = ["fall_at"]


def fall_at(sum_lr: pd.Series, acc: pd.Series) -> tuple[float, float]:
    """Σlr at the best point of `acc`, and at the first point after it below `COLLAPSE_FRACTION` (half) of the
    best. Both series share an index (the evaluation step). Raises IndexError when the curve never falls."""
    best = acc.idxmax()
    after = acc.loc[best:]
    return sum_lr[best], sum_lr[after[after < COLLAPSE_FRACTION * acc.max()].index[0]]
