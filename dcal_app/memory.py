"""``dcal memory``: will this run fit on this GPU? Predicted from shapes, at the device level, not measured.

  dcal memory --preset NAME [--set KEY=VALUE ...] [--precision fp32|fp16|bf16] [--gpu-memory GiB] [--json]
  dcal memory --model TIMM_NAME --img-size PX --batch-size B [--num-classes C] [--dcal|--no-dcal]
              [--optimizer adamw|adam|sgd] [--grad-accum N] [--checkpointing] [--precision ...] [--gpu-memory GiB]

``--preset``: the model is `dcal.train.model_from_config` built on the meta device (``pretrained=False``: no
weight is read or downloaded), the loss is the trainer's (`dcal.UncertaintyLoss` over the active branches'
cross-entropies), the optimiser `dcal.train.build_optimizer`'s; `predict_step_memory` runs a training step,
an evaluation step (the trainer's evaluation batch, ``max(batch_size, 64)``) and the first training step after
it. ``--model``: any timm model at that size and micro-batch, as DCAL (the trainer's loss) or plain
(``--no-dcal``: cross-entropy), with the optimiser named (state size: AdamW = Adam = 2 tensors per
parameter, SGD with momentum = 1); training step only.

The answer is device-level: `diagnostics.memory.device_memory` adds to PyTorch's allocated peak the caching
allocator's segments (a replay of the step's allocations), the fragmentation the predecessor's log shows,
the cuBLAS workspaces and the CUDA context, each with its source; ``fits`` compares that sum with
``--gpu-memory``. ``max_batch`` is the largest micro-batch whose device-level figure fits.
"""
from __future__ import annotations

import copy
import json
import math
import time

import torch
import torch.nn as nn

from dcal.build import eval_batch_size
from diagnostics.memory.device import CUDA_CONTEXT_BYTES, FRAGMENTATION, fits_on_gpu

__all__ = ["run", "predict_config", "predict_model", "fits_on_gpu", "CUDA_CONTEXT_BYTES", "FRAGMENTATION"]

GiB = 2 ** 30
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
              "sgd": lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9)}
_AMP_TO_PRECISION = {"off": "fp32", "fp16": "fp16", "bf16": "bf16"}
_MAX_BATCH_TRIES = 5  # at most this many more predictions to find the largest batch (2 when the line holds)


class _TrainerLoss(nn.Module):
    """The trainer's loss on a DCALOutput: `dcal.UncertaintyLoss` over the active branches' fp32
    cross-entropies, against random labels (only their shape matters)."""

    def __init__(self, branches: tuple[str, ...], init):
        super().__init__()
        import dcal

        self.branches = branches
        self.uncertainty = dcal.UncertaintyLoss(len(branches), init=init)

    def forward(self, out) -> torch.Tensor:
        from dcal.loss import branch_losses

        z = out.sa_logits
        y = torch.randint(0, z.shape[1], (z.shape[0],), device=z.device)
        return self.uncertainty(branch_losses(out, y, self.branches))


# ============================================================================ --preset
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


# ============================================================================ --model
def _timm_model(name: str, img_size: int, num_classes: int, use_dcal: bool, checkpointing: bool):
    """The model (and the loss: the trainer's for DCAL, None = cross-entropy otherwise) on the meta device."""
    import timm

    from dcal.errors import ConfigError

    if not timm.is_model(name):
        raise ConfigError(f"--model {name!r}: not a timm model name (timm.list_models() lists them)")
    with torch.device("meta"):
        if use_dcal:
            import dcal
            from dcal.train import active_branches

            model = dcal.build_model(name, num_classes=num_classes, img_size=img_size, pretrained=False,
                                     grad_checkpointing=checkpointing)
            return model, _TrainerLoss(active_branches(model), 0.0)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)  # a CNN: any input size
    if checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"--checkpointing: timm model {name!r} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    return model, None


