"""`RolloutCallback`: the selection statistics in each eval record and a probe-batch figure per evaluation."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor

from dcal.callbacks import Callback
from dcal.metrics import hits, patches_in_boxes

from ..figures import png_bytes
from ..selection import selection_stats
from .checks import _cell_size, _check_grid
from .plots import plot_rollout
from .rollouts import _require_dcal, dcal_rollout, model_grid, rollout_of


class RolloutCallback(Callback):
    """Selection statistics in every eval record, and a probe-batch rollout figure per evaluation.

    Statistics: from ``trainer.eval_outputs`` (concatenated over the eval set) when they hold
    ``local_index`` (n, k) and ``rollout`` (n, P), as the trainer's evaluation of a `dcal.DCAL` does;
    ``part_mask`` / ``distractor_mask`` (n, P) bool optional (computed from ``part_box`` /
    ``distractor_boxes`` when only those are present; ignored, as by the trainer, unless every image has at
    least one such patch). Without them, when a ``rollout_fn`` was given, from the probe images' rollout.
    Writes ``part_hit`` (unless the trainer set it), ``part_hit_chance``, ``distractor_hit``,
    ``selection_jaccard``, ``selection_static`` and ``rollout_figure`` into ``trainer.eval_record`` (fields
    already set to a non-null value are kept). The figure shows ``rollout_fn``'s rollout and selection on
    the probe images.

    Args:
        probe_batch: dict with ``image`` (n, C, H, W) and optionally ``part_box``, ``distractor_boxes``,
            ``label``; used when ``eval_outputs`` holds no ``image``.
        every: save a figure every ``every`` evaluations (the statistics are written at every one).
        out_dir: folder for the figures; default ``<trainer.out_dir>/figures``.
        num_images: probe images drawn (the first ones of the eval set / probe batch).
        rollout_fn: ``rollout_fn(model, images)`` → (B, P) patch scores, or a mapping with ``rollout`` and
            optionally ``local_index`` and ``pred`` (see `rollout_of`); default `dcal_rollout` (a `dcal.DCAL`'s
            own). `diagnostics.vit_rollout` serves a timm ViT.
        grid_size: (rows, cols) of the patch grid; default the model's (`model_grid`).
        ratio: the share of patches a selection keeps when ``rollout_fn`` gives none: k = max(1, floor(ratio·P));
            default the model's ``glca_ratio``, else 0.1.
    """

    order = 10  # before the metrics logger, which runs last and writes the record

    def __init__(self, probe_batch: dict | None = None, every: int = 1, out_dir: str | Path | None = None,
                 num_images: int = 8, *, rollout_fn: Callable | None = None, grid_size: Sequence[int] | None = None,
                 ratio: float | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"RolloutCallback: every must be a positive int, got {every!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"RolloutCallback: num_images must be a positive int, got {num_images!r}")
        if probe_batch is not None and "image" not in probe_batch:
            raise ValueError(f"RolloutCallback: probe_batch needs an 'image' entry, got keys {sorted(probe_batch)}")
        if rollout_fn is not None and not callable(rollout_fn):
            raise TypeError(f"RolloutCallback: rollout_fn must be callable, got {type(rollout_fn).__name__}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"RolloutCallback: ratio must be in (0, 1], got {ratio!r}")
        self.probe_batch = probe_batch
        self.every = every
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.num_images = num_images
        self.rollout_fn = rollout_fn
        self.grid_size = None if grid_size is None else _check_grid(grid_size)
        self.ratio = ratio
        self._evals = 0

    def after_eval(self, trainer) -> None:
        model = trainer.model
        if self.rollout_fn is None:
            _require_dcal(model)
        grid = model_grid(model, self.grid_size)
        P = grid[0] * grid[1]
        outs = getattr(trainer, "eval_outputs", None) or {}
        probe = None
        if self.rollout_fn is not None and (outs.get("local_index") is None or outs.get("rollout") is None):
            probe = self._probe(trainer, grid)
            src = {k: v for k, v in probe.items() if k not in ("image", "label", "pred")}
        else:
            src = self._eval_outputs(outs, P)
        patch = self._patch_size(model, grid, src, outs)
        stats = selection_stats(src["local_index"].cpu(), P, self._mask(src, "part", grid, patch),
                                self._mask(src, "distractor", grid, patch))
        rec = trainer.eval_record
        for key in ("part_hit", "part_hit_chance", "distractor_hit", "selection_jaccard", "selection_static"):
            if rec.get(key) is None:
                rec[key] = stats[key]
        self._evals += 1
        if (self._evals - 1) % self.every == 0:
            rec["rollout_figure"] = str(self._save_figure(trainer, probe or self._probe(trainer, grid), grid))

    @staticmethod
    def _eval_outputs(outs: dict, P: int) -> dict:
        if not outs:
            raise ValueError("RolloutCallback: trainer.eval_outputs is empty; the eval must collect "
                             "'local_index' and 'rollout' for this callback (or give it a rollout_fn)")
        missing = [k for k in ("local_index", "rollout") if outs.get(k) is None]
        if missing:
            raise ValueError(f"RolloutCallback: trainer.eval_outputs lacks {missing} (has {sorted(outs)})")
        index, rollout = outs["local_index"], outs["rollout"]
        if rollout.dim() != 2 or rollout.shape[1] != P or rollout.shape[0] != index.shape[0]:
            raise ValueError(f"RolloutCallback: eval_outputs['rollout'] has shape {tuple(rollout.shape)}, expected "
                             f"({index.shape[0]}, {P}) to match local_index {tuple(index.shape)} and the "
                             f"model's {P} patches")
        return outs

    @staticmethod
    def _patch_size(model, grid: tuple[int, int], src: dict, outs: dict) -> tuple[int, int] | None:
        """Patch size in pixels (for boxes → patch masks): the model's, else the images' size over the grid."""
        patch = getattr(model, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is not None:
            return tuple(int(v) for v in patch)
        images = src.get("image", outs.get("image"))
        if images is None:
            return None
        return _cell_size(tuple(images.shape[-2:]), grid)

    @staticmethod
    def _mask(src: dict, which: str, grid: tuple[int, int], patch) -> Tensor | None:
        """The (n, P) mask, or None when unknown or when some image has no such patch (as the trainer does:
        a hit-rate is reported only when every evaluated image has the part / a distractor)."""
        n = len(src["local_index"])
        mask = src.get(f"{which}_mask")
        if mask is None:
            boxes = src.get("part_box" if which == "part" else "distractor_boxes")
            if boxes is None or len(boxes) != n or patch is None:  # the trainer keeps boxes for the probe images only
                return None
            mask = patches_in_boxes(boxes.cpu(), grid, patch)
        mask = mask.cpu()
        return mask if mask.dim() == 2 and bool(mask.any(dim=1).all()) else None

    def _probe(self, trainer, grid: tuple[int, int]) -> dict:
        """The probe images (and their boxes and labels) with ``rollout_fn``'s rollout, selection, prediction."""
        outs = getattr(trainer, "eval_outputs", None) or {}
        src = outs if outs.get("image") is not None else self.probe_batch
        if src is None:
            raise ValueError("RolloutCallback: no probe images: trainer.eval_outputs has no 'image' and no "
                             "probe_batch was given")
        n = min(self.num_images, len(src["image"]))
        probe = {k: src[k][:n] for k in ("image", "part_box", "distractor_boxes", "label") if src.get(k) is not None}
        model = trainer.model
        ratio = self.ratio or getattr(model, "glca_ratio", None) or 0.1
        k = max(1, math.floor(ratio * grid[0] * grid[1]))
        probe.update(rollout_of(self.rollout_fn or dcal_rollout, model, probe["image"], grid, k))
        return probe

    def _save_figure(self, trainer, probe: dict, grid: tuple[int, int]) -> Path:
        model = trainer.model
        images, index = probe["image"], probe["local_index"]
        patch = self._patch_size(model, grid, probe, {})
        hit = None
        if probe.get("part_box") is not None and patch is not None:
            hit = hits(index, patches_in_boxes(probe["part_box"].cpu(), grid, patch))
        titles = []
        for i in range(len(images)):
            t = f"#{i}" if probe.get("pred") is None else f"#{i} pred {int(probe['pred'][i])}"
            if probe.get("label") is not None:
                t += f" / y {int(probe['label'][i])}"
            if hit is not None:
                t += " · hit" if bool(hit[i]) else " · miss"
            titles.append(t)
        cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", None) or {}
        fig = plot_rollout(images, probe["rollout"], grid, local_index=index, part_boxes=probe.get("part_box"),
                           distractor_boxes=probe.get("distractor_boxes"), titles=titles, mean=cfg.get("mean"),
                           std=cfg.get("std"))
        step = int(getattr(trainer, "step", 0) or 0)
        fig.suptitle(f"rollout and selected patches, step {step}", fontsize=9)
        folder = self.out_dir if self.out_dir is not None else Path(trainer.out_dir) / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rollout_step{step:06d}.png"
        path.write_bytes(png_bytes(fig, dpi=90))
        return path
