"""Generic FGVC image folders: ``root/train/<class>/*.jpg`` and ``root/test/<class>/*`` (or ``root/val``).

Classes are the sorted union of the class folder names of both splits, so labels agree between the train
and test datasets. No boxes are known: ``part_box`` is NaN and there are no distractor boxes (M = 0).
Files with other extensions (e.g. ``.txt``, ``.DS_Store``) are ignored and counted in the log; an image
file directly under the split folder (no class) is an error.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

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


class ImageFolderFGVC(Dataset):
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
        log = logger or _default_logger
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root is not a directory")
        split_dir = _split_dir(self.root, split, log)
        other = [d for d in (self.root / s for s in ("train", "test", "val")) if d.is_dir()]
        self.class_names = sorted({c for d in other for c in _class_dirs(d)})
        if not self.class_names:
            raise DatasetError(f"{self.root}: no class folders under {[d.name for d in other]}")
        label_of = {c: i for i, c in enumerate(self.class_names)}
        self.num_classes = len(self.class_names)

        stray = [p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if stray:
            raise DatasetError(f"{stray[0]}: image file directly under {split_dir} (not in a class folder)")
        self.paths: list[Path] = []
        labels: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        ignored = 0
        for cls in _class_dirs(split_dir):
            for p in sorted((split_dir / cls).iterdir()):
                if not (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
                    ignored += 1
                    continue
                reason = check_image(p, check_images)
                if reason is not None:
                    if not skip_bad_images:
                        raise DatasetError(f"{p}: image file {reason}")
                    log.warning("skipping %s: image file %s", p, reason)
                    self.skipped.append((str(p), reason))
                    continue
                self.paths.append(p)
                labels.append(label_of[cls])
        if ignored:
            log.info("%s: ignored %d non-image entries", split_dir, ignored)
        if self.skipped:
            log.warning("skipped %d unreadable images under %s", len(self.skipped), split_dir)
        if not self.paths:
            raise DatasetError(f"{split_dir}: no readable images")
        self._labels = np.array(labels, np.int64)
        self.transform = transform if transform is not None else default_transform()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> np.ndarray:
        """(len,) int64 labels in dataset order."""
        return self._labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = load_rgb(self.paths[i], str(self.paths[i]))
        return build_sample(self.transform, img, int(self._labels[i]), np.full(4, np.nan, np.float32),
                            np.zeros((0, 4), np.float32), i)
