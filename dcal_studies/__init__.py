"""Study code for the notebooks: the verdict vocabulary, the predecessor system's design and its fallback.

"The predecessor" is the earlier DCAL implementation whose failed run ../shared/seed/ documents (the project's
documents call it "the seed"); in code, "seed" means only an RNG seed. The libraries (`dcal`, `diagnostics`)
never import this package; notebooks and tools do.
"""
from .selection import uniform_fallback_selection

__all__ = ["uniform_fallback_selection"]
