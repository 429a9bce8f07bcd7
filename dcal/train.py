"""The trainer: a loop that announces events for callbacks (see `dcal.callbacks`), and `build_trainer`,
which wires a run from a `Config`.

Logging, checkpointing and every diagnostic are callbacks. The run folder (its layout, records and
encoding: `dcal.runfolder`) holds `config.yaml` (the resolved config with derived values), `metrics.jsonl`
(one JSON object per optimiser step and per evaluation, flushed as written, and an ``end`` record when the
run completes or dies: `dcal.metrics_log`), `last.pt`/`best.pt` (written atomically: `dcal.checkpoint`) and
`train.log`, all through one `dcal.runfolder.RunWriter`.

The parts live in their own modules and are re-exported here: `dcal.distributed` (process group, shards),
`dcal.build` (datasets, loaders, model, optimiser from a Config), `dcal.evaluate`, `dcal.checkpoint`,
`dcal.metrics_log`, `dcal.rng`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .build import (
    active_branches,
    build_datasets,
    build_loaders,
    build_optimizer,
    dry_run_lr,
    model_from_config,
    normalisation,
)
from .callbacks import EVENTS, Callback
from .checkpoint import CHECKPOINT_FORMAT, Checkpointer, config_of_checkpoint, load_checkpoint, save_atomic
from .config import Config, config_to_dict, derive, validate
from .distributed import resolve_device, setup_distributed, teardown_distributed
from .errors import CheckpointError, ConfigError, NonFiniteLossError, RolloutError
from .evaluate import evaluate
from .loss import BRANCHES, UncertaintyLoss, branch_losses
from .metrics_log import MetricsLogger, clean_record
from .model import DCAL
from .rng import rng_state, seed_everything, set_rng_state
from .runfolder import (
    AMP_OVERFLOW,
    LAST_CHECKPOINT,
    METRICS_FILE,
    RunWriter,
    end_record,
    metrics_size,
    truncate_metrics,
)
from .schedule import build_scheduler

__all__ = ["Trainer", "MetricsLogger", "Checkpointer", "build_trainer", "load_checkpoint", "evaluate",
           "dry_run_lr", "setup_distributed", "teardown_distributed", "BRANCHES", "build_datasets",
           "build_loaders", "build_optimizer", "model_from_config", "normalisation", "active_branches",
           "config_of_checkpoint", "resolve_device", "seed_everything", "rng_state", "set_rng_state"]

log = logging.getLogger("dcal.train")


class Trainer:
    """Runs epochs of micro-batches, announcing events; owns nothing a callback could own."""

    def __init__(self, cfg: Config, model: DCAL, loss_fn: UncertaintyLoss, optimizer, scheduler,
                 train_loader: DataLoader, eval_loader: DataLoader, *, out_dir: Path | None,
                 device: torch.device, callbacks: Sequence[Callback] = (), rank: int = 0, world_size: int = 1,
                 ddp_model: torch.nn.Module | None = None, run_writer: RunWriter | None = None):
        self.cfg, self.model, self.loss_fn = cfg, model, loss_fn
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if run_writer is None and self.out_dir is not None and rank == 0:
            run_writer = RunWriter(self.out_dir, resume=True)  # build_trainer refuses a folder holding a run
        self.run_writer = run_writer  # the run folder's one writer (rank 0 only; None without a folder)
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
        self.end_record: dict | None = None  # set by fit when the run ends (the metrics logger writes it)
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
        if self.run_writer is not None:
            self.run_writer.log(message)

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
        branch = dict(zip(self.branches, branch_losses(out, y, self.branches)))
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
        """Train to `train.epochs` (or `max_steps`), evaluating per `eval_every`; returns the eval history.

        However it ends, `end_record` is set before the `after_fit` event (the metrics logger writes it as
        metrics.jsonl's last line): ``completed``, or ``crashed`` with the exception, which is re-raised.
        """
        self.end_record = None
        start = time.perf_counter() - self.elapsed
        try:
            self.emit("before_fit")
            self._epochs(start)
        except BaseException as e:  # every way of dying (OOM, NaN, Ctrl-C) is recorded, then re-raised
            self.end_record = end_record("crashed", self.step, self.epoch, e)
            raise
        else:
            self.end_record = end_record("completed", self.step, self.epoch)
        finally:
            self.elapsed = time.perf_counter() - start
            self.emit("after_fit")  # also on error: callbacks release hooks, files and tracking modes
        return self.history

    def _epochs(self, start: float) -> None:
        t = self.cfg.train
        total_steps = self.cfg.derived["total_steps"]
        while self.epoch < t.epochs and self.step < total_steps:
            self.net.train()
            self.loss_fn.train()
            self.emit("before_epoch")
            self._seed_sampler()
            self._epoch_batches(start, total_steps)
            # An incomplete accumulation at the end of an epoch is dropped (drop_last semantics).
            self.optimizer.zero_grad(set_to_none=True)
            self.epoch += 1
            self.elapsed = time.perf_counter() - start
            if self.epoch % t.eval_every == 0 or self.epoch >= t.epochs or self.step >= total_steps:
                self.evaluate_and_log()
            self.emit("after_epoch")

    def _seed_sampler(self) -> None:
        sampler = self.train_loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.epoch)
        elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
            sampler.generator.manual_seed(self.cfg.train.seed * 100_003 + self.epoch)

    def _epoch_batches(self, start: float, total_steps: int) -> None:
        t = self.cfg.train
        accum = t.grad_accum_steps
        batches = self._progress(self.train_loader, f"epoch {self.epoch + 1}/{t.epochs}")
        sums = {}
        self.micro_step = 0
        for batch in batches:
            self._micro_batch(batch, accum, sums)
            if self.micro_step < accum:
                continue
            self._optimizer_step(sums, start)
            sums = {}
            self.micro_step = 0
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{self.record['loss']:.3f}", lr=f"{self.record['lr']:.2e}")
            if self.step >= total_steps:
                break

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
        # fp16: scaled gradients that overflow are the GradScaler's to skip (scaler.step does, and lowers its
        # scale); only a non-finite loss, or gradients without a scaler, stop the run.
        overflow = bad == ["grad_norm"] and self.scaler.is_enabled()
        if bad and not self.skip_step and not overflow:
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
        elif overflow:
            self.record.update(skipped=True, skip_reason=AMP_OVERFLOW)
        self.emit("after_step")

    # ------------------------------------------------------------------ evaluation
    def evaluate_and_log(self) -> dict:
        self.emit("before_eval")
        res, outputs = evaluate(self.model, self.eval_loader, self.device, autocast=self.autocast)
        self.eval_outputs = outputs
        self.eval_record = {"kind": "eval", "step": self.step, "epoch": self.epoch, **res}
        self.emit("after_eval")
        self.last_eval = dict(self.eval_record)
        self.history.append(self.last_eval)
        self.log(json.dumps(clean_record(self.last_eval)))
        return self.last_eval

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
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
            "metrics_bytes": metrics_size(self.out_dir),
        }

    def save_checkpoint(self, path: Path) -> None:
        if self.rank != 0:
            return
        save_atomic(self.state_dict(), Path(path))

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
            truncate_metrics(self.out_dir, ckpt["metrics_bytes"])


# --------------------------------------------------------------------------- wiring
def build_trainer(cfg: Config, out_dir: str | Path | None, *, callbacks: Sequence[Callback] = (),
                  resume: bool = False) -> Trainer:
    """Validate the config, build data, model, loss, optimiser and schedule, and (optionally) resume.

    Under torchrun this initialises the process group; end the run with
    `dcal.distributed.teardown_distributed()` (the CLI does, also on error).
    """
    validate(cfg)
    out = Path(out_dir) if out_dir is not None else None
    ckpt = _checkpoint_to_resume(out, resume)
    rank, world, local_rank = setup_distributed()
    device = resolve_device(cfg.train.device, local_rank)
    t = cfg.train
    seed_everything(t.seed + rank)
    train_ds, test_ds, num_classes = build_datasets(cfg, *normalisation(cfg.model.backbone))
    seed_everything(t.seed + rank)
    model = model_from_config(cfg, num_classes).to(device)
    train_loader, eval_loader = build_loaders(cfg, train_ds, test_ds, rank=rank, world_size=world, device=device)
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
    writer = None
    if out is not None and rank == 0:
        writer = RunWriter(out, resume=resume)
        out.mkdir(parents=True, exist_ok=True)
        cbs += [MetricsLogger(writer), Checkpointer(out, t.save_best)]
    trainer = Trainer(cfg, model, loss_fn, optimizer, scheduler, train_loader, eval_loader, out_dir=out,
                      device=device, callbacks=cbs, rank=rank, world_size=world, ddp_model=ddp, run_writer=writer)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    if writer is not None:
        writer.write_config(config_to_dict(cfg))
    return trainer


def _checkpoint_to_resume(out: Path | None, resume: bool) -> dict | None:
    """last.pt for --resume; refuse to write a new run into a folder that already holds one."""
    if resume:
        if out is None or not (out / LAST_CHECKPOINT).exists():
            raise CheckpointError(f"--resume: {out}/{LAST_CHECKPOINT} does not exist (nothing to resume)")
        return load_checkpoint(out / LAST_CHECKPOINT)
    if out is not None and (out / METRICS_FILE).exists() and (out / METRICS_FILE).stat().st_size:
        raise ConfigError(f"{out} already holds a run ({METRICS_FILE}); use --resume to continue it or another --out")
    return None
