"""The embedded benchmark: a procedural fine-grained dataset whose discriminative part is known.

Every image shows random low-contrast background clutter (blobs, rectangles, lines, pixel noise), ONE
object — an elongated body (ellipse) with a small tail at the back and a round head at the front, at a
random rotation (pose), position, scale and colours — and ``1 + num_distractors`` *marks*: square plates
of ``part_size`` px with a dark glyph on a light plate.

* The *part* is the mark on the head. Its glyph is the class: nothing else in the image depends on the
  label. It moves with the pose (it sits at the head end of the body, wherever that points).
* The *distractors* are look-alike marks (same size, same plate/ink colour distributions, same stroke grid
  and ink area), placed on the body or on the background, never overlapping the part box. What they
  carry is a data setting (``distractor_glyphs``):

  - ``"decoy"`` (the benchmark's default): glyphs of the family's own *decoy* set (:func:`dcal.data.glyphs.decoy_glyphs`),
    disjoint from every class glyph. The class mark is unique in the image; finding it among marks that
    look like it — telling a class glyph from a decoy — is itself the fine-grained skill.
  - ``"random"`` (hard, relational): glyphs drawn uniformly from the *same class set*, independent of the
    label. Every image then shows two or three class glyphs, and only the one on the head counts: the
    network must work out which plate sits on the head. A tiny ViT on a CPU budget plateaus near 0.6 here.
  - ``"class"``: copies of the class glyph (the class is visible all over the image; pre-training stage 1).
* All glyphs have the same ink area and are left-right symmetric (see :mod:`dcal.data.glyphs`), so colour
  histograms carry no class information and horizontal-flip augmentation keeps the label.
* The glyph itself is drawn upright with a small random tilt (``glyph_tilt_deg``), not rotated with the
  body: with full rotation, orientation-defined glyphs (bars, tee, vee...) would only be defined relative
  to the body axis, a much harder task for a tiny ViT trained on CPU.

``family="pretrain"`` uses the same renderer (same objects, clutter, mark sizes and colours) with a
disjoint glyph set and its own random stream, for pre-training a backbone without ever touching a
benchmark image or label (see :meth:`SyntheticSpec.pretrain`).

Boxes are ``x0, y0, x1, y1`` in pixels (x right, y down, pixel (i, j) covers [j, j+1) x [i, i+1)).
Mark boxes are integer-aligned.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .errors import DatasetError
from .glyphs import benchmark_glyphs, decoy_glyphs, glyph_coverage, pretrain_glyphs
from .sample import BoxTransform, build_sample
from .transforms import default_transform

__all__ = [
    "SyntheticSpec", "SyntheticData", "generate", "load_or_generate", "default_cache_dir", "cache_path",
    "save_npz", "load_npz", "SyntheticFGVC", "benchmark_stats",
]

# Bump when the renderer changes, so stale cache files are never reused.
GENERATOR_VERSION = 2  # 2: decoy distractors (distractor_glyphs="decoy")
_FAMILIES = {"benchmark": 0, "pretrain": 1}  # family -> extra seed word: separate random streams
DISTRACTOR_GLYPHS = ("decoy", "random", "class")

_log = logging.getLogger("dcal.data")


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


# ----------------------------------------------------------------------------------------------- rendering
# Images are drawn in chunks of _CHUNK at once (numpy over the batch axis): a per-image Python loop is
# ~10x slower. The chunk size is part of the random stream, so it is a constant, not a parameter.
_CHUNK = 256
_TILT_STEP_DEG = 0.5  # glyph tilts are drawn from a grid this fine (pre-rendered once per dataset)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV arrays (...,) in [0, 1] -> (..., 3) float32 RGB."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _rand_colours(rng: np.random.Generator, n: int, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """(n, 3) random colours: uniform hue, saturation and value in the given ranges."""
    return _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(*sat, n), rng.uniform(*val, n))


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """img += alpha * (colour - img), in place. img (B, H, W, 3), alpha (B, H, W), colour (B, 3) or (B, H, W, 3)."""
    if colour.ndim == 2:
        colour = colour[:, None, None, :]  # (B, 1, 1, 3)
    img += alpha[..., None] * (colour - img)


def _col(x: np.ndarray) -> np.ndarray:
    """(B,) -> (B, 1, 1): per-image parameter broadcast over the pixel grid."""
    return np.asarray(x, np.float32)[:, None, None]


def _ellipse_alpha(px: np.ndarray, py: np.ndarray, cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray,
                   theta: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (B, H, W) of ellipses with semi-axes a (along theta) and b; params (B,)."""
    dx, dy = px - _col(cx), py - _col(cy)  # (B, H, W)
    c, s = _col(np.cos(theta)), _col(np.sin(theta))
    u, v = dx * c + dy * s, -dx * s + dy * c  # ellipse frame
    d = np.sqrt((u / _col(a)) ** 2 + (v / _col(b)) ** 2)  # 1 on the outline
    rho = np.sqrt(u * u + v * v)
    r_dir = np.where(d > 1e-6, rho / np.maximum(d, 1e-6), _col(np.minimum(a, b)))  # outline radius this way
    return np.clip(0.5 - (d - 1.0) * r_dir, 0.0, 1.0)  # ~ signed distance to the outline, in px


