"""The sample dict every dataset of :mod:`dcal.data` returns, built in one place so all agree.

A sample is ``{"image": FloatTensor (3, H, W), "label": int, "part_box": FloatTensor (4,),
"distractor_boxes": FloatTensor (M, 4), "index": int}``. Boxes are ``x0, y0, x1, y1`` in pixels of the
*transformed* image; an unknown box is a row of NaN. ``M`` is fixed per dataset (padding rows are NaN),
so PyTorch's default collate stacks samples without help.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["build_sample", "BoxTransform"]

# (image: PIL.Image | uint8 HWC ndarray | tensor, boxes: FloatTensor (K, 4)) -> (FloatTensor (3, H, W), boxes),
# e.g. `dcal.data.transforms.BoxAware` around a torchvision v2 pipeline.
BoxTransform = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_sample(transform: BoxTransform, image: Any, label: int, part_box: np.ndarray,
                 distractor_boxes: np.ndarray, index: int) -> dict[str, Any]:
    """Run the transform on the image and all boxes together, and pack the sample dict.

    Args:
        transform: a box-aware transform (see :mod:`dcal.data.transforms`).
        image: PIL image or uint8 (H, W, 3) array.
        label: class index, 0-based.
        part_box: (4,) float, NaN if unknown.
        distractor_boxes: (M, 4) float, NaN rows for padding; M may be 0.
        index: position of the sample in its dataset.
    """
    part = np.asarray(part_box, dtype=np.float32).reshape(1, 4)  # (1, 4)
    dist = np.asarray(distractor_boxes, dtype=np.float32).reshape(-1, 4)  # (M, 4)
    boxes = torch.from_numpy(np.concatenate([part, dist], axis=0))  # (1 + M, 4): one geometry for all
    img, boxes = transform(image, boxes)
    return {
        "image": img,
        "label": int(label),
        "part_box": boxes[0].clone(),
        "distractor_boxes": boxes[1:].clone(),
        "index": int(index),
    }
