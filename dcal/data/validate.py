"""Validate (and parse) a CUB-200-2011 style dataset before any training starts.

Hand-written on purpose: torchvision ships no CUB-200-2011 loader, and none names the file and line of a
malformed entry, which is what this module is for.

:func:`validate_cub` reads the official metadata files, checks every line, checks the images, and returns
a :class:`CUBReport` holding everything a loader needs. Any problem raises :class:`DatasetError` whose
message names the file and line, e.g.::

    train_test_split.txt line 17: image id 17 has split value '2', expected 0 or 1

Files (paths relative to the dataset root):

* required: ``images.txt`` (``<image_id> <path under images/>``), ``classes.txt`` (``<class_id> <name>``),
  ``image_class_labels.txt`` (``<image_id> <class_id>``), ``train_test_split.txt``
  (``<image_id> <1 train | 0 test>``), and the image files themselves;
* optional: ``bounding_boxes.txt`` (``<image_id> <x> <y> <width> <height>``, the object box),
  ``parts/parts.txt`` (``<part_id> <name>``) and ``parts/part_locs.txt``
  (``<image_id> <part_id> <x> <y> <visible>``). Part boxes are read only when ``parts.txt`` holds the mark
  keypoints that :func:`dcal.data.write_cub` writes (``mark_top_left``/``mark_bottom_right`` and
  ``distractor_<m>_top_left``/``distractor_<m>_bottom_right``); on the real CUB (15 bird keypoints, no
  boxes) part boxes are unknown (NaN) and there are no distractor boxes.

Coordinates are used as written (CUB's own convention, pixels, x right, y down). With
``skip_bad_images=True`` missing or unreadable images are dropped instead of raising, and every one is
logged (warning) and listed in ``CUBReport.skipped``; metadata errors always raise.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DatasetError

__all__ = ["CUBReport", "validate_cub", "check_image", "CHECK_MODES"]

CHECK_MODES = ("load", "verify", "exists")  # how hard to look at each image (slowest and surest first)
_DISTRACTOR_RE = re.compile(r"^distractor_(\d+)_(top_left|bottom_right)$")

_default_logger = logging.getLogger("dcal.data")


@dataclass
class CUBReport:
    """A validated CUB-style dataset (one split, or all images when ``split`` is None)."""

    root: Path
    split: str | None
    class_ids: list[int]  # as in classes.txt, sorted; label = position in this list
    class_names: list[str]  # classes.txt names, e.g. '001.Black_footed_Albatross'
    image_ids: np.ndarray  # (n,) int64, as in images.txt
    image_lines: np.ndarray  # (n,) int64, line of each image in images.txt (for error messages)
    paths: list[str]  # relative to <root>/images
    labels: np.ndarray  # (n,) int64, 0-based
    is_train: np.ndarray  # (n,) bool
    object_boxes: np.ndarray  # (n, 4) float32 x0 y0 x1 y1; NaN without bounding_boxes.txt
    part_boxes: np.ndarray  # (n, 4) float32; NaN when unknown
    distractor_boxes: np.ndarray  # (n, M, 4) float32; M = 0 without distractor keypoints
    part_names: list[str] = field(default_factory=list)  # parts/parts.txt names, if present
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason) dropped images

    def __len__(self) -> int:
        return len(self.image_ids)


def check_image(path: Path, mode: str = "load") -> str | None:
    """Why an image file is unusable, or None when it is fine.

    Args:
        path: the image file.
        mode: "exists" (file present), "verify" (PIL header/structure check, fast) or "load" (full decode:
            also catches truncated files, which ``verify`` may miss).
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"check_images must be one of {CHECK_MODES}, got {mode!r}")
    if not path.is_file():
        return "does not exist"
    if mode == "exists":
        return None
    try:
        with Image.open(path) as im:
            if mode == "verify":
                im.verify()
            else:
                im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's ways of saying "corrupt"
        return f"cannot be read ({type(e).__name__}: {e})"
    return None


