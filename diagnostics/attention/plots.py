"""Rollout heatmaps over the images, with the GLCA-selected patches and the part / distractor boxes
(`rollout_heatmap`, `plot_rollout`, `plot_compare`); pure: arrays in, a new Figure out."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from .checks import (
    _as_tensor,
    _cell_size,
    _check_boxes,
    _check_grid,
    _check_images,
    _check_index,
    _check_rollout,
    _check_titles,
)

SELECTED_COLOR = "cyan"
PART_COLOR = "lime"
DISTRACTOR_COLOR = "red"


def rollout_heatmap(
    rollout,
    grid_size: tuple[int, int],
    image_size: tuple[int, int] | None = None,
    *,
    num_prefix_tokens: int = 0,
    mode: str = "bilinear",
) -> np.ndarray:
    """The rollout as a map over the image.

    Args:
        rollout: (P,) or (B, P) patch scores in timm's row-major token order, or a full token row
            (prefix + P) with ``num_prefix_tokens`` > 0 (the prefix columns are dropped).
        grid_size: (rows, cols) of the patch grid (non-square grids allowed).
        image_size: (H, W) to upsample to; None keeps the (rows, cols) grid.
        num_prefix_tokens: CLS (+ register/distillation) tokens in front of the patches.
        mode: `torch.nn.functional.interpolate` mode (``"bilinear"``, ``"nearest"``, ``"bicubic"``).

    Returns:
        float32 array (H, W) for a 1-D rollout, (B, H, W) for a 2-D one. Values are the rollout's own
        (not re-normalised).
    """
    grid = _check_grid(grid_size)
    single = _as_tensor(rollout, "rollout").dim() == 1
    maps = _check_rollout(rollout, grid, num_prefix_tokens).unsqueeze(1)  # (B, 1, rows, cols)
    if image_size is not None:
        try:
            H, W = (int(v) for v in image_size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"image_size must be (H, W), got {image_size!r}") from e
        if H < 1 or W < 1:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
        maps = F.interpolate(maps, size=(H, W), mode=mode, align_corners=align)  # (B, 1, H, W)
    out = maps[:, 0].numpy().astype(np.float32)  # (B, H, W)
    return out[0] if single else out


def _unit(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] for display (a constant map becomes zeros)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _draw_panel(ax, img, heat, cells, cell_hw, part, distractor, title, alpha, cmap) -> None:
    H, W = img.shape[:2]
    ext = (0, W, H, 0)  # pixel edges at integers: the coordinates of dcal.metrics' boxes
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              extent=ext, interpolation="nearest")
    ax.imshow(_unit(heat), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, extent=ext, interpolation="nearest")
    if cells is not None:
        ph, pw = cell_hw
        cols = W // pw
        for p in cells:
            r, c = divmod(int(p), cols)
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor=SELECTED_COLOR, lw=1.0,
                                   gid="selected"))
    for boxes, color, style, gid in ((part, PART_COLOR, "-", "part"), (distractor, DISTRACTOR_COLOR, "--",
                                                                         "distractor")):
        if boxes is None:
            continue
        for x0, y0, x1, y1 in boxes:
            if np.isnan([x0, y0, x1, y1]).all():
                continue  # padding row
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=1.8,
                                   linestyle=style, gid=gid))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _legend(fig: Figure, selected: bool, part: bool, distractor: bool) -> None:
    handles = []
    if selected:
        handles.append(Line2D([], [], color=SELECTED_COLOR, lw=2, label="GLCA-selected patches"))
    if part:
        handles.append(Line2D([], [], color=PART_COLOR, lw=2, label="part box"))
    if distractor:
        handles.append(Line2D([], [], color=DISTRACTOR_COLOR, lw=2, ls="--", label="distractor"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def plot_rollout(
    images,
    rollout,
    grid_size: tuple[int, int],
    *,
    local_index=None,
    part_boxes=None,
    distractor_boxes=None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_prefix_tokens: int = 0,
    alpha: float = 0.5,
    cmap: str = "inferno",
    panel_size: float = 2.4,
) -> Figure:
    """Each image with its rollout heatmap, the GLCA-selected patches and the known boxes, as a grid.

    Args:
        images: (B, C, H, W) or (C, H, W) network inputs; un-normalised with ``mean``/``std`` when given.
        rollout: (B, P) or (P,) patch scores (or prefix + P with ``num_prefix_tokens``).
        grid_size: (rows, cols); H and W must be multiples of rows and cols.
        local_index: (B, k) selected patch indices, outlined in cyan.
        part_boxes: (B, 4) or (B, M, 4) part boxes in input pixels (green); NaN rows are padding.
        distractor_boxes: (B, M, 4) distractor boxes (red, dashed).
        titles: one per image.
        ncols: panels per row.
    """
    grid = _check_grid(grid_size)
    imgs = _check_images(images, mean, std)  # (B, H, W, C)
    B, H, W = imgs.shape[:3]
    cell = _cell_size((H, W), grid)
    heat = rollout_heatmap(_check_rollout(rollout, grid, num_prefix_tokens).reshape(-1, grid[0] * grid[1]),
                           grid, (H, W))  # (B', H, W)
    if heat.shape[0] != B:
        raise ValueError(f"rollout has {heat.shape[0]} rows for {B} images")
    idx = _check_index(local_index, B, grid[0] * grid[1])
    part = _check_boxes(part_boxes, B, "part_boxes")
    dis = _check_boxes(distractor_boxes, B, "distractor_boxes")
    titles = _check_titles(titles, B)
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    ncols = min(ncols, B)
    nrows = math.ceil(B / ncols)
    aspect = H / W
    fig = Figure(figsize=(panel_size * ncols, panel_size * aspect * nrows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    for i, ax in enumerate(axes):
        if i >= B:
            ax.set_axis_off()
            continue
        _draw_panel(ax, imgs[i], heat[i], None if idx is None else idx[i], cell,
                    None if part is None else part[i], None if dis is None else dis[i], titles[i], alpha, cmap)
    _legend(fig, idx is not None, part is not None, dis is not None)
    return fig


def plot_compare(
    images,
    rollout_a,
    rollout_b,
    grid_size: tuple[int, int],
    *,
    local_index_a=None,
    local_index_b=None,
    part_boxes=None,
    distractor_boxes=None,
    labels: tuple[str, str] = ("SA-only", "DCAL"),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_prefix_tokens: int = 0,
    alpha: float = 0.5,
    cmap: str = "inferno",
    panel_size: float = 2.4,
) -> Figure:
    """Two models' rollouts (and selections) side by side: one row per image, columns ``labels``."""
    grid = _check_grid(grid_size)
    imgs = _check_images(images, mean, std)  # (B, H, W, C)
    B, H, W = imgs.shape[:3]
    cell = _cell_size((H, W), grid)
    if len(labels) != 2:
        raise ValueError(f"labels must name the two rollouts, got {labels!r}")
    P = grid[0] * grid[1]
    heats, idxs = [], []
    for r, li, tag in ((rollout_a, local_index_a, "a"), (rollout_b, local_index_b, "b")):
        h = rollout_heatmap(_check_rollout(r, grid, num_prefix_tokens, f"rollout_{tag}").reshape(-1, P), grid,
                            (H, W))  # (B', H, W)
        if h.shape[0] != B:
            raise ValueError(f"rollout_{tag} has {h.shape[0]} rows for {B} images")
        heats.append(h)
        idxs.append(_check_index(li, B, P, f"local_index_{tag}"))
    part = _check_boxes(part_boxes, B, "part_boxes")
    dis = _check_boxes(distractor_boxes, B, "distractor_boxes")
    fig = Figure(figsize=(2 * panel_size, panel_size * H / W * B + 0.5), layout="constrained")
    axes = fig.subplots(B, 2, squeeze=False)
    for i in range(B):
        for j in range(2):
            title = labels[j] if i == 0 else None
            _draw_panel(axes[i, j], imgs[i], heats[j][i], None if idxs[j] is None else idxs[j][i], cell,
                        None if part is None else part[i], None if dis is None else dis[i], title, alpha, cmap)
        axes[i, 0].set_ylabel(f"#{i}", fontsize=8)
    _legend(fig, any(x is not None for x in idxs), part is not None, dis is not None)
    return fig
