"""Datasets for DCAL: the embedded synthetic fine-grained benchmark, CUB-200-2011, image folders.

Every dataset returns the same sample dict (see :mod:`dcal.data.sample`)::

    {"image": FloatTensor (3, H, W), "label": int, "part_box": FloatTensor (4,),
     "distractor_boxes": FloatTensor (M, 4), "index": int}

with boxes ``x0, y0, x1, y1`` in pixels of the transformed image (NaN when unknown).
"""
from .cub import CUB200, write_cub
from .errors import DatasetError
from .folder import ImageFolderFGVC
from .synthetic import (
    SyntheticData,
    SyntheticFGVC,
    SyntheticSpec,
    benchmark_stats,
    generate,
    load_or_generate,
)
from .transforms import build_transforms
from .validate import CUBReport, validate_cub

__all__ = [
    "SyntheticSpec", "SyntheticData", "generate", "load_or_generate", "SyntheticFGVC", "benchmark_stats",
    "write_cub", "CUB200", "ImageFolderFGVC", "build_transforms", "DatasetError", "validate_cub", "CUBReport",
]
