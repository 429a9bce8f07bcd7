"""Load a local timm checkpoint into a timm VisionTransformer with timm's own pretrained loading.

The model's `pretrained_cfg` is overlaid with ``file=PATH`` (what ``timm.create_model(...,
pretrained_cfg_overlay=dict(file=PATH))`` does) and `timm.models.load_pretrained` reads it: ``.safetensors``
or a torch file (``.pth``/``.pt``/``.bin``), bare or wrapped under ``state_dict``/``model``/``model_ema``;
the model family's `checkpoint_filter_fn` remaps old key layouts and resamples the position embedding to
the model's grid.

Two things are ours. A classifier head whose shape does not match the model is replaced by the model's
fresh head (as `timm.create_model(..., num_classes=...)` does), and the load stays strict: timm itself
turns strict loading off whenever it drops a head, which would let a checkpoint with missing blocks load
silently; here every missing, unexpected or mis-shaped key is a CheckpointError naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError

__all__ = ["load_pretrained"]


def _head_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _filter(path: Path, read: list[bool]):
    """timm's filter for the model's family, then: a mismatched head is replaced by the model's own."""
    def fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        read.append(True)  # timm read the file: an error from here on is a misfit, not a bad file
        import importlib

        family = importlib.import_module(type(model).__module__)
        sd = family.checkpoint_filter_fn(state_dict, model) if hasattr(family, "checkpoint_filter_fn") else state_dict
        own = model.state_dict()
        for k in _head_keys(model):
            if k in sd and sd[k].shape != own[k].shape:
                sd[k] = own[k]  # the fresh head, for a different number of classes
        return sd
    return fn


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the timm checkpoint at `path` into the timm ViT `model` (in place).

    Raises:
        CheckpointError naming the file: missing, unreadable (truncated, corrupt) or not fitting the model
        (timm's message lists the missing, unexpected and mis-shaped keys).
    """
    from timm.models import load_pretrained as timm_load_pretrained

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    num_classes = cfg.get("num_classes", getattr(model, "num_classes", 0))
    # custom_load would route the file to a model's own (e.g. JAX .npz) loader; the head is handled in _filter,
    # so timm is told the checkpoint has the model's class count and never drops it (nor relaxes strictness).
    cfg.update(file=str(path), custom_load=False, num_classes=num_classes, source="")
    in_chans = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", 3)
    read: list[bool] = []
    try:
        timm_load_pretrained(model, pretrained_cfg=cfg, num_classes=num_classes, in_chans=in_chans,
                             filter_fn=_filter(path, read), strict=True)
    except Exception as e:  # readers and load_state_dict raise many types; name the file and the phase
        if not read:
            raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e}); "
                                  "the file is truncated, corrupt or not a checkpoint") from e
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: {e}") from e
