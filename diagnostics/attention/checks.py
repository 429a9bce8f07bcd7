"""Validation of what the attention views take (rollouts, grids, images, indices, boxes, titles): each
raises naming the argument, its shape and what was expected."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a Tensor or an array, got {type(x).__name__}") from e


def _check_grid(grid_size) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in grid_size)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grid_size must be (rows, cols), got {grid_size!r}") from e
    if rows < 1 or cols < 1 or (rows, cols) != tuple(grid_size):
        raise ValueError(f"grid_size must be two positive ints (rows, cols), got {grid_size!r}")
    return rows, cols


def _check_rollout(rollout, grid: tuple[int, int], num_prefix_tokens: int, name: str = "rollout") -> Tensor:
    """(P,) or (B, P + prefix) → (B, rows, cols) fp32 patch scores, prefix tokens dropped."""
    r = _as_tensor(rollout, name)
    if r.dim() not in (1, 2):
        raise ValueError(f"{name} must be (P,) or (B, P), got shape {tuple(r.shape)}")
    if r.dtype == torch.bool or r.dtype.is_complex:
        raise ValueError(f"{name} must hold real scores, got dtype {r.dtype}")
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    rows, cols = grid
    expected = num_prefix_tokens + rows * cols
    if r.shape[-1] != expected:
        raise ValueError(f"{name} has {r.shape[-1]} tokens (shape {tuple(r.shape)}) but grid_size {grid} with "
                         f"num_prefix_tokens={num_prefix_tokens} needs {num_prefix_tokens} + {rows}×{cols} = "
                         f"{expected}")
    r = r.float().reshape(-1, expected)[:, num_prefix_tokens:]  # (B, P)
    if not torch.isfinite(r).all():
        raise ValueError(f"{name} holds non-finite values")
    return r.reshape(-1, rows, cols)  # (B, rows, cols), row-major as timm's tokens


def _check_images(images, mean, std) -> np.ndarray:
    """(B, C, H, W) or (C, H, W), C ∈ {1, 3}, normalised → (B, H, W, C) in [0, 1] for imshow."""
    x = _as_tensor(images, "images").float()
    if x.dim() == 3:
        x = x.unsqueeze(0)  # (1, C, H, W)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    C = x.shape[1]
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (to un-normalise the images) or neither")
    if mean is not None:
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if m.numel() not in (1, C) or s.numel() not in (1, C):
            raise ValueError(f"mean/std must have 1 or {C} values for {C}-channel images, got {m.numel()} and "
                             f"{s.numel()}")
        x = x * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)


def _check_index(local_index, B: int, P: int, name: str = "local_index") -> np.ndarray | None:
    if local_index is None:
        return None
    idx = _as_tensor(local_index, name)
    if idx.dim() == 1 and B == 1:
        idx = idx.unsqueeze(0)  # (1, k)
    if idx.dim() != 2 or idx.shape[0] != B:
        raise ValueError(f"{name} must be (B, k) with B = {B} images, got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer patch indices, got {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= P):
        raise ValueError(f"{name} values must lie in 0..{P - 1} for a grid of {P} patches, got "
                         f"{int(idx.min())}..{int(idx.max())}")
    return idx.long().numpy()


def _check_boxes(boxes, B: int, name: str) -> np.ndarray | None:
    """(B, 4) or (B, M, 4) ``x0, y0, x1, y1`` (all-NaN rows are padding) → (B, M, 4)."""
    if boxes is None:
        return None
    b = _as_tensor(boxes, name).float()
    if b.dim() == 1 and B == 1:
        b = b.unsqueeze(0)  # (1, 4)
    if b.dim() == 2:
        b = b.unsqueeze(1)  # (B, 1, 4)
    if b.dim() != 3 or b.shape[0] != B or b.shape[-1] != 4:
        raise ValueError(f"{name} must be (B, 4) or (B, M, 4) boxes x0, y0, x1, y1 with B = {B}, got "
                         f"{tuple(_as_tensor(boxes, name).shape)}")
    return b.numpy()


def _check_titles(titles, B: int) -> list[str | None]:
    if titles is None:
        return [None] * B
    titles = list(titles)
    if len(titles) != B:
        raise ValueError(f"titles has {len(titles)} entries for {B} images")
    return [None if t is None else str(t) for t in titles]


def _cell_size(hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    (H, W), (rows, cols) = hw, grid
    if H % rows or W % cols:
        raise ValueError(f"images of {H}×{W} pixels do not split into grid_size {grid} patches "
                         f"(H must be a multiple of rows and W of cols)")
    return H // rows, W // cols
