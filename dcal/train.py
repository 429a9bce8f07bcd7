"""The trainer: small functions, and a loop that announces events for callbacks (see `dcal.callbacks`).

Logging, checkpointing and every diagnostic are callbacks. The run folder holds `config.yaml` (the resolved
config with derived values), `metrics.jsonl` (one JSON object per optimiser step and per evaluation,
flushed as written), `last.pt`/`best.pt` (written atomically) and `train.log`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .callbacks import EVENTS, Callback
from .config import Config, config_from_dict, config_to_dict, derive, validate
from .errors import CheckpointError, ConfigError, NonFiniteLossError, RolloutError
from .loss import UncertaintyLoss, param_groups
from .metrics import chance_hit_rate, hits, patches_in_boxes
from .model import DCAL, build_model, fused_probs
from .schedule import build_scheduler

__all__ = ["Trainer", "MetricsLogger", "Checkpointer", "build_trainer", "load_checkpoint", "evaluate",
           "dry_run_lr", "setup_distributed", "BRANCHES"]

BRANCHES = ("sa", "glca", "pwca")
log = logging.getLogger("dcal.train")


# --------------------------------------------------------------------------- set-up helpers
def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the loop draws from, in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x


def build_datasets(cfg: Config, mean: Sequence[float], std: Sequence[float]) -> tuple[Dataset, Dataset, int]:
    """(train, test, num_classes) for cfg.data, validated before training starts."""
    from .data.transforms import build_transforms

    d = cfg.data
    train_tf = build_transforms(True, d.resize_size, d.img_size, mean, std)
    test_tf = build_transforms(False, d.resize_size, d.img_size, mean, std)
    if d.format == "synthetic":
        from .data.synthetic import SyntheticFGVC, SyntheticSpec, load_or_generate

        spec = SyntheticSpec(**{"img_size": d.img_size, **d.synthetic})
        if spec.img_size != d.img_size:
            raise ConfigError(f"data.synthetic.img_size ({spec.img_size}) differs from data.img_size ({d.img_size})")
        syn = load_or_generate(spec, d.cache_dir)
        return SyntheticFGVC(syn, "train", train_tf), SyntheticFGVC(syn, "test", test_tf), len(syn.class_names)
    if d.format == "cub":
        from .data.cub import CUB200 as Dataset_
    else:
        from .data.folder import ImageFolderFGVC as Dataset_
    tr = Dataset_(d.root, "train", transform=train_tf, skip_bad_images=d.skip_bad_images, logger=log)
    te = Dataset_(d.root, "test", transform=test_tf, skip_bad_images=d.skip_bad_images, logger=log)
    return tr, te, tr.num_classes


def normalisation(backbone: str) -> tuple[tuple, tuple]:
    """Mean and std of the backbone's pretrained config (timm's ImageNet defaults when it has none)."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if not timm.is_model(backbone):
        raise ConfigError(f"model.backbone: unknown timm model {backbone!r}")
    pc = timm.models.get_pretrained_cfg(backbone)
    if pc is None:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return tuple(pc.mean), tuple(pc.std)


def model_from_config(cfg: Config, num_classes: int) -> DCAL:
    m = cfg.model
    return build_model(m.backbone, num_classes=num_classes, img_size=cfg.data.img_size, pretrained=m.pretrained,
                       glca=m.glca, pwca=m.pwca, glca_ratio=m.glca_ratio, glca_placement=m.glca_placement,
                       drop_path_rate=m.drop_path_rate, glca_init=m.glca_init, glca_pool=m.glca_pool,
                       pwca_detach_kv=m.pwca_detach_kv, grad_checkpointing=m.grad_checkpointing, **m.timm_kwargs)


def active_branches(model: DCAL) -> tuple[str, ...]:
    return tuple(b for b, on in zip(BRANCHES, (True, model.glca is not None, model.pwca_enabled)) if on)


def build_optimizer(cfg: Config, model: torch.nn.Module, loss_fn: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    lr = cfg.derived["lr"]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, loss_fn, t.weight_decay), lr=lr, betas=(0.9, 0.999))
    # The seed system's optimiser: Adam with coupled L2 on every parameter, the w_i included.
    params = list(model.parameters()) + list(loss_fn.parameters())
    return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)


# --------------------------------------------------------------------------- callbacks the trainer ships
class MetricsLogger(Callback):
    """Writes the step and eval records to metrics.jsonl, one flushed line each (runs last)."""

    order = 100

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = None

    def before_fit(self, trainer):
        self.file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict):
        self.file.write(json.dumps(record, allow_nan=False, default=_jsonable) + "\n")
        self.file.flush()

    def after_step(self, trainer):
        self._write(_clean(trainer.record))

    def after_eval(self, trainer):
        self._write(_clean(trainer.eval_record))

    def after_fit(self, trainer):
        if self.file:
            self.file.close()
            self.file = None


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to metrics.jsonl")


