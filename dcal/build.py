"""A run's parts from a `Config`: datasets, data loaders, the model, the optimiser; and the LR schedule a
config gives (`dry_run_lr`). The trainer that wires them is `dcal.train.build_trainer`."""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .config import Config, derive
from .distributed import ShardSampler
from .errors import ConfigError
from .loss import BRANCHES, param_groups
from .model import DCAL, build_model
from .schedule import build_scheduler

__all__ = ["build_datasets", "build_loaders", "normalisation", "model_from_config", "active_branches",
           "build_optimizer", "dry_run_lr", "EVAL_BATCH_SIZE", "eval_batch_size"]

EVAL_BATCH_SIZE = 64  # at least this many images per eval batch: no gradients, so memory allows more


def eval_batch_size(train_batch_size: int) -> int:
    """The evaluation loader's batch for a training micro-batch (`dcal memory` predicts the same one)."""
    return max(train_batch_size, EVAL_BATCH_SIZE)
log = logging.getLogger("dcal.train")


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


def build_loaders(cfg: Config, train_ds: Dataset, test_ds: Dataset, *, rank: int, world_size: int,
                  device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled; a `DistributedSampler` under torchrun, whose padding `drop_last` removes)
    and test loader (in order; an unpadded `ShardSampler` shard under torchrun)."""
    t = cfg.train
    if world_size > 1:
        train_sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=t.seed,
                                           drop_last=True)
        test_sampler = ShardSampler(len(test_ds), rank, world_size)
    else:
        train_sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(t.seed))
        test_sampler = SequentialSampler(test_ds)
    kw = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=train_sampler, drop_last=True, **kw)
    eval_loader = DataLoader(test_ds, batch_size=eval_batch_size(t.batch_size), sampler=test_sampler, **kw)
    return train_loader, eval_loader


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
                       glca_selection=m.glca_selection, pwca_detach_kv=m.pwca_detach_kv, grad_checkpointing=m.grad_checkpointing, **m.timm_kwargs)


def active_branches(model: DCAL) -> tuple[str, ...]:
    """The branches whose losses the model produces in training, in `BRANCHES` order."""
    return tuple(b for b, on in zip(BRANCHES, (True, model.glca is not None, model.pwca_enabled)) if on)


def build_optimizer(cfg: Config, model: torch.nn.Module, loss_fn: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW on `param_groups` (DCAL_METHOD.md §6), or the seed's Adam with coupled L2 (`adam_l2`)."""
    t = cfg.train
    lr = cfg.derived["lr"]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, loss_fn, t.weight_decay), lr=lr, betas=(0.9, 0.999))
    # The seed system's optimiser: Adam with coupled L2 on every parameter, the w_i included.
    params = list(model.parameters()) + list(loss_fn.parameters())
    return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)


def dry_run_lr(cfg: Config, steps_per_epoch: int, world_size: int = 1) -> list[float]:
    """The LR of every optimiser step, read from the real optimiser and scheduler (no data, no training)."""
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
