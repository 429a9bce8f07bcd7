"""An interactive rollout explorer: pick an image, move the GLCA ratio R, compare SA-only with DCAL.

The rollouts are computed once per model when the explorer is built (eval mode, no gradients); moving R
only re-takes the top-k of the stored rollout (k = max(1, floor(R·P)), the model's own rule), so the
model is never rebuilt or re-run. The figure is rendered to PNG and placed in the `Output` widget's
outputs directly, so `update()` works (and can be tested) without a browser or a kernel.
"""
from __future__ import annotations

import base64
import io
import math

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from torch import Tensor

from dcal.metrics import hits, patches_in_boxes
from dcal.model import DCAL

from .attention import _check_boxes, _check_images, plot_rollout

__all__ = ["RolloutExplorer", "rollout_explorer"]


@torch.no_grad()
def _rollout_of(model: DCAL, images: Tensor, name: str) -> Tensor:
    """(B, P) rollout of `model` on `images`, eval mode, training flag restored."""
    if not isinstance(model, DCAL):
        raise TypeError(f"{name} must be a dcal.DCAL, got {type(model).__name__}")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(images.to(dev))
    finally:
        model.train(was_training)
    return out.rollout.float().cpu()  # (B, P)


class RolloutExplorer:
    """The widget (`.widget`, a VBox) and its state; `update()` redraws and returns the new Figure.

    Attributes after each `update()`: ``figure`` (the Figure drawn), ``png`` (its PNG bytes),
    ``selected`` (k,) the patch indices outlined, ``k``.
    """

    def __init__(self, model: DCAL, images: Tensor, part_boxes=None, *, baseline_model: DCAL | None = None,
                 mean=None, std=None):
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) Tensor, got {getattr(images, 'shape', type(images).__name__)}")
        B = images.shape[0]
        if B < 1:
            raise ValueError("images holds no image")
        if mean is None and std is None:
            cfg = getattr(getattr(model, "backbone", None), "pretrained_cfg", None) or {}
            mean, std = cfg.get("mean"), cfg.get("std")
        _check_images(images[:1], mean, std)  # validates channels and mean/std once
        self.images = images.detach().cpu()
        self.mean, self.std = mean, std
        self.part_boxes = _check_boxes(part_boxes, B, "part_boxes")
        self.grid_size = tuple(model.grid_size)
        self.patch_size = tuple(model.patch_size)
        self.num_patches = model.num_patches
        self.rollouts = {"DCAL": _rollout_of(model, images, "model")}
        if baseline_model is not None:
            if tuple(baseline_model.grid_size) != self.grid_size:
                raise ValueError(f"baseline_model has grid {tuple(baseline_model.grid_size)}, model {self.grid_size}")
            self.rollouts["SA-only"] = _rollout_of(baseline_model, images, "baseline_model")
        self._part_mask = None
        if self.part_boxes is not None:
            self._part_mask = patches_in_boxes(torch.from_numpy(self.part_boxes), self.grid_size, self.patch_size)

        P = self.num_patches
        self.image_slider = widgets.IntSlider(value=0, min=0, max=B - 1, description="image",
                                              continuous_update=False)
        self.ratio_slider = widgets.FloatSlider(value=float(model.glca_ratio), min=min(0.01, 1.0 / P), max=1.0,
                                                step=0.01, description="R", readout_format=".2f",
                                                continuous_update=False)
        self.mode = None
        controls = [self.image_slider, self.ratio_slider]
        if baseline_model is not None:
            self.mode = widgets.ToggleButtons(options=["DCAL", "SA-only"], value="DCAL", description="model")
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
        name = self.mode.value if self.mode is not None else "DCAL"
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
                           titles=[title], ncols=1, mean=self.mean, std=self.std, panel_size=4.0)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        self.figure, self.png, self.selected, self.k = fig, buf.getvalue(), sel, k
        self.output.outputs = ({
            "output_type": "display_data",
            "data": {"image/png": base64.b64encode(self.png).decode("ascii"), "text/plain": title},
            "metadata": {},
        },)
        return fig

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def rollout_explorer(model: DCAL, images: Tensor, part_boxes=None, *, baseline_model: DCAL | None = None,
                     mean=None, std=None) -> RolloutExplorer:
    """Build the explorer; display it by leaving it last in a cell (or ``display(explorer.widget)``).

    Args:
        model: the DCAL model whose rollout is shown.
        images: (B, C, H, W) normalised network inputs.
        part_boxes: (B, 4) or (B, M, 4) part boxes in input pixels.
        baseline_model: an SA-only model to toggle against (same grid).
        mean, std: to un-normalise the images; default the model's ``backbone.pretrained_cfg``.
    """
    return RolloutExplorer(model, images, part_boxes, baseline_model=baseline_model, mean=mean, std=std)
