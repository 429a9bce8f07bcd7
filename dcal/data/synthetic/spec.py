"""What a synthetic benchmark is (`SyntheticSpec`, every knob with its why) and what generating one gives
(`SyntheticData`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..glyphs import benchmark_glyphs, pretrain_glyphs

# Bump when the renderer changes, so stale cache files are never reused.
GENERATOR_VERSION = 2  # 2: decoy distractors (distractor_glyphs="decoy")
_FAMILIES = {"benchmark": 0, "pretrain": 1}  # family -> extra seed word: separate random streams
DISTRACTOR_GLYPHS = ("decoy", "random", "class")


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset (the cache key is a hash of it)."""

    img_size: int = 64  # square image side in px; 64 keeps CPU training cheap (8x8 grid at patch 8)
    num_classes: int = 10  # glyph classes (benchmark: <= 12, pretrain: <= 48)
    train_per_class: int = 200  # balanced train split
    test_per_class: int = 50  # balanced test split
    part_size: int = 16  # mark (plate) side in px: 16x16 on 64x64 = 6.25% of the image, 2x2 patches of 8
    num_distractors: int = 2  # look-alike marks per image carrying no class information
    seed: int = 0  # everything below is drawn from default_rng(SeedSequence([seed, family]))
    family: str = "benchmark"  # "benchmark" or "pretrain" (disjoint glyphs, separate random stream)
    glyph_tilt_deg: float = 10.0  # glyph rotation jitter (+-): no pixel-exact templates, classes stay unambiguous
    scale_range: tuple[float, float] = (0.85, 1.1)  # object scale jitter (marks keep part_size)
    clutter_blobs: int = 8  # low-contrast Gaussian blobs in the background
    clutter_rects: int = 3  # faint rectangles: squares are not unique to marks
    clutter_lines: int = 4  # faint line segments
    noise_std: float = 0.02  # per-pixel Gaussian noise (in [0, 1] units), breaks flat colour regions
    distractor_on_body_prob: float = 0.5  # else on the background: the body alone does not identify the part
    # What the look-alike marks carry (see the module docstring): "decoy" (glyphs of a disjoint decoy set:
    # the class mark is unique, the default), "random" (class glyphs drawn independently of the label: a
    # relational puzzle, hard), "class" (copies of the class glyph: pre-training stage 1).
    distractor_glyphs: str = "decoy"
    # Corners of every mark snap to multiples of this many px (1: anywhere; default 8). 8 with part_size 16 puts each
    # mark on exactly 2x2 patches of an 8-px ViT: the glyph looks the same wherever it is, which a ViT's
    # patch embedding (equivariant only to whole-patch shifts) learns far faster than 64 sub-patch offsets.
    mark_grid: int = 8

    def __post_init__(self) -> None:
        # YAML/JSON configs give lists; a tuple keeps the spec hashable and equal to its cached copy
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        if len(self.scale_range) != 2:
            raise ValueError(f"SyntheticSpec.scale_range must be (lo, hi), got {self.scale_range}")
        if self.family not in _FAMILIES:
            raise ValueError(f"SyntheticSpec.family must be one of {sorted(_FAMILIES)}, got {self.family!r}")
        if self.img_size < 32:
            raise ValueError(f"SyntheticSpec.img_size must be >= 32, got {self.img_size}")
        if not 6 <= self.part_size <= self.img_size // 3:
            raise ValueError(f"SyntheticSpec.part_size must be in 6..img_size/3, got {self.part_size}")
        if self.train_per_class < 0 or self.test_per_class < 0 or self.train_per_class + self.test_per_class == 0:
            raise ValueError("SyntheticSpec.train_per_class/test_per_class must be >= 0 and not both 0")
        if self.distractor_glyphs not in DISTRACTOR_GLYPHS:
            raise ValueError(f"SyntheticSpec.distractor_glyphs must be one of {DISTRACTOR_GLYPHS}, "
                             f"got {self.distractor_glyphs!r}")
        if self.mark_grid < 1:
            raise ValueError(f"SyntheticSpec.mark_grid must be >= 1, got {self.mark_grid}")
        if self.num_distractors < 0:
            raise ValueError(f"SyntheticSpec.num_distractors must be >= 0, got {self.num_distractors}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"SyntheticSpec.scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        self.glyph_set()  # validates num_classes against the family's glyph set

    @classmethod
    def pretrain(cls, **overrides: Any) -> SyntheticSpec:
        """A pre-training spec: 32 disjoint glyph classes x 400 train (+50 test) images."""
        kw: dict[str, Any] = {"family": "pretrain", "num_classes": 32, "train_per_class": 400, "test_per_class": 50}
        kw.update(overrides)
        return cls(**kw)

    def glyph_set(self) -> tuple[list[str], np.ndarray]:
        """(class names, (C, 5, 5) bool glyphs) of this spec's family."""
        if self.family == "benchmark":
            return benchmark_glyphs(self.num_classes)
        return pretrain_glyphs(self.num_classes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SyntheticSpec:
        d = json.loads(text)
        d["scale_range"] = tuple(d["scale_range"])  # JSON has no tuples
        return cls(**d)

    def key(self) -> str:
        """Short hash of the spec and the generator version (the cache file name)."""
        payload = json.dumps({"spec": dataclasses.asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def num_images(self) -> int:
        return self.num_classes * (self.train_per_class + self.test_per_class)


@dataclass(eq=False)  # arrays: element-wise == would make dataclass equality ambiguous
class SyntheticData:
    """A generated dataset: all images of both splits, with their ground-truth boxes."""

    images: np.ndarray  # (n, H, W, 3) uint8
    labels: np.ndarray  # (n,) int64, 0-based class index
    part_boxes: np.ndarray  # (n, 4) float32 x0 y0 x1 y1: the discriminative mark
    object_boxes: np.ndarray  # (n, 4) float32: body + tail + head + mark
    distractor_boxes: np.ndarray  # (n, M, 4) float32
    is_train: np.ndarray  # (n,) bool
    class_names: list[str]
    poses: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (n,) head direction, radians
    # (n, M) glyph ids of the distractors: 0..C-1 a class glyph, C + j the family's decoy glyph j
    distractor_labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    spec: SyntheticSpec | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_indices(self, split: str) -> np.ndarray:
        """Indices (into the arrays) of the ``"train"`` or ``"test"`` split, in array order."""
        if split == "train":
            return np.flatnonzero(self.is_train)
        if split == "test":
            return np.flatnonzero(~self.is_train)
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
