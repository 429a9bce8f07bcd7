"""`SyntheticFGVC`, the torch Dataset over a `SyntheticData` split, and `benchmark_stats`."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..sample import BoxTransform, build_sample
from ..transforms import default_transform
from .spec import SyntheticData


class SyntheticFGVC(Dataset):
    """Torch dataset over one split of a :class:`SyntheticData`.

    Samples are dicts (see :mod:`dcal.data.sample`); ``index`` is the position in this dataset and
    ``self.indices[index]`` the row in the arrays of ``data``.
    """

    def __init__(self, data: SyntheticData, split: str = "train", transform: BoxTransform | None = None):
        self.data = data
        self.split = split
        self.indices = data.split_indices(split)
        self.transform = transform if transform is not None else default_transform()
        self.num_classes = data.num_classes
        self.class_names = list(data.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = int(self.indices[i])
        d = self.data
        return build_sample(self.transform, d.images[g], int(d.labels[g]), d.part_boxes[g], d.distractor_boxes[g], i)

    @property
    def labels(self) -> np.ndarray:
        """(len,) int64 labels of this split, in dataset order."""
        return self.data.labels[self.indices]


def benchmark_stats(data: SyntheticData) -> dict[str, Any]:
    """Sizes and box statistics of a dataset (for reports and sanity checks)."""
    H, W = data.images.shape[1:3]

    def area(b: np.ndarray) -> np.ndarray:
        return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) / float(H * W)

    part = area(data.part_boxes)
    return {
        "num_images": len(data), "num_train": int(data.is_train.sum()), "num_test": int((~data.is_train).sum()),
        "num_classes": data.num_classes, "image_size": (int(H), int(W)),
        "num_distractors": int(data.distractor_boxes.shape[1]),
        "part_area_fraction": {"mean": float(part.mean()), "min": float(part.min()), "max": float(part.max())},
        "object_area_fraction_mean": float(area(data.object_boxes).mean()),
        "train_class_counts": np.bincount(data.labels[data.is_train], minlength=data.num_classes).tolist(),
        "test_class_counts": np.bincount(data.labels[~data.is_train], minlength=data.num_classes).tolist(),
        "bytes": int(data.images.nbytes),
    }
