"""Generic FGVC image folders: ``root/train/<class>/*.jpg`` and ``root/test/<class>/*`` (or ``root/val``),
on torchvision's `DatasetFolder` (its scan, sorting and ``samples``/``targets``).

Classes are the sorted union of the class folder names of both splits (hidden folders excluded), so labels
agree between the train and test datasets. No boxes are known: ``part_box`` is NaN and there are no
distractor boxes (M = 0). Files with other extensions (e.g. ``.txt``, ``.DS_Store``) are ignored and
counted in the log; an image file directly under the split folder (no class) is an error, and so is an
unreadable image (named), unless ``skip_bad_images``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import DatasetFolder

from .cub import load_rgb
from .errors import DatasetError
from .sample import BoxTransform, build_sample
from .transforms import default_transform
from .validate import check_image

__all__ = ["ImageFolderFGVC", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_default_logger = logging.getLogger("dcal.data")


def _split_dir(root: Path, split: str, log: logging.Logger) -> Path:
    """The folder of ``split``; "test" falls back to "val" only when there is no "test" folder (logged)."""
    d = root / split
    if d.is_dir():
        return d
    if split == "test" and (root / "val").is_dir():
        log.info("%s: no 'test' folder, using 'val' as the test split", root)
        return root / "val"
    raise DatasetError(f"{d}: split folder is missing" + (" (and there is no 'val' folder)" if split == "test" else ""))


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load(path: str) -> Any:
    return load_rgb(Path(path), path)


class ImageFolderFGVC(DatasetFolder):
    """One split of an image-folder dataset, validated on construction.

    Args:
        root: folder holding ``train/`` and ``test/`` (or ``val/``), each with one folder per class.
        split: "train" or "test".
        transform: box-aware transform (default: float tensor in [0, 1]).
        skip_bad_images: drop unreadable images (listed in ``self.skipped`` and logged) instead of raising.
        logger: where skipped/ignored files are reported (default ``logging.getLogger("dcal.data")``).
        check_images: "load" (full decode at construction), "verify" or "exists".
    """

    def __init__(self, root: str | Path, split: str = "train", transform: BoxTransform | None = None,
                 skip_bad_images: bool = False, logger: logging.Logger | None = None, check_images: str = "load"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self._log = logger or _default_logger
        dataset_root = Path(root)
        if not dataset_root.is_dir():
            raise DatasetError(f"{dataset_root}: dataset root is not a directory")
        split_dir = _split_dir(dataset_root, split, self._log)
        splits = [d for d in (dataset_root / s for s in ("train", "test", "val")) if d.is_dir()]
        self.class_names = sorted({c for d in splits for c in _class_dirs(d)})
        if not self.class_names:
            raise DatasetError(f"{dataset_root}: no class folders under {[d.name for d in splits]}")
        stray = [p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if stray:
            raise DatasetError(f"{stray[0]}: image file directly under {split_dir} (not in a class folder)")
        self.skipped: list[tuple[str, str]] = []
        self._ignored, self._skip, self._check = 0, skip_bad_images, check_images
        super().__init__(split_dir, loader=_load, is_valid_file=self._usable, allow_empty=True)
        self.root, self.split = dataset_root, split  # DatasetFolder keeps the split folder as its root
        self._report(split_dir)
        self.num_classes = len(self.class_names)
        self.paths = [Path(p) for p, _ in self.samples]
        self._labels = np.array(self.targets, np.int64)
        self.transform = transform if transform is not None else default_transform()

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """The classes of both splits (torchvision would take this split's folders only)."""
        return self.class_names, {c: i for i, c in enumerate(self.class_names)}

    def _usable(self, path: str) -> bool:
        """`DatasetFolder`'s file filter: other extensions are ignored; an unreadable image raises
        DatasetError naming it (or is skipped and listed with ``skip_bad_images``)."""
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            self._ignored += 1
            return False
        reason = check_image(Path(path), self._check)
        if reason is None:
            return True
        if not self._skip:
            raise DatasetError(f"{path}: image file {reason}")
        self._log.warning("skipping %s: image file %s", path, reason)
        self.skipped.append((path, reason))
        return False

    def _report(self, split_dir: Path) -> None:
        if self._ignored:
            self._log.info("%s: ignored %d non-image entries", split_dir, self._ignored)
        if self.skipped:
            self._log.warning("skipped %d unreadable images under %s", len(self.skipped), split_dir)
        if not self.samples:
            raise DatasetError(f"{split_dir}: no readable images")

    @property
    def labels(self) -> np.ndarray:
        """(len,) int64 labels in dataset order."""
        return self._labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        return build_sample(self.transform, self.loader(path), label, np.full(4, np.nan, np.float32),
                            np.zeros((0, 4), np.float32), i)
