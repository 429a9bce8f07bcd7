"""Where rollouts come from: ``rollout_fn(model, images)`` (`dcal_rollout` for a `dcal.DCAL`), the model's
patch grid, and the top-k selection taken from a rollout (`rollout_of`)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dcal.model import DCAL, eval_mode, fused_probs

from .checks import _check_grid


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
