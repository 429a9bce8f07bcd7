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

The package's modules: `spec` (`SyntheticSpec`, `SyntheticData`), `render` (`generate`), `cache` (.npz files,
`load_or_generate`) and `dataset` (`SyntheticFGVC`, `benchmark_stats`). Every name is importable from here.
"""
from __future__ import annotations

from .cache import cache_path, default_cache_dir, load_npz, load_or_generate, save_npz
from .dataset import SyntheticFGVC, benchmark_stats
from .render import generate
from .spec import DISTRACTOR_GLYPHS, GENERATOR_VERSION, SyntheticData, SyntheticSpec

__all__ = [
    "SyntheticSpec", "SyntheticData", "generate", "load_or_generate", "default_cache_dir", "cache_path",
    "save_npz", "load_npz", "SyntheticFGVC", "benchmark_stats", "GENERATOR_VERSION", "DISTRACTOR_GLYPHS",
]
