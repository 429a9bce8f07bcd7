"""FGVC transforms that move boxes with the pixels (DCAL_METHOD.md §7), on torchvision's v2 transforms.

torchvision's `transforms.v2` carries `tv_tensors.BoundingBoxes` through the same geometry as the image:
resize scales them, crop shifts and clips them to the crop, horizontal flip mirrors x. `BoxAware` adapts a
v2 pipeline to the call every dcal dataset makes, ``(image, boxes (K, 4)) -> (image, boxes)``, with boxes
``x0, y0, x1, y1`` in pixels; NaN boxes (unknown) stay NaN.

* train: square resize to ``resize_size`` x ``resize_size`` (aspect ratio NOT kept: the paper's
  "resize to 550" is read as a square resize, like most public FGVC code), random crop ``crop_size``,
  horizontal flip (p = 0.5), normalise with ``mean``/``std``;
* test: square resize to ``resize_size``, centre crop ``crop_size``, normalise.

Randomness comes from torch's global RNG, so seeding torch (and DataLoader worker seeding) makes runs
reproducible. A resize to the image's own size is skipped by torchvision (resampling would only blur).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_float_tensor", "BoxAware", "build_transforms", "default_transform"]

# timm's IMAGENET_DEFAULT_MEAN/STD; pass the backbone's own pretrained_cfg values when they differ.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_tensor(image: Any) -> Tensor:
    """PIL image, uint8 (H, W, 3) array or (3, H, W) tensor -> float (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))  # a writable copy: torch refuses read-only buffers
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got {tuple(image.shape)}")
        return image.float().div(255.0) if image.dtype == torch.uint8 else image.float()
    raise TypeError(f"unsupported image type {type(image).__name__}")


class BoxAware:
    """``(image, boxes (K, 4)) -> (FloatTensor (3, H, W), boxes (K, 4))`` through a torchvision v2 pipeline.

    Args:
        transform: a v2 transform (or `v2.Compose`) applied to the image (a float `tv_tensors.Image` in
            [0, 1]) and the boxes (`tv_tensors.BoundingBoxes`, XYXY, on the image's canvas) together.
    """

    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        img = tv_tensors.Image(to_float_tensor(image))
        bb = tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY", canvas_size=tuple(img.shape[-2:]))
        img, bb = self.transform(img, bb)
        return img.as_subclass(Tensor), bb.as_subclass(Tensor)

    def __repr__(self) -> str:
        return f"BoxAware({self.transform!r})"


def build_transforms(train: bool, resize_size: int, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, hflip_prob: float = 0.5) -> BoxAware:
    """The paper's FGVC pipeline, scaled by config.

    Args:
        train: random crop + flip if True, centre crop otherwise.
        resize_size: side of the SQUARE resize (550 in the paper; e.g. 72 or 64 for the 64 px benchmark).
        crop_size: side of the crop fed to the network (448 in the paper); must be <= resize_size.
        mean, std: normalisation, the backbone's pretrained values.
        hflip_prob: flip probability for training.

    Returns:
        A `BoxAware` callable ``(image, boxes (K, 4)) -> (FloatTensor (3, crop, crop), boxes (K, 4))``.
    """
    if crop_size > resize_size:
        raise ValueError(f"crop_size ({crop_size}) must be <= resize_size ({resize_size})")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values, got mean={mean} std={std}")
    ops: list[v2.Transform] = [v2.Resize((resize_size, resize_size), interpolation=v2.InterpolationMode.BILINEAR,
                                         antialias=True)]
    if train:
        ops += [v2.RandomCrop(crop_size), v2.RandomHorizontalFlip(hflip_prob)]
    else:
        ops += [v2.CenterCrop(crop_size)]
    ops.append(v2.Normalize([float(m) for m in mean], [float(s) for s in std]))
    return BoxAware(v2.Compose(ops))


def default_transform() -> BoxAware:
    """What datasets use when given no transform: float tensor in [0, 1], no geometry change."""
    return BoxAware(v2.Identity())