def _segment_alpha(px: np.ndarray, py: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (B, H, W) of line segments p0 -> p1 ((B, 2) each) of widths (B,)."""
    d = p1 - p0  # (B, 2)
    x0, y0, dx, dy = _col(p0[:, 0]), _col(p0[:, 1]), _col(d[:, 0]), _col(d[:, 1])
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    dist = np.hypot(px - x0 - t * dx, py - y0 - t * dy)
    return np.clip(_col(width) / 2 + 0.5 - dist, 0.0, 1.0)


def _backgrounds(rng: np.random.Generator, spec: SyntheticSpec, B: int, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float32 low-contrast clutter: base colour, blobs, faint rectangles and lines."""
    L = spec.img_size
    img = np.empty((B, L, L, 3), np.float32)
    img[:] = _rand_colours(rng, B, (0.05, 0.35), (0.35, 0.75))[:, None, None, :]
    K = spec.clutter_blobs
    if K:
        coords = px[0, 0]  # (L,) pixel centres, the same on both axes
        cx, cy = rng.uniform(-0.1 * L, 1.1 * L, size=(2, B, K, 1))
        sigma = rng.uniform(0.05, 0.2, size=(B, K, 1)) * L
        amp = rng.normal(0.0, 0.12, size=(B, K, 3)).astype(np.float32)
        gx = np.exp(-((coords - cx) ** 2) / (2 * sigma**2)).astype(np.float32)  # (B, K, L)
        gy = np.exp(-((coords - cy) ** 2) / (2 * sigma**2)).astype(np.float32)  # (B, K, L)
        blobs = gy[:, :, :, None] * gx[:, :, None, :]  # (B, K, L, L): separable Gaussians
        img += (blobs.reshape(B, K, L * L).transpose(0, 2, 1) @ amp).reshape(B, L, L, 3)
    # Faint rectangles and lines, composited in ONE pass (img <- img (1 - sum a) + sum a_k c_k): they are
    # faint and rarely overlap, so order does not matter visibly, and one pass is ~5x cheaper than K blends.
    alphas, colours = [], []
    for _ in range(spec.clutter_rects):
        w, h = rng.uniform(0.06, 0.25, size=(2, B)) * L
        x0, y0 = rng.uniform(-0.1 * L, L, size=(2, B))
        inside = (px >= _col(x0)) & (px < _col(x0 + w)) & (py >= _col(y0)) & (py < _col(y0 + h))
        alphas.append(inside * _col(rng.uniform(0.1, 0.3, B)))
        colours.append(_rand_colours(rng, B, (0.0, 0.6), (0.2, 0.9)))
    for _ in range(spec.clutter_lines):
        p0, p1 = rng.uniform(-0.1 * L, 1.1 * L, size=(2, B, 2))
        alphas.append(_segment_alpha(px, py, p0, p1, rng.uniform(0.8, 2.0, B)) * _col(rng.uniform(0.15, 0.35, B)))
        colours.append(_rand_colours(rng, B, (0.0, 0.6), (0.2, 0.9)))
    if alphas:
        a = np.stack(alphas, axis=1).astype(np.float32).reshape(B, len(alphas), L * L)  # (B, K, L*L)
        total = a.sum(axis=1, keepdims=True)  # (B, 1, L*L)
        a /= np.maximum(total, 1.0)  # where layers pile up past full opacity, share it
        total = np.minimum(total, 1.0).reshape(B, L, L, 1)
        img *= 1.0 - total
        img += (a.transpose(0, 2, 1) @ np.stack(colours, axis=1)).reshape(B, L, L, 3)  # (B, L*L, K) @ (B, K, 3)
    return img


def _geometry(spec: SyntheticSpec, scale: np.ndarray) -> dict[str, np.ndarray]:
    """Object part sizes in px ((B,) each): body ellipse, tail ellipse behind it, head disc in front."""
    L, S = spec.img_size, spec.part_size
    a, b = 0.22 * L * scale, 0.11 * L * scale
    head_r = np.maximum(0.14 * L * scale, 0.75 * S)  # the head stays a visible rim around the mark
    tail_a, tail_b = 0.35 * a, 0.45 * b
    return {"a": a, "b": b, "head_r": head_r, "head_off": a + 0.3 * head_r,
            "tail_a": tail_a, "tail_b": tail_b, "tail_off": a + 0.6 * tail_a}


def _ellipse_half_extent(a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(B, 2) half width/height of the axis-aligned boxes of rotated ellipses."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.sqrt((a * c) ** 2 + (b * s) ** 2), np.sqrt((a * s) ** 2 + (b * c) ** 2)], axis=1)


def _object_extent(g: dict[str, np.ndarray], theta: np.ndarray, part_size: int,
                   grid: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), (B, 2) each: the objects' boxes relative to the body centres."""
    axis = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (B, 2)
    head = g["head_off"][:, None] * axis
    comps = [
        (np.zeros_like(axis), _ellipse_half_extent(g["a"], g["b"], theta)),
        (-g["tail_off"][:, None] * axis, _ellipse_half_extent(g["tail_a"], g["tail_b"], theta)),
        (head, np.repeat(g["head_r"][:, None], 2, axis=1)),
        (head, np.full_like(axis, part_size / 2 + grid / 2)),  # the mark plate, snapped to its grid
    ]
    lo = np.min([c - h for c, h in comps], axis=0)
    hi = np.max([c + h for c, h in comps], axis=0)
    return lo, hi


def _mark_boxes(centres: np.ndarray, size: int, grid: int = 1) -> np.ndarray:
    """(N, 4) size x size boxes centred on centres (N, 2), corners snapped to multiples of `grid` px."""
    tl = np.rint((centres - size / 2.0) / grid) * grid
    return np.concatenate([tl, tl + size], axis=1).astype(np.float32)


def _clear_of(boxes: np.ndarray, taken: np.ndarray, gap: float = 1.0) -> np.ndarray:
    """(N,) bool: boxes (N, 4) keeping at least ``gap`` px from all boxes in ``taken`` (T, 4)."""
    b, t = boxes[:, None, :], taken[None, :, :]  # (N, 1, 4), (1, T, 4)
    hit = (b[..., 0] < t[..., 2] + gap) & (t[..., 0] < b[..., 2] + gap) & \
          (b[..., 1] < t[..., 3] + gap) & (t[..., 1] < b[..., 3] + gap)  # (N, T)
    return ~hit.any(axis=1)


def _place_distractors(rng: np.random.Generator, spec: SyntheticSpec, centre: np.ndarray, theta: float,
                       a: float, b: float, part_box: np.ndarray) -> np.ndarray:
    """(M, 4) mark boxes, each on the body (prob. distractor_on_body_prob) or the background, clear of the
    part box and of each other."""
    L, S = spec.img_size, spec.part_size
    axis, lateral = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
    taken = [part_box]
    n = 32  # candidates drawn at once; the first valid one wins
    for _ in range(spec.num_distractors):
        on_body = rng.random() < spec.distractor_on_body_prob
        for attempt in range(50):
            if on_body and attempt < 4:  # the body may be too crowded: then the background
                c = centre + rng.uniform(-1.2 * a, 0.3 * a, (n, 1)) * axis + rng.uniform(-0.4, 0.4, (n, 1)) * b * lateral
            else:
                c = rng.uniform(S / 2, L - S / 2, size=(n, 2))
            boxes = _mark_boxes(c, S, spec.mark_grid)  # (n, 4)
            ok = (boxes[:, :2] >= 0).all(1) & (boxes[:, 2:] <= L).all(1) & _clear_of(boxes, np.stack(taken))
            if ok.any():
                taken.append(boxes[np.argmax(ok)])
                break
        else:
            raise RuntimeError(f"could not place a distractor mark without overlap ({spec})")
    return np.asarray(taken[1:], dtype=np.float32).reshape(spec.num_distractors, 4)  # (M, 4), M may be 0


def _coverage_table(spec: SyntheticSpec, glyphs: np.ndarray) -> np.ndarray:
    """(C, T, S, S) ink coverage of every glyph at every tilt level (tilts quantised to _TILT_STEP_DEG).

    Drawn once per dataset: rendering each mark from scratch costs more than the rest of the image.
    """
    q = int(round(spec.glyph_tilt_deg / _TILT_STEP_DEG))
    tilts = np.deg2rad(np.arange(-q, q + 1) * _TILT_STEP_DEG)  # (T,)
    C, T = len(glyphs), len(tilts)
    cov = glyph_coverage(np.repeat(glyphs, T, axis=0), spec.part_size, np.tile(tilts, C))  # (C*T, S, S)
    return cov.reshape(C, T, spec.part_size, spec.part_size)


def _render_chunk(rng: np.random.Generator, spec: SyntheticSpec, coverage_table: np.ndarray, labels: np.ndarray,
                  px: np.ndarray, py: np.ndarray) -> dict[str, np.ndarray]:
    """Draw B = len(labels) images: background, object (pose, position, scale, colours), marks, noise.

    ``coverage_table`` (C, T, S, S) holds each glyph pre-drawn at each tilt level.
    """
    B, L, S, M = len(labels), spec.img_size, spec.part_size, spec.num_distractors
    img = _backgrounds(rng, spec, B, px, py)

    theta = rng.uniform(0.0, 2 * np.pi, B)  # pose: direction of the head, screen coordinates (y down)
    g = _geometry(spec, rng.uniform(*spec.scale_range, B))
    lo, hi = _object_extent(g, theta, S, spec.mark_grid)  # (B, 2) each
    if np.any(hi - lo > L - 2):
        raise ValueError(f"object does not fit in {L} px (extent up to {(hi - lo).max():.1f}); "
                         "reduce part_size or scale_range")
    centre = (1 - lo) + rng.uniform(0, 1, (B, 2)) * ((L - 1 - hi) - (1 - lo))  # (B, 2): object inside the image
    axis = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (B, 2)
    tail_c, head_c = centre - g["tail_off"][:, None] * axis, centre + g["head_off"][:, None] * axis

    body_rgb = _rand_colours(rng, B, (0.3, 0.8), (0.3, 0.75))  # (B, 3)
    head_rgb = 0.5 * body_rgb + 0.5 * _rand_colours(rng, B, (0.3, 0.9), (0.2, 0.9))
    lateral = (-(px - _col(centre[:, 0])) * _col(axis[:, 1]) + (py - _col(centre[:, 1])) * _col(axis[:, 0])) / _col(g["b"])
    shade = (1.0 + 0.15 * np.clip(lateral, -1.5, 1.5))[..., None]  # (B, H, W, 1): a hint of 3-D lighting
    a_tail = _ellipse_alpha(px, py, tail_c[:, 0], tail_c[:, 1], g["tail_a"], g["tail_b"], theta)
    a_body = _ellipse_alpha(px, py, centre[:, 0], centre[:, 1], g["a"], g["b"], theta)
    a_head = _ellipse_alpha(px, py, head_c[:, 0], head_c[:, 1], g["head_r"], g["head_r"], theta)
    _blend(img, a_tail, 0.8 * body_rgb[:, None, None, :] * shade)
    _blend(img, a_body, body_rgb[:, None, None, :] * shade)
    _blend(img, a_head, head_rgb[:, None, None, :] * shade)

    part_boxes = _mark_boxes(head_c, S, spec.mark_grid)
    shift = np.clip(-part_boxes[:, :2], 0, None) - np.clip(part_boxes[:, 2:] - L, 0, None)  # no-op by the extent check
    part_boxes += np.concatenate([shift, shift], axis=1)
    dist_boxes = np.stack([_place_distractors(rng, spec, centre[i], theta[i], g["a"][i], g["b"][i], part_boxes[i])
                           for i in range(B)]).reshape(B, M, 4)
    C = spec.num_classes  # the coverage table holds the C class glyphs, then the family's decoys
    if spec.distractor_glyphs == "decoy":
        dist_labels = C + rng.integers(len(coverage_table) - C, size=(B, M))  # a decoy glyph, uniform
    else:
        # "random" and "class" draw exactly what generator version 1 drew, so their images (and the shipped
        # backbone's pre-training data) are unchanged
        dist_labels = rng.integers(C, size=(B, M))  # a class glyph, uniform, independent of the label
        if spec.distractor_glyphs == "class":
            dist_labels = np.repeat(labels[:, None], M, axis=1)  # (B, M): copies of the class glyph

    # marks: part first, then distractors; same colour and tilt distributions for all of them
    boxes = np.concatenate([part_boxes[:, None], dist_boxes], axis=1).reshape(B * (M + 1), 4)
    glyph_ids = np.concatenate([labels[:, None], dist_labels], axis=1).reshape(-1)
    tilt_ids = rng.integers(0, coverage_table.shape[1], len(glyph_ids))
    cov = coverage_table[glyph_ids, tilt_ids][..., None]  # (N, S, S, 1)
    plate = _rand_colours(rng, len(glyph_ids), (0.0, 0.45), (0.72, 1.0))[:, None, None, :]  # light plate
    ink = _rand_colours(rng, len(glyph_ids), (0.0, 0.8), (0.0, 0.32))[:, None, None, :]  # dark ink
    marks = plate * (1.0 - cov) + ink * cov  # (N, S, S, 3)
    for k, (x0, y0) in enumerate(boxes[:, :2].astype(np.int64)):
        img[k // (M + 1), y0:y0 + S, x0:x0 + S] = marks[k]

    mask = np.maximum(np.maximum(a_tail, a_body), a_head) > 0.5  # (B, H, W)
    cols, rows = mask.any(axis=1), mask.any(axis=2)  # (B, W), (B, H)
    if not (cols.any(axis=1).all() and rows.any(axis=1).all()):
        raise RuntimeError(f"an object covers no pixel ({spec})")
    obj = np.stack([cols.argmax(1), rows.argmax(1), L - cols[:, ::-1].argmax(1), L - rows[:, ::-1].argmax(1)], axis=1)
    obj = np.concatenate([np.minimum(obj[:, :2], part_boxes[:, :2]), np.maximum(obj[:, 2:], part_boxes[:, 2:])], axis=1)

    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(spec.noise_std)
    return {
        "images": np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8),
        "part_boxes": part_boxes, "object_boxes": obj.astype(np.float32),
        "distractor_boxes": dist_boxes.astype(np.float32), "distractor_labels": dist_labels.astype(np.int64),
        "poses": theta.astype(np.float32),
    }


def generate(spec: SyntheticSpec) -> SyntheticData:
    """Generate the dataset described by ``spec`` (deterministic; no caching).

    The arrays hold the train split first (class-balanced, shuffled), then the test split.
    """
    names, glyphs = spec.glyph_set()
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _FAMILIES[spec.family]]))
    C, L = spec.num_classes, spec.img_size
    labels = np.concatenate([
        rng.permutation(np.repeat(np.arange(C), spec.train_per_class)),
        rng.permutation(np.repeat(np.arange(C), spec.test_per_class)),
    ]).astype(np.int64)
    n = len(labels)
    centres = np.arange(L, dtype=np.float32) + 0.5
    py, px = np.meshgrid(centres, centres, indexing="ij")  # (L, L) pixel centres
    px, py = px[None], py[None]  # (1, L, L): broadcast over the chunk
    table = _coverage_table(spec, np.concatenate([glyphs, decoy_glyphs(spec.family)]))  # (C + D, T, S, S)
    chunks = [_render_chunk(rng, spec, table, labels[i:i + _CHUNK], px, py) for i in range(0, n, _CHUNK)]
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return SyntheticData(labels=labels, is_train=np.arange(n) < C * spec.train_per_class,
                         class_names=list(names), spec=spec, **out)


