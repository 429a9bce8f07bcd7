"""Where DCAL looks: rollout heatmaps, the GLCA-selected patches, and PWCA's attention on the paired image.

* `rollout_heatmap` turns a rollout (one score per patch, optionally behind prefix tokens) into a map
  upsampled to the image; `plot_rollout` / `plot_compare` draw it over the (un-normalised) images with the
  selected patches and the known part / distractor boxes.
* `pwca_distractor_mass` asks the model for its PWCA attention (`DCAL.forward(..., pwca_attention=True)`)
  and measures, per block, how much of image 1's softmax attention goes to image 2's keys (0.5 exactly for a
  self-pair).
* `RolloutCallback` writes the selection statistics into each eval record and saves a probe-batch figure;
  the rollout comes from a ``rollout_fn(model, images)``: `dcal_rollout` for a `dcal.DCAL` (the default),
  `diagnostics.vit_rollout` for a timm ViT, or the user's own.

Plotting helpers are pure: arrays or tensors in, validated, a new `matplotlib.figure.Figure` out (not
registered with pyplot, so nothing accumulates when a callback draws one per evaluation).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torch import Tensor

from dcal.callbacks import Callback
from dcal.metrics import hits, patches_in_boxes
from dcal.model import DCAL, eval_mode, fused_probs

from .figures import png_bytes
from .selection import selection_stats

__all__ = [
    "rollout_heatmap",
    "plot_rollout",
    "plot_compare",
    "pwca_distractor_mass",
    "plot_pwca_mass",
    "RolloutCallback",
    "dcal_rollout",
    "rollout_of",
    "model_grid",
]

SELECTED_COLOR = "cyan"
PART_COLOR = "lime"
DISTRACTOR_COLOR = "red"


# --------------------------------------------------------------------------------------------- validation
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


# --------------------------------------------------------------------------------------------- heatmaps
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


# --------------------------------------------------------------------------------------------- PWCA
@torch.no_grad()
def pwca_distractor_mass(model: DCAL, x: Tensor, pair_index: Tensor) -> dict[str, Tensor]:
    """Per PWCA block, the share of image 1's attention that falls on image 2's keys.

    Asks the model: ``model(x, pair_index, pwca_attention=True)`` in eval mode (no dropout, no drop-path),
    fp32, without gradients, returns the head-mean PWCA weights of every block, a softmax over [K1; K2]
    (2N keys); the mass is the sum of a row over the second half. The training flag is restored afterwards
    and no parameter is touched.

    Args:
        model: a `dcal.DCAL` (PWCA need not be enabled: the stream has no parameters).
        x: (B, C, H, W) images 1.
        pair_index: (B,) long, image 2 of row b is ``x[pair_index[b]]`` (the model checks it). ``arange(B)``
            (self-pairs) gives exactly 0.5 at every block.

    Returns:
        ``{"all": (B, L), "cls": (B, L)}``: the mass averaged over heads and all query tokens, and over
        heads for the CLS query alone.
    """
    if not isinstance(model, DCAL):
        raise TypeError(f"model must be a dcal.DCAL, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) Tensor, got {getattr(x, 'shape', type(x).__name__)}")
    dev = next(model.parameters()).device
    with eval_mode(model), torch.autocast(dev.type, enabled=False):
        out = model(x.to(dev).float(), pair_index.to(dev) if isinstance(pair_index, Tensor) else pair_index,
                    pwca_attention=True)
    N = out.pwca_attention[0].shape[1]
    m = torch.stack([w[..., N:].sum(dim=-1) for w in out.pwca_attention], dim=1)  # (B, L, N): mass per query
    return {"all": m.mean(dim=-1).cpu(), "cls": m[..., 0].cpu()}  # CLS is token 0 in timm ViTs


def plot_pwca_mass(mass, *, ax_title: str | None = None) -> Figure:
    """Attention mass on the paired image per PWCA block: batch mean with its min–max band.

    Args:
        mass: the dict from `pwca_distractor_mass`, or one (B, L) / (L,) tensor or array.
    """
    series = mass if isinstance(mass, dict) else {"mass": mass}
    if not series:
        raise ValueError("mass is an empty dict")
    labels = {"all": "all queries", "cls": "CLS query"}
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    L = None
    for name, m in series.items():
        t = _as_tensor(m, f"mass[{name!r}]").float()
        if t.dim() == 1:
            t = t.unsqueeze(0)  # (1, L)
        if t.dim() != 2 or t.shape[1] < 1:
            raise ValueError(f"mass[{name!r}] must be (B, L) or (L,), got {tuple(t.shape)}")
        if L is not None and t.shape[1] != L:
            raise ValueError(f"mass[{name!r}] has {t.shape[1]} blocks, the other series {L}")
        L = t.shape[1]
        if not torch.isfinite(t).all() or bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"mass[{name!r}] must hold fractions in [0, 1]")
        xs = np.arange(L)
        (line,) = ax.plot(xs, t.mean(dim=0).numpy(), marker="o", label=labels.get(name, name))
        if t.shape[0] > 1:
            ax.fill_between(xs, t.min(dim=0).values.numpy(), t.max(dim=0).values.numpy(), alpha=0.2,
                            color=line.get_color())
    ax.axhline(0.5, color="gray", ls=":", lw=1, label="0.5 (self-pair)")
    ax.set_ylim(0, 1)
    ax.set_xticks(np.arange(L))
    ax.set_xlabel("PWCA block")
    ax.set_ylabel("attention mass on image 2")
    ax.set_title(ax_title or "PWCA: share of attention on the paired image", fontsize=9)
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------- rollout_fn
def _require_dcal(model: Any) -> None:
    if not isinstance(model, DCAL):
        raise TypeError(f"the default rollout_fn needs a dcal.DCAL, got {type(model).__name__}: pass "
                        "rollout_fn=diagnostics.vit_rollout for a timm ViT, or your own rollout_fn(model, images)")


def dcal_rollout(model: DCAL, images: Tensor) -> dict[str, Tensor]:
    """The default ``rollout_fn``: a `dcal.DCAL`'s own rollout (B, P), its GLCA selection (B, k) and its fused
    prediction (B,), in eval mode without gradients (the training flag restored)."""
    _require_dcal(model)
    dev = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        out = model(images.to(dev))
    return {"rollout": out.rollout.float().cpu(), "local_index": out.local_index.cpu(),
            "pred": fused_probs(out.sa_logits, out.glca_logits).argmax(-1).cpu()}


def model_grid(model: Any, grid_size: Sequence[int] | None = None) -> tuple[int, int]:
    """The patch grid (rows, cols): `grid_size` if given, else the model's (``grid_size`` of a `dcal.DCAL`,
    ``patch_embed.grid_size`` of a timm ViT)."""
    if grid_size is None:
        grid_size = getattr(model, "grid_size", None) or getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid_size is None:
        raise ValueError(f"{type(model).__name__} has no grid_size or patch_embed.grid_size: pass grid_size=(rows, cols)")
    return _check_grid(grid_size)


def rollout_of(rollout_fn: Callable, model: Any, images: Tensor, grid: tuple[int, int], k: int) -> dict[str, Tensor]:
    """Call ``rollout_fn(model, images)`` and check what it returns: a (B, P) Tensor, or a mapping with
    ``rollout`` (B, P) and optionally ``local_index`` (B, k) and ``pred`` (B,). Returns all three, the
    selection defaulting to the top-k of the rollout, ``pred`` None when not given."""
    res = rollout_fn(model, images)
    if isinstance(res, Tensor):
        res = {"rollout": res}
    if not isinstance(res, Mapping) or not isinstance(res.get("rollout"), Tensor):
        raise TypeError(f"rollout_fn must return a (B, P) Tensor or a mapping with a 'rollout' Tensor, got "
                        f"{type(res).__name__}")
    B, P = images.shape[0], grid[0] * grid[1]
    r = res["rollout"].detach().float().cpu()
    if tuple(r.shape) != (B, P):
        raise ValueError(f"rollout_fn returned a rollout of shape {tuple(r.shape)}; expected ({B}, {P}) for {B} "
                         f"images on a {grid[0]}×{grid[1]} grid (prefix tokens dropped)")
    index = res.get("local_index")
    index = r.topk(min(k, P), dim=1, sorted=True).indices if index is None else index.cpu()
    pred = res.get("pred")
    return {"rollout": r, "local_index": index, "pred": None if pred is None else pred.cpu()}


# --------------------------------------------------------------------------------------------- callback
class RolloutCallback(Callback):
    """Selection statistics in every eval record, and a probe-batch rollout figure per evaluation.

    Statistics: from ``trainer.eval_outputs`` (concatenated over the eval set) when they hold
    ``local_index`` (n, k) and ``rollout`` (n, P), as the trainer's evaluation of a `dcal.DCAL` does;
    ``part_mask`` / ``distractor_mask`` (n, P) bool optional (computed from ``part_box`` /
    ``distractor_boxes`` when only those are present; ignored, as by the trainer, unless every image has at
    least one such patch). Without them, when a ``rollout_fn`` was given, from the probe images' rollout.
    Writes ``part_hit`` (unless the trainer set it), ``part_hit_chance``, ``distractor_hit``,
    ``selection_jaccard``, ``selection_static`` and ``rollout_figure`` into ``trainer.eval_record`` (fields
    already set to a non-null value are kept). The figure shows ``rollout_fn``'s rollout and selection on
    the probe images.

    Args:
        probe_batch: dict with ``image`` (n, C, H, W) and optionally ``part_box``, ``distractor_boxes``,
            ``label``; used when ``eval_outputs`` holds no ``image``.
        every: save a figure every ``every`` evaluations (the statistics are written at every one).
        out_dir: folder for the figures; default ``<trainer.out_dir>/figures``.
        num_images: probe images drawn (the first ones of the eval set / probe batch).
        rollout_fn: ``rollout_fn(model, images)`` → (B, P) patch scores, or a mapping with ``rollout`` and
            optionally ``local_index`` and ``pred`` (see `rollout_of`); default `dcal_rollout` (a `dcal.DCAL`'s
            own). `diagnostics.vit_rollout` serves a timm ViT.
        grid_size: (rows, cols) of the patch grid; default the model's (`model_grid`).
        ratio: the share of patches a selection keeps when ``rollout_fn`` gives none: k = max(1, floor(ratio·P));
            default the model's ``glca_ratio``, else 0.1.
    """

    order = 10  # before the metrics logger, which runs last and writes the record

    def __init__(self, probe_batch: dict | None = None, every: int = 1, out_dir: str | Path | None = None,
                 num_images: int = 8, *, rollout_fn: Callable | None = None, grid_size: Sequence[int] | None = None,
                 ratio: float | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"RolloutCallback: every must be a positive int, got {every!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"RolloutCallback: num_images must be a positive int, got {num_images!r}")
        if probe_batch is not None and "image" not in probe_batch:
            raise ValueError(f"RolloutCallback: probe_batch needs an 'image' entry, got keys {sorted(probe_batch)}")
        if rollout_fn is not None and not callable(rollout_fn):
            raise TypeError(f"RolloutCallback: rollout_fn must be callable, got {type(rollout_fn).__name__}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"RolloutCallback: ratio must be in (0, 1], got {ratio!r}")
        self.probe_batch = probe_batch
        self.every = every
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.num_images = num_images
        self.rollout_fn = rollout_fn
        self.grid_size = None if grid_size is None else _check_grid(grid_size)
        self.ratio = ratio
        self._evals = 0

    def after_eval(self, trainer) -> None:
        model = trainer.model
        if self.rollout_fn is None:
            _require_dcal(model)
        grid = model_grid(model, self.grid_size)
        P = grid[0] * grid[1]
        outs = getattr(trainer, "eval_outputs", None) or {}
        probe = None
        if self.rollout_fn is not None and (outs.get("local_index") is None or outs.get("rollout") is None):
            probe = self._probe(trainer, grid)
            src = {k: v for k, v in probe.items() if k not in ("image", "label", "pred")}
        else:
            src = self._eval_outputs(outs, P)
        patch = self._patch_size(model, grid, src, outs)
        stats = selection_stats(src["local_index"].cpu(), P, self._mask(src, "part", grid, patch),
                                self._mask(src, "distractor", grid, patch))
        rec = trainer.eval_record
        for key in ("part_hit", "part_hit_chance", "distractor_hit", "selection_jaccard", "selection_static"):
            if rec.get(key) is None:
                rec[key] = stats[key]
        self._evals += 1
        if (self._evals - 1) % self.every == 0:
            rec["rollout_figure"] = str(self._save_figure(trainer, probe or self._probe(trainer, grid), grid))

    @staticmethod
    def _eval_outputs(outs: dict, P: int) -> dict:
        if not outs:
            raise ValueError("RolloutCallback: trainer.eval_outputs is empty; the eval must collect "
                             "'local_index' and 'rollout' for this callback (or give it a rollout_fn)")
        missing = [k for k in ("local_index", "rollout") if outs.get(k) is None]
        if missing:
            raise ValueError(f"RolloutCallback: trainer.eval_outputs lacks {missing} (has {sorted(outs)})")
        index, rollout = outs["local_index"], outs["rollout"]
        if rollout.dim() != 2 or rollout.shape[1] != P or rollout.shape[0] != index.shape[0]:
            raise ValueError(f"RolloutCallback: eval_outputs['rollout'] has shape {tuple(rollout.shape)}, expected "
                             f"({index.shape[0]}, {P}) to match local_index {tuple(index.shape)} and the "
                             f"model's {P} patches")
        return outs

    @staticmethod
    def _patch_size(model, grid: tuple[int, int], src: dict, outs: dict) -> tuple[int, int] | None:
        """Patch size in pixels (for boxes → patch masks): the model's, else the images' size over the grid."""
        patch = getattr(model, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is not None:
            return tuple(int(v) for v in patch)
        images = src.get("image", outs.get("image"))
        if images is None:
            return None
        return _cell_size(tuple(images.shape[-2:]), grid)

    @staticmethod
    def _mask(src: dict, which: str, grid: tuple[int, int], patch) -> Tensor | None:
        """The (n, P) mask, or None when unknown or when some image has no such patch (as the trainer does:
        a hit-rate is reported only when every evaluated image has the part / a distractor)."""
        n = len(src["local_index"])
        mask = src.get(f"{which}_mask")
        if mask is None:
            boxes = src.get("part_box" if which == "part" else "distractor_boxes")
            if boxes is None or len(boxes) != n or patch is None:  # the trainer keeps boxes for the probe images only
                return None
            mask = patches_in_boxes(boxes.cpu(), grid, patch)
        mask = mask.cpu()
        return mask if mask.dim() == 2 and bool(mask.any(dim=1).all()) else None

    def _probe(self, trainer, grid: tuple[int, int]) -> dict:
        """The probe images (and their boxes and labels) with ``rollout_fn``'s rollout, selection, prediction."""
        outs = getattr(trainer, "eval_outputs", None) or {}
        src = outs if outs.get("image") is not None else self.probe_batch
        if src is None:
            raise ValueError("RolloutCallback: no probe images: trainer.eval_outputs has no 'image' and no "
                             "probe_batch was given")
        n = min(self.num_images, len(src["image"]))
        probe = {k: src[k][:n] for k in ("image", "part_box", "distractor_boxes", "label") if src.get(k) is not None}
        model = trainer.model
        ratio = self.ratio or getattr(model, "glca_ratio", None) or 0.1
        k = max(1, math.floor(ratio * grid[0] * grid[1]))
        probe.update(rollout_of(self.rollout_fn or dcal_rollout, model, probe["image"], grid, k))
        return probe

    def _save_figure(self, trainer, probe: dict, grid: tuple[int, int]) -> Path:
        model = trainer.model
        images, index = probe["image"], probe["local_index"]
        patch = self._patch_size(model, grid, probe, {})
        hit = None
        if probe.get("part_box") is not None and patch is not None:
            hit = hits(index, patches_in_boxes(probe["part_box"].cpu(), grid, patch))
        titles = []
        for i in range(len(images)):
            t = f"#{i}" if probe.get("pred") is None else f"#{i} pred {int(probe['pred'][i])}"
            if probe.get("label") is not None:
                t += f" / y {int(probe['label'][i])}"
            if hit is not None:
                t += " · hit" if bool(hit[i]) else " · miss"
            titles.append(t)
        cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", None) or {}
        fig = plot_rollout(images, probe["rollout"], grid, local_index=index, part_boxes=probe.get("part_box"),
                           distractor_boxes=probe.get("distractor_boxes"), titles=titles, mean=cfg.get("mean"),
                           std=cfg.get("std"))
        step = int(getattr(trainer, "step", 0) or 0)
        fig.suptitle(f"rollout and selected patches, step {step}", fontsize=9)
        folder = self.out_dir if self.out_dir is not None else Path(trainer.out_dir) / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rollout_step{step:06d}.png"
        path.write_bytes(png_bytes(fig, dpi=90))
        return path
