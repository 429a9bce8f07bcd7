"""CUB-200-2011: a writer for the synthetic benchmark in CUB's on-disk layout, and a loader for that layout.

Layout written by :func:`write_cub` (identical to the official CUB-200-2011 release)::

    images/<NNN.ClassName>/<ClassName>_<NNNNN>.jpg   JPEG, quality 95, no chroma subsampling
    images.txt               <image_id> <path under images/>          (ids 1..n, in SyntheticData order)
    classes.txt              <class_id> <NNN.ClassName>               (ids 1..C)
    image_class_labels.txt   <image_id> <class_id>                    (1-based)
    train_test_split.txt     <image_id> <1 train | 0 test>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>      (the OBJECT box, as in CUB)
    parts/parts.txt          <part_id> <part name>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>

Part encoding. CUB parts are keypoints, so boxes are written as corner keypoints:

* part 1 ``mark_center``: centre of the discriminative part's box;
* part 2 ``mark_top_left`` (x0, y0) and part 3 ``mark_bottom_right`` (x1, y1): its box;
* parts 4, 5 ``distractor_1_top_left`` / ``distractor_1_bottom_right``, parts 6, 7 for distractor 2, ...

A box that is unknown (NaN) is written as invisible keypoints (``0.0 0.0 0``, CUB's convention).
:class:`CUB200` rebuilds part and distractor boxes from these keypoints when ``parts.txt`` names them; on
the real CUB-200-2011 (15 bird keypoints) part boxes are NaN and there are no distractor boxes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .errors import DatasetError
from .sample import BoxTransform, build_sample
from .synthetic import SyntheticData
from .transforms import default_transform
from .validate import CUBReport, validate_cub

__all__ = ["write_cub", "CUB200", "class_folder_name"]


def class_folder_name(class_id: int, name: str) -> str:
    """CUB-style class folder, e.g. ``001.Plus`` (1-based id, no spaces)."""
    clean = "_".join(name.split())
    return f"{class_id:03d}.{clean[:1].upper()}{clean[1:]}"


def _fmt(v: float) -> str:
    return f"{float(v):.2f}"


def write_cub(data: SyntheticData, out_dir: str | Path, quality: int = 95) -> Path:
    """Write a synthetic dataset in the CUB-200-2011 layout (see the module docstring).

    Args:
        data: the dataset; images keep their order (image id = array index + 1).
        out_dir: target folder (created; existing files of the same names are overwritten).
        quality: JPEG quality (95: mean abs error ~1 grey level on these images).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    folders = [class_folder_name(c + 1, n) for c, n in enumerate(data.class_names)]
    for f in folders:
        (out / "images" / f).mkdir(exist_ok=True)

    images, labels, split, boxes, parts = [], [], [], [], []
    M = data.distractor_boxes.shape[1]
    for i in range(len(data)):
        iid, c = i + 1, int(data.labels[i])
        rel = f"{folders[c]}/{folders[c].split('.', 1)[1]}_{iid:05d}.jpg"
        # 4:4:4 chroma: 4:2:0 would smear the 2 px glyph strokes
        Image.fromarray(data.images[i]).save(out / "images" / rel, format="JPEG", quality=quality, subsampling=0)
        images.append(f"{iid} {rel}")
        labels.append(f"{iid} {c + 1}")
        split.append(f"{iid} {1 if data.is_train[i] else 0}")
        x0, y0, x1, y1 = data.object_boxes[i]
        boxes.append(f"{iid} {_fmt(x0)} {_fmt(y0)} {_fmt(x1 - x0)} {_fmt(y1 - y0)}")
        parts.extend(_part_lines(iid, data.part_boxes[i], data.distractor_boxes[i]))

    part_names = ["mark_center", "mark_top_left", "mark_bottom_right"]
    for m in range(1, M + 1):
        part_names += [f"distractor_{m}_top_left", f"distractor_{m}_bottom_right"]
    _write(out / "images.txt", images)
    _write(out / "classes.txt", [f"{c + 1} {f}" for c, f in enumerate(folders)])
    _write(out / "image_class_labels.txt", labels)
    _write(out / "train_test_split.txt", split)
    _write(out / "bounding_boxes.txt", boxes)
    _write(out / "parts" / "parts.txt", [f"{k + 1} {n}" for k, n in enumerate(part_names)])
    _write(out / "parts" / "part_locs.txt", parts)
    return out


def _part_lines(iid: int, part_box: np.ndarray, distractor_boxes: np.ndarray) -> list[str]:
    """part_locs.txt lines of one image: centre + corners of the part, corners of each distractor."""
    def kp(pid: int, x: float, y: float) -> str:
        if np.isnan(x) or np.isnan(y):
            return f"{iid} {pid} 0.0 0.0 0"  # CUB writes invisible keypoints this way
        return f"{iid} {pid} {_fmt(x)} {_fmt(y)} 1"

    x0, y0, x1, y1 = (float(v) for v in part_box)
    lines = [kp(1, (x0 + x1) / 2, (y0 + y1) / 2), kp(2, x0, y0), kp(3, x1, y1)]
    for m, (a, b, c, d) in enumerate(distractor_boxes):
        lines += [kp(4 + 2 * m, a, b), kp(5 + 2 * m, c, d)]
    return lines


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_rgb(path: Path, where: str) -> Image.Image:
    """Open an image as RGB; failure raises DatasetError naming ``where`` (file and line)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # CUB has a few greyscale images
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{where}: cannot read image {path} ({type(e).__name__}: {e})") from e


class CUB200(Dataset):
    """CUB-200-2011 (official layout), or a synthetic benchmark written by :func:`write_cub`.

    The dataset is validated on construction (:func:`dcal.data.validate_cub`). Samples are dicts (see
    :mod:`dcal.data.sample`); ``index`` is the position in this dataset, ``self.image_ids[index]`` the
    CUB image id.

    Args:
        root: dataset folder (holding images.txt, ...).
        split: "train" or "test".
        transform: box-aware transform (default: float tensor in [0, 1]).
        skip_bad_images: drop missing/unreadable images (listed in ``self.skipped`` and logged) instead of
            raising.
        logger: where skipped images are reported (default ``logging.getLogger("dcal.data")``).
        check_images: "load" (full decode of every image at construction), "verify" or "exists".
    """

    def __init__(self, root: str | Path, split: str = "train", transform: BoxTransform | None = None,
                 skip_bad_images: bool = False, logger: logging.Logger | None = None, check_images: str = "load"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root)
        self.split = split
        self.report: CUBReport = validate_cub(root, split=split, check_images=check_images,
                                              skip_bad_images=skip_bad_images, logger=logger)
        self.skipped = list(self.report.skipped)
        self.transform = transform if transform is not None else default_transform()
        self.class_names = [n.split(".", 1)[1] if "." in n else n for n in self.report.class_names]
        self.num_classes = len(self.class_names)
        self.image_ids = self.report.image_ids

    def __len__(self) -> int:
        return len(self.report)

    @property
    def labels(self) -> np.ndarray:
        """(len,) int64 labels, 0-based, in dataset order."""
        return self.report.labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.report
        img = load_rgb(r.root / "images" / r.paths[i], f"images.txt line {int(r.image_lines[i])}")
        return build_sample(self.transform, img, int(r.labels[i]), r.part_boxes[i], r.distractor_boxes[i], i)
