"""Exceptions that name what went wrong and where (a config field, a block, a file)."""
from __future__ import annotations

__all__ = ["ConfigError", "RolloutError", "CheckpointError", "NonFiniteLossError"]


class ConfigError(ValueError):
    """An impossible or unsupported configuration; the message names the field."""


class RolloutError(RuntimeError):
    """An attention map that the rollout cannot use (missing, mis-shaped, non-finite); names the block.

    `nonfinite` is True when the map held NaN/Inf (a numerical fault upstream, not a wiring bug).
    """

    def __init__(self, message: str, *, nonfinite: bool = False):
        super().__init__(message)
        self.nonfinite = nonfinite


class CheckpointError(RuntimeError):
    """A weights or checkpoint file that cannot be loaded (missing, truncated, mismatched); names the file."""


class NonFiniteLossError(FloatingPointError):
    """A training loss (or a branch loss, or a gradient norm) went non-finite; names the step and the term."""
