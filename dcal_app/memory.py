"""``dcal memory``: will the configuration the trainer would build fit on a GPU? Predicted, not measured.

  dcal memory --preset NAME [--set KEY=VALUE ...] [--precision fp32|fp16|bf16] [--gpu-memory GiB] [--json]

The model is `dcal.train.model_from_config` built on the meta device (``pretrained=False``: no weight is
read or downloaded), the loss is the trainer's (`dcal.UncertaintyLoss` over the active branches' cross-
entropies), the optimiser `dcal.train.build_optimizer`'s; `predict_step_memory` runs a training step, an
evaluation step (the trainer's evaluation batch, ``max(batch_size, 64)``) and the first training step after it.

Headroom (``--gpu-memory``): PyTorch's counters do not include the CUDA context (about 0.3–0.6 GiB on
current GPUs and drivers; we reserve `CUDA_CONTEXT_BYTES`), and the caching allocator holds blocks it cannot
reuse for a request of another size (fragmentation; the seed's log shows 1.25 GiB reserved-but-unallocated
next to 14.12 GiB allocated, 8.9 %; we reserve `FRAGMENTATION` of the peak). A configuration fits when
``peak × (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES ≤ GPU memory``.
"""
from __future__ import annotations

import copy
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcal.build import eval_batch_size

__all__ = ["run", "predict_config", "fits_on_gpu", "CUDA_CONTEXT_BYTES", "FRAGMENTATION"]

GiB = 2 ** 30
CUDA_CONTEXT_BYTES = GiB // 2  # the CUDA context and kernels' module images, outside PyTorch's counters
FRAGMENTATION = 0.10  # reserved-but-unallocated share of the peak (the seed's OOM log: 8.9 %), rounded up
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_AMP_TO_PRECISION = {"off": "fp32", "fp16": "fp16", "bf16": "bf16"}
_MAX_BATCH_TRIES = 6  # predictions spent verifying the largest batch after the linear estimate


class _TrainerLoss(nn.Module):
    """The trainer's loss on a DCALOutput: `dcal.UncertaintyLoss` over the active branches' fp32
    cross-entropies, against random labels (only their shape matters)."""

    def __init__(self, branches: tuple[str, ...], init):
        super().__init__()
        import dcal

        self.branches = branches
        self.uncertainty = dcal.UncertaintyLoss(len(branches), init=init)

    def forward(self, out) -> torch.Tensor:
        logits = [getattr(out, f"{b}_logits") for b in self.branches]
        y = torch.randint(0, logits[0].shape[1], (logits[0].shape[0],), device=logits[0].device)
        return self.uncertainty([F.cross_entropy(z.float(), y) for z in logits])


def _num_classes(cfg, given: int | None) -> int:
    from dcal.errors import ConfigError

    if given is not None:
        return given
    if cfg.data.format == "cub":
        return 200  # CUB-200-2011
    if cfg.data.format == "synthetic":
        from dcal.data import SyntheticSpec

        return SyntheticSpec(**cfg.data.synthetic).num_classes
    raise ConfigError(f"data.format={cfg.data.format}: the number of classes comes from the dataset; pass --num-classes")


def _config(preset_name: str, overrides: list[str], num_classes: int | None):
    from dcal.config import apply_overrides, derive, preset, validate

    cfg = apply_overrides(preset(preset_name), overrides)
    checked = copy.deepcopy(cfg)
    if checked.data.format in ("cub", "imagefolder") and not checked.data.root:
        checked.data.root = "(not read: dcal memory needs no data)"
    validate(checked)
    c = _num_classes(cfg, num_classes)
    return derive(cfg, world_size=1, steps_per_epoch=1, num_classes=c), c


def _build(cfg, num_classes: int):
    """The trainer's model and loss, on the meta device (``pretrained=False``: nothing is read)."""
    from dcal.train import active_branches, model_from_config

    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = False
    with torch.device("meta"):
        model = model_from_config(cfg, num_classes)
        loss = _TrainerLoss(active_branches(model), cfg.train.uncertainty_init)
    return model, loss


def predict_config(cfg, num_classes: int, precision: str, *, batch_size: int | None = None,
                   target: str = "cuda", evaluate: bool = True):
    """`predict_step_memory` for the run `cfg` describes (at `batch_size`, default the config's).

    Args:
        cfg: a derived `dcal.config.Config`.
        num_classes: classes of the heads.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast dtype of the forward).
        batch_size: micro-batch to predict for (default ``cfg.train.batch_size``).
        target: ``cuda`` or ``cpu``.
        evaluate: also the evaluation step and the first training step after it.
    """
    from dcal.train import build_optimizer
    from diagnostics.memory.predict import predict_step_memory

    b = batch_size or cfg.train.batch_size
    model, loss = _build(cfg, num_classes)
    img = cfg.data.img_size
    return predict_step_memory(
        model, (b, 3, img, img), loss_fn=loss, optimizer=lambda m, lf: build_optimizer(cfg, m, lf.uncertainty),
        amp_dtype=PRECISIONS[precision], grad_accum_steps=cfg.train.grad_accum_steps, target=target,
        eval_inputs=(eval_batch_size(b), 3, img, img) if evaluate else None)


