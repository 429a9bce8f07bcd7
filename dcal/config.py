"""Run configuration: three small dataclasses, named presets, `key=value` overrides, derived values.

Overrides are applied before anything is derived, so `--set train.batch_size=8` changes the LR the rule
gives (the seed system computed its LR before reading overrides, so they were silently ignored).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schedule import LR_RULES, global_batch_size, lr_for_rule

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "Config", "PRESETS", "preset", "apply_overrides",
           "derive", "config_to_dict", "config_from_dict", "PRETRAINED_DIR"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "assets"

# The project's own small backbone (see `dcal pretrain` and dcal/assets/README.md): a timm ViT with
# 8-px patches for 64-px images, small enough to train and fine-tune on a laptop CPU.
SMALL_VIT = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3)


@dataclass
class ModelConfig:
    backbone: str = "deit_tiny_patch16_224"
    pretrained: Any = False            # False, True (timm download) or a path to a local timm checkpoint
    glca: bool = True
    pwca: bool = True
    glca_ratio: float = 0.1            # R: 0.1 for FGVC, 0.3 for Re-ID
    glca_placement: str = "stacked"
    glca_init: str | None = None       # None: "copy" when pretrained, else "random"
    glca_pool: str = "cls"
    pwca_detach_kv: bool = False
    drop_path_rate: float = 0.1        # stochastic depth, as in the paper
    grad_checkpointing: bool = False
    timm_kwargs: dict = field(default_factory=dict)  # any other timm.create_model argument


@dataclass
class DataConfig:
    format: str = "synthetic"          # synthetic | cub | imagefolder
    root: str | None = None            # dataset folder for cub / imagefolder
    img_size: int = 448                # crop size fed to the network
    resize_size: int = 550             # square resize before the crop (paper: 550 → 448)
    skip_bad_images: bool = False      # skip (and list) unreadable images instead of stopping
    num_workers: int = 0
    cache_dir: str | None = None       # where the synthetic benchmark is cached (default ~/.cache/dcal)
    synthetic: dict = field(default_factory=dict)  # SyntheticSpec fields (num_classes, seed, family, ...)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 16               # micro-batch per process
    grad_accum_steps: int = 1
    lr_rule: str = "linear"            # linear | linear_per_gpu | sqrt | fixed
    base_lr: float = 5e-4              # the rule's base (DeiT: 5e-4 per 512 images)
    lr: float | None = None            # only for lr_rule=fixed
    min_lr: float = 1e-6               # cosine floor
    warmup_epochs: float = 5.0
    optimizer: str = "adamw"           # adamw | adam_l2 (the seed's coupled L2, for reproduction only)
    weight_decay: float = 0.05
    clip_grad: float | None = None
    amp: str = "off"                   # off | bf16 | fp16 (fp16 needs CUDA)
    uncertainty_init: Any = 0.0        # w_i init: a float or one value per branch
    uncertainty_bounds: list | None = None  # [low, high] clamp: only to reproduce the seed
    eval_every: int = 1                # epochs between evaluations (the last epoch always evaluates)
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    progress: bool = True              # tqdm bars
    save_best: bool = True
    max_steps: int | None = None       # stop after this many optimiser steps (smoke tests, benchmarks)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    derived: dict = field(default_factory=dict)  # filled by `derive`; written to config.yaml


def _demo() -> Config:
    return Config(
        model=ModelConfig(backbone="vit_tiny_patch16_224", pretrained=str(PRETRAINED_DIR / "dcal_vit_p8_synth.safetensors"),
                          timm_kwargs=dict(SMALL_VIT), drop_path_rate=0.0),
        data=DataConfig(format="synthetic", img_size=64, resize_size=64,
                        synthetic=dict(num_classes=10, seed=0)),
        train=TrainConfig(epochs=8, batch_size=32, lr_rule="linear", base_lr=5e-3, warmup_epochs=1,
                          weight_decay=0.05),
    )


def _pretrain() -> Config:
    return Config(
        model=ModelConfig(backbone="vit_tiny_patch16_224", glca=False, pwca=False, timm_kwargs=dict(SMALL_VIT),
                          drop_path_rate=0.0),
        data=DataConfig(format="synthetic", img_size=64, resize_size=64,
                        synthetic=dict(family="pretrain", num_classes=24, train_per_class=500,
                                       test_per_class=25, seed=1234, part_size=16, mark_grid=8)),
        train=TrainConfig(epochs=6, batch_size=64, lr_rule="linear", base_lr=8e-3, warmup_epochs=0.2,
                          weight_decay=0.05, seed=1234),
    )


def _cub(backbone: str) -> Config:
    return Config(
        model=ModelConfig(backbone=backbone, pretrained=True),
        data=DataConfig(format="cub", img_size=448, resize_size=550),
        train=TrainConfig(epochs=100, batch_size=16, lr_rule="linear", warmup_epochs=5),
    )


PRESETS = {
    "demo": _demo,
    "pretrain": _pretrain,
    "cub_deit_tiny": lambda: _cub("deit_tiny_patch16_224"),
    "cub_vit_base": lambda: _cub("vit_base_patch16_224"),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _parse_value(text: str) -> Any:
    """YAML, except that numbers YAML 1.1 leaves as strings (``5e-4``) are numbers."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from e


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` (value parsed as YAML; `model.timm_kwargs.depth=6` reaches into dicts)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in ("model", "data", "train"):
            raise ConfigError(f"--set {key}: keys look like model.X, data.X or train.X")
        section = getattr(cfg, parts[0])
        name = parts[1]
        if name not in {f.name for f in dataclasses.fields(section)}:
            known = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"--set {key}: unknown field {parts[0]}.{name} (known: {known})")
        value = _parse_value(text)
        if len(parts) == 2:
            setattr(section, name, value)
        else:
            target = getattr(section, name)
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {parts[0]}.{name} is not a mapping")
            for p in parts[2:-1]:
                target = target.setdefault(p, {})
            target[parts[-1]] = value
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible configurations before anything is built, naming the field."""
    t, d, m = cfg.train, cfg.data, cfg.model
    if t.lr_rule not in LR_RULES:
        raise ConfigError(f"train.lr_rule must be one of {LR_RULES}, got {t.lr_rule!r}")
    if t.optimizer not in ("adamw", "adam_l2"):
        raise ConfigError(f"train.optimizer must be 'adamw' or 'adam_l2', got {t.optimizer!r}")
    for name in ("epochs", "batch_size", "grad_accum_steps", "eval_every"):
        v = getattr(t, name)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"train.{name} must be a positive integer, got {v!r}")
    if m.pwca and t.batch_size < 2:
        raise ConfigError("train.batch_size=1 with model.pwca=true: PWCA pairs each image with another image "
                          "of its micro-batch; use train.batch_size >= 2 (with grad_accum_steps for the same "
                          "global batch) or model.pwca=false")
    if t.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be off, bf16 or fp16, got {t.amp!r}")
    if d.format not in ("synthetic", "cub", "imagefolder"):
        raise ConfigError(f"data.format must be synthetic, cub or imagefolder, got {d.format!r}")
    if d.format in ("cub", "imagefolder") and not d.root:
        raise ConfigError(f"data.format={d.format} needs data.root (e.g. --set data.root=/data/CUB_200_2011)")
    if d.resize_size < d.img_size:
        raise ConfigError(f"data.resize_size ({d.resize_size}) must be >= data.img_size ({d.img_size})")
    if t.uncertainty_bounds is not None and (len(t.uncertainty_bounds) != 2 or not t.uncertainty_bounds[0] < t.uncertainty_bounds[1]):
        raise ConfigError(f"train.uncertainty_bounds must be [low, high] with low < high, got {t.uncertainty_bounds}")


def derive(cfg: Config, *, world_size: int, steps_per_epoch: int, num_classes: int) -> Config:
    """Fill `cfg.derived`: global batch, the LR the rule produced, step counts. Call after overrides."""
    t = cfg.train
    lr = lr_for_rule(t.lr_rule, base_lr=t.base_lr, batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                     world_size=world_size, lr=t.lr)
    total = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    cfg.derived = dict(
        world_size=world_size,
        global_batch=global_batch_size(t.batch_size, t.grad_accum_steps, world_size),
        lr=lr,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(total, round(t.warmup_epochs * steps_per_epoch)),
        num_classes=num_classes,
    )
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> Config:
    try:
        return Config(model=ModelConfig(**d.get("model", {})), data=DataConfig(**d.get("data", {})),
                      train=TrainConfig(**d.get("train", {})), derived=dict(d.get("derived", {})))
    except TypeError as e:
        raise ConfigError(f"config has an unknown or missing field: {e}") from e
