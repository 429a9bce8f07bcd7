"""Where the GLCA-selected tokens land: the part hit-rate and its chance level.

Definition (used by the trainer, the diagnostics and the README alike):

* The *part patches* of an image are the patch cells of the ViT grid whose **centre** lies inside the
  part's bounding box (pixel coordinates of the network input, boxes as ``x0, y0, x1, y1``).
* An image is a *hit* when at least one of the k GLCA-selected patches is a part patch.
* The *part hit-rate* is the fraction of evaluated images that are hits.
* Its *chance level* is what a uniformly random choice of k of the P patches would score:
  for an image with m part patches, ``1 - C(P - m, k) / C(P, k)``, averaged over the images.

The same definition applied to the distractor marks' boxes gives the *distractor hit-rate*.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["patches_in_boxes", "hits", "chance_hit_rate"]


def patches_in_boxes(boxes: Tensor, grid_size: tuple[int, int], patch_size: tuple[int, int]) -> Tensor:
    """Mask of the patches whose centre lies inside any of the given boxes.

    Args:
        boxes: (B, 4) or (B, M, 4) boxes ``x0, y0, x1, y1`` in input pixels; rows that are all NaN are
            padding (no box).
        grid_size: (rows, cols) of the patch grid.
        patch_size: (height, width) of one patch in pixels.

    Returns:
        (B, P) bool, P = rows * cols, patches in row-major order (timm's token order).
    """
    if boxes.dim() == 2:
        boxes = boxes.unsqueeze(1)  # (B, 1, 4)
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, 4) or (B, M, 4), got {tuple(boxes.shape)}")
    rows, cols = grid_size
    ph, pw = patch_size
    cy = (torch.arange(rows, dtype=torch.float32) + 0.5) * ph  # (rows,)
    cx = (torch.arange(cols, dtype=torch.float32) + 0.5) * pw  # (cols,)
    cy, cx = cy[:, None].expand(rows, cols).reshape(-1), cx[None, :].expand(rows, cols).reshape(-1)  # (P,)
    b = boxes.float()[..., None]  # (B, M, 4, 1)
    inside = (cx >= b[:, :, 0]) & (cx <= b[:, :, 2]) & (cy >= b[:, :, 1]) & (cy <= b[:, :, 3])  # (B, M, P)
    return inside.any(dim=1)  # NaN boxes compare False: no patch


def hits(local_index: Tensor, part_mask: Tensor) -> Tensor:
    """(B,) bool: whether any selected patch (``local_index`` (B, k)) is in ``part_mask`` (B, P)."""
    if local_index.shape[0] != part_mask.shape[0]:
        raise ValueError(f"batch mismatch: local_index {tuple(local_index.shape)} vs part_mask {tuple(part_mask.shape)}")
    return part_mask.gather(1, local_index.long()).any(dim=1)


def chance_hit_rate(part_mask: Tensor, k: int) -> float:
    """Mean over images of the probability that k uniformly random patches include a part patch."""
    P = part_mask.shape[1]
    if not 1 <= k <= P:
        raise ValueError(f"k must be in 1..{P}, got {k}")
    probs = []
    for m in part_mask.sum(dim=1).tolist():
        probs.append(1.0 - math.comb(P - int(m), k) / math.comb(P, k))
    return float(sum(probs) / max(len(probs), 1))