def _worst(pred) -> int:
    return max(v for v in (pred.peak_bytes, pred.eval_peak_bytes, pred.train_after_eval_peak_bytes) if v is not None)


def fits_on_gpu(peak_bytes: int, gpu_bytes: int) -> bool:
    """True when ``peak × (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES ≤ gpu_bytes`` (module docstring)."""
    return peak_bytes * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES <= gpu_bytes


def _largest_batch(cfg, num_classes: int, precision: str, gpu_bytes: int, first, target: str) -> int | None:
    """The largest micro-batch whose worst step fits: a line through two predictions, then checked."""
    b1 = cfg.train.batch_size
    b2 = b1 + max(2, b1)
    second = predict_config(cfg, num_classes, precision, batch_size=b2, target=target, evaluate=False)
    slope = max(second.peak_bytes - first.peak_bytes, 1) / (b2 - b1)  # bytes per image of the training step
    budget = (gpu_bytes - CUDA_CONTEXT_BYTES) / (1 + FRAGMENTATION)
    lo = 2 if cfg.model.pwca else 1
    leftover = first.train_after_eval_peak_bytes - first.peak_bytes  # what an evaluation leaves alive
    b = max(lo, math.floor(b1 + (budget - first.peak_bytes - max(leftover, 0)) / slope))
    for _ in range(_MAX_BATCH_TRIES):
        # The evaluation batch is max(b, 64): below 64 its peak is the one already predicted.
        same_eval = eval_batch_size(b) == eval_batch_size(b1)
        pred = predict_config(cfg, num_classes, precision, batch_size=b, target=target, evaluate=not same_eval)
        worst = _worst(pred) if not same_eval else max(pred.peak_bytes + leftover, first.eval_peak_bytes)
        if fits_on_gpu(worst, gpu_bytes):
            return b
        if b <= lo:
            return None
        b = max(lo, min(b - 1, math.floor(b * 0.95)))
    return None


def _report_text(res: dict) -> str:
    mb = 2 ** 20
    lines = [f"dcal memory --preset {res['preset']}: {res['model']}, {res['img_size']} px, micro-batch "
             f"{res['batch_size']} × accumulation {res['grad_accum_steps']}, {res['precision']}, target {res['target']}",
             "predicted peak (PyTorch-allocated, MiB; CUDA allocator rounding modelled, context not):"]
    for name, key in (("training step", "peak_bytes"), (f"evaluation step (batch {res['eval_batch_size']})",
                                                        "eval_peak_bytes"),
                      ("first training step after evaluation", "train_after_eval_peak_bytes")):
        lines.append(f"  {name:<42} {res[key] / mb:>10.0f}")
    comp = res["train_composition"]
    lines.append(f"  training peak in {res['peak_phase']}: " + ", ".join(
        f"{k} {v / mb:.0f}" for k, v in comp.items() if v))
    if res["gpu_memory_bytes"] is not None:
        verdict = "fits" if res["fits"] else "does NOT fit"
        lines.append(f"on a {res['gpu_memory_bytes'] / GiB:.2f} GiB GPU: {verdict} (needs peak × "
                     f"{1 + FRAGMENTATION:.2f} + {CUDA_CONTEXT_BYTES / GiB:.1f} GiB context = "
                     f"{res['needed_bytes'] / GiB:.2f} GiB); largest micro-batch that fits: {res['largest_batch']}")
    lines.append(f"({res['seconds']:.1f} s)")
    return "\n".join(lines)


def run(args) -> int:
    """``dcal memory`` (the options are declared in `dcal_app.cli`): predict, print text or JSON, return 0.

    Args:
        args: a namespace with preset, set, precision, gpu_memory, num_classes, target, json.
    """
    from dcal.errors import ConfigError

    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise ConfigError(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}")
    start = time.perf_counter()
    cfg, num_classes = _config(args.preset, args.set or [], args.num_classes)
    precision = args.precision or _AMP_TO_PRECISION[cfg.train.amp]
    pred = predict_config(cfg, num_classes, precision, target=args.target)
    res = {
        "preset": args.preset, "model": cfg.model.backbone, "img_size": cfg.data.img_size,
        "batch_size": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
        "eval_batch_size": eval_batch_size(cfg.train.batch_size), "precision": precision, "target": args.target,
        "peak_bytes": pred.peak_bytes, "peak_phase": pred.peak_phase, "eval_peak_bytes": pred.eval_peak_bytes,
        "train_after_eval_peak_bytes": pred.train_after_eval_peak_bytes,
        "train_composition": pred.train[pred.peak_phase].composition,
        "gpu_memory_bytes": None, "fits": None, "needed_bytes": None, "largest_batch": None,
        "headroom": {"cuda_context_bytes": CUDA_CONTEXT_BYTES, "fragmentation": FRAGMENTATION},
        "data_reads": pred.data_reads,
    }
    if args.gpu_memory is not None:
        gpu = int(args.gpu_memory * GiB)
        worst = _worst(pred)
        res.update(gpu_memory_bytes=gpu, fits=fits_on_gpu(worst, gpu),
                   needed_bytes=int(worst * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES),
                   largest_batch=_largest_batch(cfg, num_classes, precision, gpu, pred, args.target))
    res["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(res) if args.json else _report_text(res))
    return 0
