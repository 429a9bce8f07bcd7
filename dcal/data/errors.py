"""The one exception type of :mod:`dcal.data`."""
from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset on disk (or in the cache) is malformed.

    The message always names the offending file and, where there is one, the line number, e.g.
    ``train_test_split.txt line 17: image id 17 has split value '2', expected 0 or 1``.
    """