def _lines(root: Path, rel: str, required: bool = True) -> Iterator[tuple[int, list[str], str]] | None:
    """Yield (line number, fields, raw line) of a metadata file; None if optional and absent."""
    path = root / rel
    if not path.is_file():
        if required:
            raise DatasetError(f"{rel}: required file is missing (looked for {path})")
        return None

    def gen() -> Iterator[tuple[int, list[str], str]]:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():  # blank lines (a trailing newline) carry nothing
                    yield lineno, raw.split(), raw.rstrip("\n")
    return gen()


def _fields(rel: str, lineno: int, fields: list[str], n: int, fmt: str) -> list[str]:
    if len(fields) != n:
        raise DatasetError(f"{rel} line {lineno}: expected {n} fields '{fmt}', got {len(fields)}")
    return fields


def _int(rel: str, lineno: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{rel} line {lineno}: {what} {value!r} is not an integer") from None


def _float(rel: str, lineno: int, value: str, what: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise DatasetError(f"{rel} line {lineno}: {what} {value!r} is not a number") from None
    if not np.isfinite(v):
        raise DatasetError(f"{rel} line {lineno}: {what} {value!r} is not finite")
    return v


def _read_classes(root: Path) -> dict[int, str]:
    rel = "classes.txt"
    classes: dict[int, str] = {}
    for lineno, _, raw in _lines(root, rel):
        parts = raw.split(maxsplit=1)
        _fields(rel, lineno, parts, 2, "<class_id> <class_name>")
        cid = _int(rel, lineno, parts[0], "class id")
        if cid in classes:
            raise DatasetError(f"{rel} line {lineno}: duplicate class id {cid}")
        classes[cid] = parts[1].strip()
    if not classes:
        raise DatasetError(f"{rel}: no classes listed")
    return classes


def _read_images(root: Path) -> tuple[dict[int, str], dict[int, int]]:
    """(image id -> path, image id -> line number) from images.txt."""
    rel = "images.txt"
    paths: dict[int, str] = {}
    lines: dict[int, int] = {}
    seen_paths: dict[str, int] = {}
    for lineno, _, raw in _lines(root, rel):
        parts = raw.split(maxsplit=1)
        _fields(rel, lineno, parts, 2, "<image_id> <relative_path>")
        iid = _int(rel, lineno, parts[0], "image id")
        p = parts[1].strip()
        if iid in paths:
            raise DatasetError(f"{rel} line {lineno}: duplicate image id {iid} (first on line {lines[iid]})")
        if p in seen_paths:
            raise DatasetError(f"{rel} line {lineno}: image path {p!r} already listed on line {seen_paths[p]}")
        paths[iid], lines[iid], seen_paths[p] = p, lineno, lineno
    if not paths:
        raise DatasetError(f"{rel}: no images listed")
    return paths, lines


def _read_per_image(root: Path, rel: str, ncols: int, fmt: str, image_ids: dict[int, str],
                    image_lines: dict[int, int], required: bool = True) -> dict[int, tuple[int, list[str]]] | None:
    """Rows of a one-line-per-image file: image id -> (line number, remaining fields); every image once."""
    it = _lines(root, rel, required)
    if it is None:
        return None
    rows: dict[int, tuple[int, list[str]]] = {}
    for lineno, fields, _ in it:
        _fields(rel, lineno, fields, ncols, fmt)
        iid = _int(rel, lineno, fields[0], "image id")
        if iid not in image_ids:
            raise DatasetError(f"{rel} line {lineno}: image id {iid} is not in images.txt")
        if iid in rows:
            raise DatasetError(f"{rel} line {lineno}: duplicate image id {iid} (first on line {rows[iid][0]})")
        rows[iid] = (lineno, fields[1:])
    missing = [i for i in image_ids if i not in rows]
    if missing:
        i = missing[0]
        raise DatasetError(f"{rel}: image id {i} (images.txt line {image_lines[i]}) has no entry"
                           + (f" ({len(missing)} images lack one)" if len(missing) > 1 else ""))
    return rows


def _read_mark_parts(root: Path, image_ids: dict[int, str], ids: list[int]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Part names, and part boxes (n, 4) / distractor boxes (n, M, 4) (NaN when absent) for ``ids``."""
    n = len(ids)
    nan_parts = np.full((n, 4), np.nan, np.float32)
    it = _lines(root, "parts/parts.txt", required=False)
    if it is None:
        return [], nan_parts, np.zeros((n, 0, 4), np.float32)
    rel = "parts/parts.txt"
    names: dict[int, str] = {}
    for lineno, _, raw in it:
        parts = raw.split(maxsplit=1)
        _fields(rel, lineno, parts, 2, "<part_id> <part_name>")
        pid = _int(rel, lineno, parts[0], "part id")
        if pid in names:
            raise DatasetError(f"{rel} line {lineno}: duplicate part id {pid}")
        names[pid] = parts[1].strip()
    by_name = {v: k for k, v in names.items()}
    part_names = [names[k] for k in sorted(names)]
    if "mark_top_left" not in by_name or "mark_bottom_right" not in by_name:
        return part_names, nan_parts, np.zeros((n, 0, 4), np.float32)  # real CUB: keypoints only, no boxes

    # slot of each box corner: slot 0 = the part, slot m = distractor m; corner 0 = top-left, 1 = bottom-right
    corner_of: dict[int, tuple[int, int]] = {by_name["mark_top_left"]: (0, 0), by_name["mark_bottom_right"]: (0, 1)}
    M = 0
    for pid, name in names.items():
        m = _DISTRACTOR_RE.match(name)
        if m:
            corner_of[pid] = (int(m.group(1)), 0 if m.group(2) == "top_left" else 1)
            M = max(M, int(m.group(1)))
    row_of = {iid: r for r, iid in enumerate(ids)}
    boxes = np.full((n, 1 + M, 4), np.nan, np.float32)  # (n, 1 + M, 4)
    rel = "parts/part_locs.txt"
    seen: set[tuple[int, int]] = set()
    for lineno, fields, _ in _lines(root, rel):
        _fields(rel, lineno, fields, 5, "<image_id> <part_id> <x> <y> <visible>")
        iid = _int(rel, lineno, fields[0], "image id")
        pid = _int(rel, lineno, fields[1], "part id")
        if iid not in image_ids:
            raise DatasetError(f"{rel} line {lineno}: image id {iid} is not in images.txt")
        if pid not in names:
            raise DatasetError(f"{rel} line {lineno}: part id {pid} is not in parts/parts.txt")
        if (iid, pid) in seen:
            raise DatasetError(f"{rel} line {lineno}: duplicate entry for image {iid}, part {pid}")
        seen.add((iid, pid))
        if pid not in corner_of or iid not in row_of:
            continue  # other keypoints, or an image outside the requested split
        x, y = _float(rel, lineno, fields[2], "x"), _float(rel, lineno, fields[3], "y")
        vis = _int(rel, lineno, fields[4], "visible flag")
        if vis not in (0, 1):
            raise DatasetError(f"{rel} line {lineno}: visible flag {vis} must be 0 or 1")
        if vis:
            slot, corner = corner_of[pid]
            boxes[row_of[iid], slot, 2 * corner:2 * corner + 2] = (x, y)
    for pid in (by_name["mark_top_left"], by_name["mark_bottom_right"]):
        lacking = [i for i in ids if (i, pid) not in seen]
        if lacking:
            raise DatasetError(f"{rel}: image id {lacking[0]} has no '{names[pid]}' keypoint (part {pid})"
                               + (f" ({len(lacking)} images lack it)" if len(lacking) > 1 else ""))
    boxes[np.isnan(boxes).any(axis=2)] = np.nan  # a box with an invisible corner is unknown as a whole
    return part_names, boxes[:, 0], boxes[:, 1:]


def validate_cub(root: str | Path, split: str | None = None, check_images: str = "load",
                 skip_bad_images: bool = False, logger: logging.Logger | None = None) -> CUBReport:
    """Check a CUB-200-2011 style dataset and parse it.

    Args:
        root: folder holding images.txt, classes.txt, ..., images/.
        split: "train", "test" or None (all images). Only the selected images are opened.
        check_images: "load" (full decode, default), "verify" (faster, may miss truncation) or "exists".
        skip_bad_images: drop missing/unreadable images (each logged and listed in ``skipped``) instead
            of raising.
        logger: where skipped images are reported (default ``logging.getLogger("dcal.data")``).

    Returns:
        A :class:`CUBReport`.

    Raises:
        DatasetError: naming the file and line of the first problem.
    """
    root = Path(root)
    log = logger or _default_logger
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    classes = _read_classes(root)
    class_ids = sorted(classes)
    label_of = {cid: i for i, cid in enumerate(class_ids)}
    image_paths, image_lines = _read_images(root)

    rel = "image_class_labels.txt"
    label_rows = _read_per_image(root, rel, 2, "<image_id> <class_id>", image_paths, image_lines)
    labels: dict[int, int] = {}
    for iid, (lineno, (value,)) in label_rows.items():
        cid = _int(rel, lineno, value, "class id")
        if cid not in label_of:
            raise DatasetError(f"{rel} line {lineno}: image id {iid} has class id {cid}, which is not in classes.txt "
                               f"(ids {class_ids[0]}..{class_ids[-1]})")
        labels[iid] = label_of[cid]

    rel = "train_test_split.txt"
    split_rows = _read_per_image(root, rel, 2, "<image_id> <is_training_image>", image_paths, image_lines)
    is_train: dict[int, bool] = {}
    for iid, (lineno, (value,)) in split_rows.items():
        if value not in ("0", "1"):
            raise DatasetError(f"{rel} line {lineno}: image id {iid} has split value {value!r}, expected 0 or 1")
        is_train[iid] = value == "1"

    rel = "bounding_boxes.txt"
    box_rows = _read_per_image(root, rel, 5, "<image_id> <x> <y> <width> <height>", image_paths, image_lines,
                               required=False)
    obj_boxes: dict[int, tuple[float, float, float, float]] = {}
    for iid, (lineno, vals) in (box_rows or {}).items():
        x, y, w, h = (_float(rel, lineno, v, name) for v, name in zip(vals, ("x", "y", "width", "height")))
        if w < 0 or h < 0:
            raise DatasetError(f"{rel} line {lineno}: image id {iid} has a negative box size ({w} x {h})")
        obj_boxes[iid] = (x, y, x + w, y + h)

    ids = sorted(i for i in image_paths if split is None or is_train[i] == (split == "train"))
    if not ids:
        raise DatasetError(f"train_test_split.txt: the {split!r} split has no images")

    skipped: list[tuple[str, str]] = []
    keep = []
    for iid in ids:
        p = image_paths[iid]
        reason = check_image(root / "images" / p, check_images)
        if reason is None:
            keep.append(iid)
            continue
        msg = f"images.txt line {image_lines[iid]}: image id {iid} file 'images/{p}' {reason}"
        if not skip_bad_images:
            raise DatasetError(msg)
        log.warning("skipping %s", msg)
        skipped.append((f"images/{p}", reason))
    if skipped:
        log.warning("skipped %d of %d images of %s (split %s)", len(skipped), len(ids), root, split)
    if not keep:
        raise DatasetError(f"images.txt: no readable image left in the {split!r} split")

    part_names, part_boxes, distractor_boxes = _read_mark_parts(root, image_paths, keep)
    nan4 = (np.nan,) * 4
    return CUBReport(
        root=root, split=split, class_ids=class_ids, class_names=[classes[c] for c in class_ids],
        image_ids=np.array(keep, np.int64), image_lines=np.array([image_lines[i] for i in keep], np.int64),
        paths=[image_paths[i] for i in keep], labels=np.array([labels[i] for i in keep], np.int64),
        is_train=np.array([is_train[i] for i in keep], bool),
        object_boxes=np.array([obj_boxes.get(i, nan4) for i in keep], np.float32).reshape(-1, 4),
        part_boxes=part_boxes, distractor_boxes=distractor_boxes, part_names=part_names, skipped=skipped,
    )
