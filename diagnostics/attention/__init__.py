"""Where DCAL looks: rollout heatmaps, the GLCA-selected patches, and PWCA's attention on the paired image.

* `rollout_heatmap` turns a rollout (one score per patch, optionally behind prefix tokens) into a map
  upsampled to the image; `plot_rollout` / `plot_compare` draw it over the (un-normalised) images with the
  selected patches and the known part / distractor boxes.
* `pwca_distractor_mass` asks the model for its PWCA attention (`DCAL.forward(..., pwca_attention=True)`)
  and measures, per block, how much of image 1's softmax attention goes to image 2's keys (0.5 exactly for a
  self-pair).
* `RolloutCallback` writes the selection statistics into each eval record and saves a probe-batch figure;
  the rollout comes from a ``rollout_fn(model, images)``: `dcal_rollout` for a `dcal.DCAL` (the default),
  `diagnostics.vit_rollout` for a timm ViT, or the user's own.

Plotting helpers are pure: arrays or tensors in, validated, a new `matplotlib.figure.Figure` out (not
registered with pyplot, so nothing accumulates when a callback draws one per evaluation).

The package's modules: `checks` (validation), `plots` (heatmaps and figures), `pwca`, `rollouts`
(``rollout_fn`` and the selection) and `callback`. Every name is importable from here.
"""
from __future__ import annotations

from .callback import RolloutCallback
from .checks import _cell_size as _cell_size  # the rollout explorer's
from .checks import _check_boxes as _check_boxes
from .checks import _check_images as _check_images
from .plots import DISTRACTOR_COLOR, PART_COLOR, SELECTED_COLOR, plot_compare, plot_rollout, rollout_heatmap
from .pwca import plot_pwca_mass, pwca_distractor_mass
from .rollouts import dcal_rollout, model_grid, rollout_of

__all__ = [
    "rollout_heatmap",
    "plot_rollout",
    "plot_compare",
    "pwca_distractor_mass",
    "plot_pwca_mass",
    "RolloutCallback",
    "dcal_rollout",
    "rollout_of",
    "model_grid",
    "SELECTED_COLOR",
    "PART_COLOR",
    "DISTRACTOR_COLOR",
]
