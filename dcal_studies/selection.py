"""The predecessor system's GLCA selection when its rollout was missing (study code, not the library)."""
from __future__ import annotations

import torch
from torch import Tensor

from diagnostics.selection import check_bpk

__all__ = ["uniform_fallback_selection"]


def uniform_fallback_selection(B: int, P: int, k: int) -> Tensor:
    """What the predecessor system selected when the rollout was missing: ``torch.ones(B, P).topk(k)`` → (B, k).

    Top-k of equal scores returns the same indices for every image (whichever ones the kernel's tie
    breaking yields), which is what makes the fallback silently static.
    """
    check_bpk(B, P, k)
    return torch.ones(B, P).topk(k, dim=1).indices
