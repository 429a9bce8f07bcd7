"""The diagnostics a `dcal train` run attaches by default (the app layer composes the two libraries)."""
from __future__ import annotations

from diagnostics import MemoryCallback, NonFiniteCallback, RolloutCallback

__all__ = ["default_callbacks"]


def default_callbacks() -> list:
    """Tier-1/2 NaN checks, memory per step (sampled on CPU to stay within 2% of a step), rollout/selection
    statistics and a probe figure per evaluation."""
    return [NonFiniteCallback(), MemoryCallback(), RolloutCallback()]