def predict_model(name: str, img_size: int, batch_size: int, *, num_classes: int = 200, use_dcal: bool = True,
                  precision: str = "fp32", optimizer: str = "adamw", grad_accum_steps: int = 1,
                  checkpointing: bool = False, target: str = "cuda"):
    """`predict_step_memory` for timm model `name` trained at `img_size` px, micro-batch `batch_size`.

    Args:
        name: a timm model name (a ViT with a class token for DCAL).
        use_dcal: DCAL with the trainer's loss; False: the plain timm model with cross-entropy.
        precision, optimizer, grad_accum_steps, checkpointing: as the command's options.
    """
    from diagnostics.memory.predict import predict_step_memory

    model, loss = _timm_model(name, img_size, num_classes, use_dcal, checkpointing)

    def opt(m, lf):
        params = [*m.parameters(), *(lf.parameters() if isinstance(lf, nn.Module) else [])]
        return OPTIMIZERS[optimizer]([p for p in params if p.requires_grad])

    return predict_step_memory(model, (batch_size, 3, img_size, img_size), loss_fn=loss, optimizer=opt,
                               amp_dtype=PRECISIONS[precision], grad_accum_steps=grad_accum_steps, target=target)


# ============================================================================ the answer
def _device(pred, args) -> dict | None:
    if pred.target != "cuda":
        return None
    gpu = None if args.gpu_memory is None else int(args.gpu_memory * GiB)
    return pred.device_memory(sm_major=args.sm, gpu_bytes=gpu).as_dict()


def _max_batch(predict, b1: int, first, lo: int, gpu: int, args) -> tuple[int | None, bool, int]:
    """The largest micro-batch whose device-level figure fits on `gpu` bytes. A line through the prediction at
    `b1` (its batch-dependent bytes, from the composition), then secants through the checked predictions,
    kept inside the bracket (largest that fits, smallest that does not). Returns (batch or None, exact: the
    batch above it was predicted not to fit, predictions spent). `predict(b)` is the prediction at batch b."""
    def device(pred) -> int:
        return pred.device_memory(sm_major=args.sm, gpu_bytes=gpu).device_bytes

    comp = first.train[first.peak_phase].composition
    fixed = comp["parameters"] + comp["optimizer_state"] + comp["gradients"]
    need1 = device(first)
    ok, bad = (b1, None) if need1 <= gpu else (None, b1)
    last = (b1, need1)
    slope = max((first.peak_bytes - fixed) * (1 + FRAGMENTATION) / b1, 1.0)  # device bytes per image
    spent = 0
    while spent < _MAX_BATCH_TRIES:
        if ok is not None and bad is not None and bad <= ok + 1:
            return ok, True, spent
        if ok is None and bad is not None and bad <= lo:
            return None, True, spent
        b = math.floor(last[0] + (gpu - last[1]) / slope)  # the secant; safeguarded into the bracket:
        floor_, ceil_ = (ok if ok is not None else lo - 1), bad
        if ceil_ is not None and not floor_ < b < ceil_:
            b = (floor_ + ceil_) // 2 if ceil_ - floor_ > 1 else ceil_ - 1
        elif ceil_ is None and b <= floor_:
            b = floor_ + 1  # the line says the largest that fits is known: check the next batch
        need = device(predict(b))
        spent += 1
        if need <= gpu:
            ok = max(ok or 0, b)
        else:
            bad = b if bad is None else min(bad, b)
        if b != last[0]:
            slope = max((need - last[1]) / (b - last[0]), 1.0)
        last = (b, need)
    return ok, ok is not None and bad is not None and bad <= ok + 1, spent


def _report_text(res: dict) -> str:
    mb = 2 ** 20
    what = f"--preset {res['preset']}" if res.get("preset") else f"--model {res['model']}"
    lines = [f"dcal memory {what}: {res['model']}{'' if res['dcal'] else ' (plain timm)'}, {res['img_size']} px, "
             f"micro-batch {res['batch_size']} × accumulation {res['grad_accum_steps']}, {res['precision']}, "
             f"target {res['target']}",
             "predicted peak (PyTorch-allocated, MiB):"]
    rows = [("training step", "peak_bytes")]
    if res.get("eval_peak_bytes") is not None:
        rows += [(f"evaluation step (batch {res['eval_batch_size']})", "eval_peak_bytes"),
                 ("first training step after evaluation", "train_after_eval_peak_bytes")]
    for name, key in rows:
        lines.append(f"  {name:<42} {res[key] / mb:>10.0f}")
    comp = res["train_composition"]
    lines.append(f"  training peak in {res['peak_phase']}: " + ", ".join(f"{k} {v / mb:.0f}" for k, v in comp.items() if v))
    dev = res["device"]
    if dev is not None:
        lines.append(f"what the card must hold: {dev['device_bytes'] / GiB:.2f} GiB")
        for k, t in dev["terms"].items():
            lines.append(f"  {k:<14} {t['bytes'] / mb:>8.0f} MiB  {t['source']}")
        lines.append("  not modelled: " + "; ".join(dev["unmodelled"]))
    if res["gpu_memory_bytes"] is not None:
        verdict = "fits" if res["fits"] else "does NOT fit"
        lines.append(f"on a {res['gpu_memory_bytes'] / GiB:.2f} GiB GPU: {verdict}; largest micro-batch that fits: "
                     f"{res['max_batch']}{'' if res['max_batch_exact'] else ' (not bracketed: the next was not predicted)'}")
    lines.append(f"({res['seconds']:.1f} s)")
    return "\n".join(lines)