def _clean(record: dict) -> dict:
    """Non-finite floats become null (JSON has no NaN); the `nonfinite` finding names them."""
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


class Checkpointer(Callback):
    """Writes last.pt after every epoch (and best.pt on a new best fused accuracy), atomically."""

    order = 90

    def __init__(self, out_dir: Path, save_best: bool = True):
        self.out_dir = Path(out_dir)
        self.save_best = save_best

    def after_epoch(self, trainer):
        trainer.save_checkpoint(self.out_dir / "last.pt")
        ev = trainer.last_eval
        if self.save_best and ev is not None and ev.get("step") == trainer.step:
            score = ev.get("acc_fused")
            if score is not None and score > trainer.best_score:
                trainer.best_score = score
                trainer.save_checkpoint(self.out_dir / "best.pt")


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Runs epochs of micro-batches, announcing events; owns nothing a callback could own."""

    def __init__(self, cfg: Config, model: DCAL, loss_fn: UncertaintyLoss, optimizer, scheduler,
                 train_loader: DataLoader, eval_loader: DataLoader, *, out_dir: Path | None,
                 device: torch.device, callbacks: Sequence[Callback] = (), rank: int = 0, world_size: int = 1,
                 ddp_model: torch.nn.Module | None = None):
        self.cfg, self.model, self.loss_fn = cfg, model, loss_fn
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device, self.rank, self.world_size = device, rank, world_size
        self.net = ddp_model or model  # what forward runs through (DDP wrapper when distributed)
        self.callbacks = sorted(callbacks, key=lambda c: c.order)
        self.branches = active_branches(model)
        self.step = 0
        self.epoch = 0
        self.elapsed = 0.0
        self.best_score = -math.inf
        self.last_eval: dict | None = None
        self.history: list[dict] = []
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
        self.skip_step = False
        self.batch = self.batch_rng_state = self.outputs = self.loss = self.grad_norm = None
        self.branch_losses: dict = {}
        self.record: dict = {}
        self.eval_record: dict = {}
        self.eval_outputs: dict = {}
        self.micro_step = 0
        self._logger = logging.getLogger("dcal.train")
        if cfg.train.amp == "fp16" and device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs CUDA (fp16 autocast with a GradScaler); use bf16 on CPU")

    # ------------------------------------------------------------------ events
    def emit(self, event: str) -> None:
        assert event in EVENTS, event
        for cb in self.callbacks:
            getattr(cb, event)(self)

    def log(self, message: str) -> None:
        self._logger.info(message)
        if self.out_dir is not None and self.rank == 0:
            with open(self.out_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(message + "\n")

    # ------------------------------------------------------------------ one micro-batch
    def autocast(self):
        amp = self.cfg.train.amp
        if amp == "off":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def compute_loss(self, batch: dict):
        """Forward and the uncertainty-weighted loss of one micro-batch: (total, branch losses, outputs)."""
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        with self.autocast():
            out = self.net(x)
        logits = {"sa": out.sa_logits, "glca": out.glca_logits, "pwca": out.pwca_logits}
        branch = {b: F.cross_entropy(logits[b].float(), y) for b in self.branches}
        total = self.loss_fn([branch[b] for b in self.branches])
        return total, branch, out

    def replay(self, batch: dict, state: dict) -> torch.Tensor:
        """Forward, loss and backward of `batch` under the RNG `state` (no optimiser step): for tier-2
        diagnostics. The current RNG state is restored afterwards."""
        saved = rng_state()
        set_rng_state(state)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            total, _, _ = self.compute_loss(batch)
            total.backward()
            return total.detach()
        finally:
            set_rng_state(saved)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict]:
        t = self.cfg.train
        total_steps = self.cfg.derived["total_steps"]
        accum = t.grad_accum_steps
        self.emit("before_fit")
        start = time.perf_counter() - self.elapsed
        try:
            while self.epoch < t.epochs and self.step < total_steps:
                self.net.train()
                self.loss_fn.train()
                self.emit("before_epoch")
                sampler = self.train_loader.sampler
                if isinstance(sampler, DistributedSampler):
                    sampler.set_epoch(self.epoch)
                elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
                    sampler.generator.manual_seed(t.seed * 100_003 + self.epoch)
                batches = self._progress(self.train_loader, f"epoch {self.epoch + 1}/{t.epochs}")
                sums = {}
                self.micro_step = 0
                for batch in batches:
                    self._micro_batch(batch, accum, sums)
                    if self.micro_step == accum:
                        self._optimizer_step(sums, start)
                        sums = {}
                        self.micro_step = 0
                        if hasattr(batches, "set_postfix"):
                            batches.set_postfix(loss=f"{self.record['loss']:.3f}", lr=f"{self.record['lr']:.2e}")
                        if self.step >= total_steps:
                            break
                # An incomplete accumulation at the end of an epoch is dropped (drop_last semantics).
                self.optimizer.zero_grad(set_to_none=True)
                self.epoch += 1
                self.elapsed = time.perf_counter() - start
                if self.epoch % t.eval_every == 0 or self.epoch >= t.epochs or self.step >= total_steps:
                    self.evaluate_and_log()
                self.emit("after_epoch")
        finally:
            self.elapsed = time.perf_counter() - start
            self.emit("after_fit")  # also on error: callbacks release hooks, files and tracking modes
        return self.history

    def _progress(self, loader, desc):
        if not self.cfg.train.progress or self.rank != 0:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)

    def _micro_batch(self, batch: dict, accum: int, sums: dict) -> None:
        self.batch = batch
        self.batch_rng_state = rng_state()
        self.emit("before_batch")
        sync = nullcontext()
        if self.net is not self.model and self.micro_step < accum - 1:
            sync = self.net.no_sync()  # DDP: all-reduce only on the last micro-batch
        with sync:
            try:
                total, branch, out = self.compute_loss(self.batch)  # a callback may have replaced the batch
            except RolloutError as e:
                if not e.nonfinite:
                    raise
                # A non-finite forward inside the SA blocks surfaces as a non-finite attention map. Let the
                # tier-1 diagnostics see a non-finite loss (they replay the batch and name the module), then stop.
                nan = torch.tensor(float("nan"))
                self.outputs, self.loss, self.branch_losses = None, nan, {b: nan for b in self.branches}
                self.grad_norm, self.skip_step = None, False
                self.emit("after_loss")
                self.emit("before_step")  # where tier-1 checks run; this step cannot complete either way
                raise NonFiniteLossError(f"step {self.step + 1} (epoch {self.epoch + 1}): the forward pass went "
                                         f"non-finite ({e}); last.pt keeps the last good checkpoint") from e
            self.outputs, self.loss, self.branch_losses = out, total, branch
            self.emit("after_forward")
            self.emit("after_loss")
            self.scaler.scale(total / accum).backward()
        for k, v in [("loss", total), *branch.items()]:
            sums[k] = sums.get(k, 0.0) + v.detach()
        self.micro_step += 1
        self.emit("after_backward")

    def _optimizer_step(self, sums: dict, start: float) -> None:
        t = self.cfg.train
        accum = t.grad_accum_steps
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad if t.clip_grad else float("inf"))
        self.skip_step = False
        self.emit("before_step")
        means = {k: (v / accum).item() for k, v in sums.items()}
        grad_norm = self.grad_norm.item()
        bad = [k for k, v in {**means, "grad_norm": grad_norm}.items() if not math.isfinite(v)]
        if bad and not self.skip_step:
            raise NonFiniteLossError(
                f"step {self.step + 1} (epoch {self.epoch + 1}): non-finite {', '.join(bad)} "
                f"({', '.join(f'{k}={means.get(k, grad_norm)}' for k in bad)}); the run stops here and "
                f"last.pt keeps the last good checkpoint. Attach diagnostics.NonFiniteCallback to name the module.")
        lr = self.optimizer.param_groups[0]["lr"]
        if self.skip_step:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        w = dict(zip(self.branches, self.loss_fn.weights().detach().tolist()))
        self.record = {"kind": "step", "step": self.step, "epoch": self.epoch, "lr": lr, "loss": means["loss"]}
        for b in BRANCHES:
            self.record[f"loss_{b}"] = means.get(b)
        for b in BRANCHES:
            self.record[f"w_{b}"] = w.get(b)
        self.record.update(grad_norm=grad_norm, time=round(time.perf_counter() - start, 4))
        if self.skip_step:
            self.record["skipped"] = True
        self.emit("after_step")

    # ------------------------------------------------------------------ evaluation
    def evaluate_and_log(self) -> dict:
        self.emit("before_eval")
        res, outputs = evaluate(self.model, self.eval_loader, self.device, autocast=self.autocast,
                                world_size=self.world_size)
        self.eval_outputs = outputs
        self.eval_record = {"kind": "eval", "step": self.step, "epoch": self.epoch, **res}
        self.emit("after_eval")
        self.last_eval = dict(self.eval_record)
        self.history.append(self.last_eval)
        self.log(json.dumps(_clean(self.last_eval)))
        return self.last_eval

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": "dcal-checkpoint-1",
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "elapsed": self.elapsed,
            "best_score": self.best_score,
            "rng": rng_state(),
            "metrics_bytes": _metrics_size(self.out_dir),
        }

    def save_checkpoint(self, path: Path) -> None:
        if self.rank != 0:
            return
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a kill leaves either the old or the new file, never half of one

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.loss_fn.load_state_dict(ckpt["loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.elapsed, self.best_score = ckpt["elapsed"], ckpt["best_score"]
        set_rng_state(ckpt["rng"])
        if self.out_dir is not None and self.rank == 0:
            _truncate_metrics(self.out_dir, ckpt["metrics_bytes"])


def _metrics_size(out_dir: Path | None) -> int:
    if out_dir is None:
        return 0
    p = Path(out_dir) / "metrics.jsonl"
    return p.stat().st_size if p.exists() else 0


def _truncate_metrics(out_dir: Path, size: int) -> None:
    """Drop records written after the checkpoint: the resumed run writes them again (no duplicates)."""
    p = Path(out_dir) / "metrics.jsonl"
    if p.exists() and p.stat().st_size > size:
        with open(p, "r+b") as f:
            f.truncate(size)


@torch.no_grad()
def evaluate(model: DCAL, loader: DataLoader, device: torch.device, *, autocast=nullcontext,
             world_size: int = 1, keep_images: int = 16) -> tuple[dict, dict]:
    """Accuracy of SA, GLCA and the fused prediction; part and distractor hit-rates when boxes exist.

    Returns (record fields, concatenated outputs: rollout, local_index, label, part_mask, distractor_mask,
    and the first `keep_images` images with their boxes).
    """
    model.eval()
    n = 0
    correct = {"sa": 0, "glca": 0, "fused": 0}
    loss_sa = 0.0
    keep: dict[str, list] = {k: [] for k in ("rollout", "local_index", "label", "part_mask", "distractor_mask")}
    probe: dict[str, list] = {"image": [], "part_box": [], "distractor_boxes": []}
    for batch in loader:
        x = batch["image"].to(device)
        y = batch["label"].to(device)
        with autocast():
            out = model(x)
        sa = out.sa_logits.float()
        correct["sa"] += (sa.argmax(-1) == y).sum().item()
        loss_sa += F.cross_entropy(sa, y, reduction="sum").item()
        if out.glca_logits is not None:
            correct["glca"] += (out.glca_logits.argmax(-1) == y).sum().item()
        correct["fused"] += (fused_probs(out.sa_logits, out.glca_logits).argmax(-1) == y).sum().item()
        n += len(y)
        keep["rollout"].append(out.rollout.cpu())
        keep["local_index"].append(out.local_index.cpu())
        keep["label"].append(y.cpu())
        if "part_box" in batch:
            keep["part_mask"].append(patches_in_boxes(batch["part_box"], model.grid_size, model.patch_size))
        if "distractor_boxes" in batch and batch["distractor_boxes"].numel():
            keep["distractor_mask"].append(patches_in_boxes(batch["distractor_boxes"], model.grid_size, model.patch_size))
        if sum(len(i) for i in probe["image"]) < keep_images:
            for k in probe:
                if k in batch:
                    probe[k].append(batch[k][: keep_images].cpu())
    if n == 0:
        raise ConfigError("the evaluation set is empty")
    outputs = {k: torch.cat(v) for k, v in keep.items() if v}
    outputs.update({k: torch.cat(v)[:keep_images] for k, v in probe.items() if v})
    totals = torch.tensor([n, correct["sa"], correct["glca"], correct["fused"], loss_sa], dtype=torch.float64)
    if world_size > 1:  # every rank evaluated its shard; hit-rates below are rank 0's shard
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    n, c_sa, c_glca, c_fused, l_sa = totals.tolist()
    res = {"acc_sa": c_sa / n, "acc_glca": c_glca / n if model.glca is not None else None, "acc_fused": c_fused / n,
           "loss_sa": l_sa / n, "num_classes": model.num_classes, "num_images": int(n)}
    res.update(part_hit=None, part_hit_chance=None, distractor_hit=None, part_hit_top1=None, distractor_hit_top1=None)
    pm = outputs.get("part_mask")
    if pm is not None and pm.any(dim=1).all():
        li = outputs["local_index"]
        res["part_hit"] = hits(li, pm).float().mean().item()
        res["part_hit_chance"] = chance_hit_rate(pm, li.shape[1])
        # The same for the single highest-scoring patch: with k larger than one mark's patches, the k
        # selected tokens can cover the part *and* a distractor; the top-1 says which one wins.
        res["part_hit_top1"] = hits(li[:, :1], pm).float().mean().item()
        dm = outputs.get("distractor_mask")
        if dm is not None and dm.any(dim=1).all():
            res["distractor_hit"] = hits(li, dm).float().mean().item()
            res["distractor_hit_top1"] = hits(li[:, :1], dm).float().mean().item()
    return res, outputs


# --------------------------------------------------------------------------- wiring
def build_trainer(cfg: Config, out_dir: str | Path | None, *, callbacks: Sequence[Callback] = (),
                  resume: bool = False) -> Trainer:
    """Validate the config, build data, model, loss, optimiser and schedule, and (optionally) resume."""
    validate(cfg)
    rank, world, local_rank = setup_distributed()
    device = resolve_device(cfg.train.device, local_rank)
    out = Path(out_dir) if out_dir is not None else None
    ckpt = None
    if resume:
        if out is None or not (out / "last.pt").exists():
            raise CheckpointError(f"--resume: {out}/last.pt does not exist (nothing to resume)")
        ckpt = load_checkpoint(out / "last.pt")
    elif out is not None and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
        raise ConfigError(f"{out} already holds a run (metrics.jsonl); use --resume to continue it or another --out")
    seed_everything(cfg.train.seed + rank)
    mean, std = normalisation(cfg.model.backbone)
    train_ds, test_ds, num_classes = build_datasets(cfg, mean, std)
    seed_everything(cfg.train.seed + rank)
    model = model_from_config(cfg, num_classes).to(device)
    t = cfg.train
    if world > 1:
        train_sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed, drop_last=True)
        test_sampler = DistributedSampler(test_ds, num_replicas=world, rank=rank, shuffle=False)
    else:
        train_sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(t.seed))
        test_sampler = SequentialSampler(test_ds)
    kw = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=train_sampler, drop_last=True, **kw)
    eval_loader = DataLoader(test_ds, batch_size=max(t.batch_size, 64), sampler=test_sampler, **kw)
    steps_per_epoch = len(train_loader) // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size × grad_accum_steps × world size = {t.batch_size * t.grad_accum_steps * world} "
                          f"exceeds the {len(train_ds)} training images: no optimiser step per epoch")
    derive(cfg, world_size=world, steps_per_epoch=steps_per_epoch, num_classes=num_classes)
    loss_fn = UncertaintyLoss(len(active_branches(model)), init=t.uncertainty_init,
                              bounds=tuple(t.uncertainty_bounds) if t.uncertainty_bounds else None).to(device)
    optimizer = build_optimizer(cfg, model, loss_fn)
    d = cfg.derived
    scheduler = build_scheduler(optimizer, total_steps=d["total_steps"], warmup_steps=d["warmup_steps"],
                                peak=d["lr"], floor=t.min_lr)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    cbs = list(callbacks)
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cbs += [MetricsLogger(out / "metrics.jsonl"), Checkpointer(out, t.save_best)]
    trainer = Trainer(cfg, model, loss_fn, optimizer, scheduler, train_loader, eval_loader, out_dir=out,
                      device=device, callbacks=cbs, rank=rank, world_size=world, ddp_model=ddp)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    if out is not None and rank == 0:
        with open(out / "config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    return trainer


def load_checkpoint(path: str | Path) -> dict:
    """Read a trainer checkpoint with `weights_only=True`, raising CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many types; name the file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != "dcal-checkpoint-1":
        raise CheckpointError(f"{path}: not a dcal trainer checkpoint (no format marker)")
    return ckpt


def config_of_checkpoint(ckpt: dict) -> Config:
    return config_from_dict(ckpt["config"])


def dry_run_lr(cfg: Config, steps_per_epoch: int, world_size: int = 1) -> list[float]:
    """The LR of every optimiser step, read from the real optimiser and scheduler (no data, no training)."""
    import copy

    cfg = derive(copy.deepcopy(cfg), world_size=world_size, steps_per_epoch=steps_per_epoch, num_classes=2)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.derived["lr"])
    d = cfg.derived
    sched = build_scheduler(opt, total_steps=d["total_steps"], warmup_steps=d["warmup_steps"], peak=d["lr"],
                            floor=cfg.train.min_lr)
    lrs = []
    for _ in range(d["total_steps"]):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs
