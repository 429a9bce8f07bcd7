"""Load a local timm checkpoint into a timm VisionTransformer, the way timm's own pretrained loading does.

The file may be ``.safetensors`` or a torch pickle (``.pth``/``.pt``/``.bin``), a bare state dict or one
wrapped under ``model``/``state_dict``/``model_ema``. timm's `checkpoint_filter_fn` remaps old key layouts
and resamples the position embedding to the model's grid; a classifier head whose shape does not match is
dropped (the model keeps its fresh head), as `timm.create_model(..., num_classes=...)` does.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError

__all__ = ["read_state_dict", "load_pretrained"]

_WRAPPERS = ("state_dict", "model", "model_ema", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch file, raising CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupt files surface as many exception types; re-raise with the file
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e}); "
                              "the file is truncated, corrupt or not a checkpoint") from e
    for key in _WRAPPERS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the timm checkpoint at `path` into the timm ViT `model` (in place).

    Raises:
        CheckpointError naming the file and the offending keys when it does not fit the model.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = read_state_dict(path)
    try:
        sd = checkpoint_filter_fn(sd, model)  # key remaps + position-embedding resampling
    except Exception as e:
        raise CheckpointError(f"{path}: timm's checkpoint filter failed ({type(e).__name__}: {e})") from e
    own = model.state_dict()
    dropped = []
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    head_keys = {n for n, p in model.named_parameters() if id(p) in head_ids}
    for k in list(sd):
        if k in head_keys and k in own and sd[k].shape != own[k].shape:
            dropped.append(k)
            del sd[k]
    missing = [k for k in own if k not in sd and k not in dropped]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' …' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}")
        if mismatched:
            parts.append(f"shape mismatch {mismatched[:6]}")
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)