def run(args) -> int:
    """``dcal memory`` (the options are declared in `dcal_app.cli`): predict, print text or JSON, return 0.

    Args:
        args: a namespace with preset or model (and the options of each), precision, gpu_memory, sm,
            num_classes, target, json.
    """
    from dcal.errors import ConfigError

    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise ConfigError(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}")
    if args.gpu_memory is not None and args.target != "cuda":
        raise ConfigError("--gpu-memory needs --target cuda (the device-level figure is a CUDA one)")
    start = time.perf_counter()
    if args.preset is not None:
        cfg, num_classes = _config(args.preset, args.set or [], args.num_classes)
        precision = args.precision or _AMP_TO_PRECISION[cfg.train.amp]
        pred = predict_config(cfg, num_classes, precision, target=args.target)
        b, lo = cfg.train.batch_size, 2 if cfg.model.pwca else 1
        res = {"preset": args.preset, "model": cfg.model.backbone, "dcal": True, "img_size": cfg.data.img_size,
               "batch_size": b, "grad_accum_steps": cfg.train.grad_accum_steps, "eval_batch_size": eval_batch_size(b),
               "eval_peak_bytes": pred.eval_peak_bytes, "train_after_eval_peak_bytes": pred.train_after_eval_peak_bytes}

        def again(batch):
            return predict_config(cfg, num_classes, precision, batch_size=batch, target=args.target)
    else:
        missing = [o for o, v in (("--img-size", args.img_size), ("--batch-size", args.batch_size)) if v is None]
        if missing or args.set:
            raise ConfigError(f"--model needs {' and '.join(missing)}" if missing else "--set goes with --preset")
        if args.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be >= 1, got {args.grad_accum}")
        precision = args.precision or "fp32"
        kw = dict(num_classes=args.num_classes or 200, use_dcal=args.dcal, precision=precision,
                  optimizer=args.optimizer, grad_accum_steps=args.grad_accum, checkpointing=args.checkpointing,
                  target=args.target)
        pred = predict_model(args.model, args.img_size, args.batch_size, **kw)
        b, lo = args.batch_size, 2 if args.dcal else 1  # PWCA pairs images within the batch
        res = {"preset": None, "model": args.model, "dcal": args.dcal, "img_size": args.img_size, "batch_size": b,
               "grad_accum_steps": args.grad_accum, "optimizer": args.optimizer, "checkpointing": args.checkpointing}

        def again(batch):
            return predict_model(args.model, args.img_size, batch, **kw)
    res.update({
        "precision": precision, "target": args.target, "peak_bytes": pred.peak_bytes, "peak_phase": pred.peak_phase,
        "train_composition": pred.train[pred.peak_phase].composition,
        "phases": {k: v.as_dict() for k, v in pred.train.items()},
        "device": _device(pred, args), "gpu_memory_bytes": None, "fits": None, "max_batch": None,
        "data_reads": pred.data_reads,
    })
    res["device_bytes"] = None if res["device"] is None else res["device"]["device_bytes"]
    if args.gpu_memory is not None:
        gpu = int(args.gpu_memory * GiB)
        best, exact, spent = _max_batch(again, b, pred, lo, gpu, args)
        res.update(gpu_memory_bytes=gpu, fits=res["device_bytes"] <= gpu, max_batch=best, max_batch_exact=exact,
                   max_batch_predictions=spent)
    if args.preset is not None:
        res["largest_batch"] = res["max_batch"]  # the name before issue 19
    res["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(res) if args.json else _report_text(res))
    return 0
