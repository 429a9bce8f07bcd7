"""Box-aware FGVC transforms (DCAL_METHOD.md §7).

Each transform takes ``(image, boxes)`` and returns ``(image, boxes)``, with ``boxes`` a float tensor
(K, 4) of ``x0, y0, x1, y1`` pixel boxes mapped through the same geometry as the pixels: resize scales,
crop shifts (and clips to the crop), horizontal flip mirrors x. NaN boxes (unknown) stay NaN.

* train: square resize to ``resize_size`` x ``resize_size`` (aspect ratio NOT kept: the paper's
  "resize to 550" is read as a square resize, like most public FGVC code), random crop ``crop_size``,
  horizontal flip (p = 0.5), normalise with ``mean``/``std``;
* test: square resize to ``resize_size``, centre crop ``crop_size``, normalise.

Randomness comes from torch's global RNG, so seeding torch (and DataLoader worker seeding) makes runs
reproducible. Pixel work uses ``torchvision.transforms.functional`` on float tensors in [0, 1].
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "to_float_tensor", "Compose", "ToTensor", "Resize", "RandomCrop",
    "CenterCrop", "RandomHorizontalFlip", "Normalize", "build_transforms", "default_transform",
]

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
        if not image.flags.writeable:
            image = image.copy()  # torch.from_numpy warns on read-only arrays
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got {tuple(image.shape)}")
        return image.float().div(255.0) if image.dtype == torch.uint8 else image.float()
    raise TypeError(f"unsupported image type {type(image).__name__}")


class Compose:
    """Apply box-aware transforms in order."""

    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        for t in self.transforms:
            image, boxes = t(image, boxes)
        return image, boxes

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class ToTensor:
    """Convert to a float (3, H, W) tensor in [0, 1]; boxes unchanged (cast to float32)."""

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        return to_float_tensor(image), boxes.float()

    def __repr__(self) -> str:
        return "ToTensor()"


class Resize:
    """Square resize to ``size`` x ``size`` (bilinear, antialiased); boxes scaled per axis."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        img = to_float_tensor(image)
        h, w = img.shape[-2:]
        if (h, w) == (self.size, self.size):
            return img, boxes.float()  # resampling to the same size would only blur
        img = TF.resize(img, [self.size, self.size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        scale = torch.tensor([self.size / w, self.size / h, self.size / w, self.size / h], dtype=torch.float32)
        return img, boxes.float() * scale

    def __repr__(self) -> str:
        return f"Resize({self.size})"


def _crop(img: Tensor, boxes: Tensor, top: int, left: int, size: int) -> tuple[Tensor, Tensor]:
    """Crop a size x size window; shift boxes and clip them to the window (may become zero-area)."""
    img = img[:, top:top + size, left:left + size]
    shift = torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = (boxes.float() - shift).clamp(0.0, float(size))  # NaN stays NaN through clamp
    return img, boxes


def _check_crop(img: Tensor, size: int) -> tuple[int, int]:
    h, w = img.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is larger than the image ({h}x{w}); resize_size must be >= crop_size")
    return h, w


class RandomCrop:
    """Uniformly random ``size`` x ``size`` crop (offsets from torch's RNG)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        img = to_float_tensor(image)
        h, w = _check_crop(img, self.size)
        top = int(torch.randint(0, h - self.size + 1, (1,)).item())
        left = int(torch.randint(0, w - self.size + 1, (1,)).item())
        return _crop(img, boxes, top, left, self.size)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class CenterCrop:
    """Centre ``size`` x ``size`` crop (offsets rounded like torchvision's center_crop)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        img = to_float_tensor(image)
        h, w = _check_crop(img, self.size)
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return _crop(img, boxes, top, left, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``: x0' = W - x1, x1' = W - x0."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        img = to_float_tensor(image)
        if torch.rand(1).item() >= self.p:
            return img, boxes.float()
        w = float(img.shape[-1])
        b = boxes.float()
        flipped = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)  # (K, 4)
        return TF.hflip(img), flipped

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """(x - mean) / std per channel; boxes unchanged."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values, got mean={mean} std={std}")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, image: Any, boxes: Tensor) -> tuple[Tensor, Tensor]:
        return TF.normalize(to_float_tensor(image), self.mean, self.std), boxes.float()

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_transforms(train: bool, resize_size: int, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, hflip_prob: float = 0.5) -> Compose:
    """The paper's FGVC pipeline, scaled by config.

    Args:
        train: random crop + flip if True, centre crop otherwise.
        resize_size: side of the SQUARE resize (550 in the paper; e.g. 72 or 64 for the 64 px benchmark).
        crop_size: side of the crop fed to the network (448 in the paper); must be <= resize_size.
        mean, std: normalisation, the backbone's pretrained values.
        hflip_prob: flip probability for training.

    Returns:
        A callable ``(image, boxes (K, 4)) -> (FloatTensor (3, crop, crop), boxes (K, 4))``.
    """
    if crop_size > resize_size:
        raise ValueError(f"crop_size ({crop_size}) must be <= resize_size ({resize_size})")
    ops: list[Any] = [ToTensor(), Resize(resize_size)]
    if train:
        ops += [RandomCrop(crop_size), RandomHorizontalFlip(hflip_prob)]
    else:
        ops += [CenterCrop(crop_size)]
    ops.append(Normalize(mean, std))
    return Compose(ops)


def default_transform() -> Compose:
    """What datasets use when given no transform: float tensor in [0, 1], no geometry change."""
    return Compose([ToTensor()])