# ----------------------------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """``$DCAL_DATA_CACHE`` if set, else ``~/.cache/dcal``."""
    env = os.environ.get("DCAL_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dcal"


def cache_path(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``spec``'s dataset is cached: ``<cache_dir>/synthetic-<family>-<key>.npz``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"synthetic-{spec.family}-{spec.key()}.npz"


_ARRAYS = ("images", "labels", "part_boxes", "object_boxes", "distractor_boxes", "is_train", "poses",
           "distractor_labels")


def save_npz(data: SyntheticData, path: str | os.PathLike) -> None:
    """Write ``data`` as a compressed .npz, atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(data, k) for k in _ARRAYS}
    arrays["class_names"] = np.array(data.class_names, dtype=str)
    arrays["spec_json"] = np.array(data.spec.to_json() if data.spec is not None else "", dtype=str)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: numpy does not append '.npz' to the temp name
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # never leave half-written temp files behind
        raise


def load_npz(path: str | os.PathLike) -> SyntheticData:
    """Read a dataset written by :func:`save_npz`; a damaged file raises :class:`DatasetError`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (*_ARRAYS, "class_names", "spec_json") if k not in z.files]
            if missing:
                raise DatasetError(f"{path}: cache file lacks arrays {missing}; delete it to regenerate")
            arrays = {k: z[k] for k in _ARRAYS}
            names = [str(s) for s in z["class_names"]]
            spec_json = str(z["spec_json"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read cache file ({type(e).__name__}: {e}); delete it to regenerate") from e
    spec = SyntheticSpec.from_json(spec_json) if spec_json else None
    return SyntheticData(class_names=names, spec=spec, **arrays)


def load_or_generate(spec: SyntheticSpec | None = None, cache_dir: str | os.PathLike | None = None,
                     logger: logging.Logger | None = None) -> SyntheticData:
    """The dataset for ``spec``: from the on-disk cache if there, else generated and cached.

    Args:
        spec: defaults to ``SyntheticSpec()`` (the 64 px, 10-class benchmark).
        cache_dir: defaults to ``$DCAL_DATA_CACHE`` or ``~/.cache/dcal``.
        logger: where to report generation/caching (default ``dcal.data``).
    """
    spec = spec if spec is not None else SyntheticSpec()
    log = logger or _log
    path = cache_path(spec, cache_dir)
    if path.exists():
        data = load_npz(path)
        if data.spec != spec:
            raise DatasetError(f"{path}: cache file holds spec {data.spec}, expected {spec}; delete it to regenerate")
        log.debug("loaded synthetic %s data from %s", spec.family, path)
        return data
    t0 = time.perf_counter()
    data = generate(spec)
    log.info("generated %d synthetic %s images in %.1f s -> %s", len(data), spec.family, time.perf_counter() - t0, path)
    save_npz(data, path)
    return data


# ----------------------------------------------------------------------------------------------- dataset


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
