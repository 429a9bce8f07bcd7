"""An interactive rollout explorer: pick an image, move the selection ratio R, compare two models.

The rollouts are computed once per model when the explorer is built, by a ``rollout_fn(model, images)``
(default `diagnostics.attention.dcal_rollout`, a `dcal.DCAL`'s own; `diagnostics.vit_rollout` for a timm
ViT); moving R only re-takes the top-k of the stored rollout (k = max(1, floor(R·P)), DCAL's rule), so no
model is re-run. The figure is rendered to PNG (`diagnostics.figures`) and placed in the `Output` widget's
outputs directly, so `update()` works (and can be tested) without a browser or a kernel.
"""
from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor

from dcal.metrics import hits, patches_in_boxes

from .attention import (
    _cell_size,
    _check_boxes,
    _check_images,
    dcal_rollout,
    model_grid,
    plot_rollout,
    rollout_of,
)
from .extras import require
from .figures import png_bytes

widgets = require("ipywidgets", "the rollout explorer (diagnostics.rollout_explorer)")

__all__ = ["RolloutExplorer", "rollout_explorer"]

# R at start when the model has no glca_ratio: DCAL's default (DCAL_METHOD.md, R = 10 % of the patches).
DEFAULT_RATIO = 0.1


class RolloutExplorer:
    """The widget (`.widget`, a VBox) and its state; `update()` redraws and returns the new Figure.

    Attributes after each `update()`: ``figure`` (the Figure drawn), ``png`` (its PNG bytes),
    ``selected`` (k,) the patch indices outlined, ``k``.
    """

    def __init__(self, model, images: Tensor, part_boxes=None, *, distractor_boxes=None, baseline_model=None,
                 mean=None, std=None, rollout_fn: Callable | None = None, grid_size: Sequence[int] | None = None,
                 labels: tuple[str, str] = ("DCAL", "SA-only")):
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) Tensor, got {getattr(images, 'shape', type(images).__name__)}")
        B = images.shape[0]
        if B < 1:
            raise ValueError("images holds no image")
        if mean is None and std is None:
            cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", None) or {}
            mean, std = cfg.get("mean"), cfg.get("std")
        _check_images(images[:1], mean, std)  # validates channels and mean/std once
        self.images = images.detach().cpu()
        self.mean, self.std = mean, std
        self.part_boxes = _check_boxes(part_boxes, B, "part_boxes")
        self.distractor_boxes = _check_boxes(distractor_boxes, B, "distractor_boxes")
        self.grid_size = model_grid(model, grid_size)
        self.patch_size = _cell_size(tuple(images.shape[-2:]), self.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        fn = rollout_fn or dcal_rollout
        self.rollouts = {labels[0]: rollout_of(fn, model, images, self.grid_size, 1)["rollout"]}
        if baseline_model is not None:
            if model_grid(baseline_model, grid_size) != self.grid_size:
                raise ValueError(f"baseline_model has grid {model_grid(baseline_model, grid_size)}, model {self.grid_size}")
            self.rollouts[labels[1]] = rollout_of(fn, baseline_model, images, self.grid_size, 1)["rollout"]
        self._part_mask = None
        if self.part_boxes is not None:
            self._part_mask = patches_in_boxes(torch.from_numpy(self.part_boxes), self.grid_size, self.patch_size)

        P = self.num_patches
        self.image_slider = widgets.IntSlider(value=0, min=0, max=B - 1, description="image",
                                              continuous_update=False)
        ratio = float(getattr(model, "glca_ratio", DEFAULT_RATIO))
        self.ratio_slider = widgets.FloatSlider(value=ratio, min=min(0.01, 1.0 / P), max=1.0,
                                                step=0.01, description="R", readout_format=".2f",
                                                continuous_update=False)
        self.mode = None
        controls = [self.image_slider, self.ratio_slider]
        if baseline_model is not None:
            self.mode = widgets.ToggleButtons(options=list(self.rollouts), value=labels[0], description="model")
            controls.append(self.mode)
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox(controls), self.output])
        self.widget.redraw = self.update
        for w in controls:
            w.observe(lambda _change: self.update(), names="value")
        self.figure: Figure | None = None
        self.png = b""
        self.selected: Tensor | None = None
        self.k = 0
        self.update()

    def update(self) -> Figure:
        """Redraw for the current slider/toggle values."""
        i = self.image_slider.value
        name = self.mode.value if self.mode is not None else next(iter(self.rollouts))
        r = self.rollouts[name][i]  # (P,)
        R = float(self.ratio_slider.value)
        k = max(1, math.floor(R * self.num_patches))  # the model's rule (dcal.model.DCAL)
        sel = r.topk(min(k, self.num_patches), sorted=True).indices  # (k,)
        title = f"image {i} · {name} · R={R:.2f} · k={k}/{self.num_patches}"
        if self._part_mask is not None:
            hit = bool(hits(sel[None], self._part_mask[i : i + 1])[0])
            title += " · part hit" if hit else " · part missed"
        fig = plot_rollout(self.images[i : i + 1], r[None], self.grid_size, local_index=sel[None],
                           part_boxes=None if self.part_boxes is None else self.part_boxes[i : i + 1],
                           distractor_boxes=None if self.distractor_boxes is None else self.distractor_boxes[i : i + 1],
                           titles=[title], ncols=1, mean=self.mean, std=self.std, panel_size=4.0)
        self.figure, self.png, self.selected, self.k = fig, png_bytes(fig), sel, k
        self.output.outputs = ({
            "output_type": "display_data",
            "data": {"image/png": base64.b64encode(self.png).decode("ascii"), "text/plain": title},
            "metadata": {},
        },)
        return fig

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def rollout_explorer(model, images: Tensor, part_boxes=None, *, distractor_boxes=None, baseline_model=None,
                     mean=None, std=None, rollout_fn: Callable | None = None, grid_size: Sequence[int] | None = None,
                     labels: tuple[str, str] = ("DCAL", "SA-only")) -> RolloutExplorer:
    """Build the explorer; display it by leaving it last in a cell (or ``display(explorer.widget)``).

    Args:
        model: the model whose rollout is shown (a `dcal.DCAL` by default; any model with a `rollout_fn`).
        images: (B, C, H, W) normalised network inputs.
        part_boxes: (B, 4) or (B, M, 4) part boxes in input pixels.
        distractor_boxes: (B, M, 4) look-alike boxes in input pixels (all-NaN rows are padding), drawn dashed.
        baseline_model: a second model to toggle against (same grid), e.g. the SA-only baseline.
        mean, std: to un-normalise the images; default the model's (or its backbone's) ``pretrained_cfg``.
        rollout_fn: ``rollout_fn(model, images)`` → (B, P) patch scores (or a mapping with ``rollout``);
            default `diagnostics.attention.dcal_rollout`; `diagnostics.vit_rollout` for a timm ViT.
        grid_size: (rows, cols) of the patch grid; default the model's.
        labels: the toggle's names for `model` and `baseline_model`.
    """
    return RolloutExplorer(model, images, part_boxes, distractor_boxes=distractor_boxes,
                           baseline_model=baseline_model, mean=mean, std=std, rollout_fn=rollout_fn,
                           grid_size=grid_size, labels=labels)
