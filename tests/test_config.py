"""Config validation against the schema: every field refuses a bad value (naming key, value and what is
allowed) and takes a good one, from `--set`, from YAML and from code, before anything is built."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dcal.config import SCHEMA, Config, apply_overrides, config_from_dict, config_to_dict, preset, validate
from dcal.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# key: (a bad value, a good value), as `--set` text. One row per field of the config: test_table_covers_every_field.
TABLE = {
    "model.backbone": ("", "deit_tiny_patch16_224"),
    "model.pretrained": ("", "false"),
    "model.glca": ("maybe", "no"),
    "model.pwca": ("2", "yes"),
    "model.glca_ratio": ("0", "0.3"),
    "model.glca_placement": ("beside", "parallel"),
    "model.glca_init": ("zeros", "copy"),
    "model.glca_pool": ("max", "local"),
    "model.glca_selection": ("topk", "random"),
    "model.pwca_detach_kv": ("sometimes", "true"),
    "model.drop_path_rate": ("1", "0.2"),
    "model.grad_checkpointing": ("on", "1"),
    "model.timm_kwargs": ("[1, 2]", "{depth: 2}"),
    "data.format": ("coco", "synthetic"),
    "data.root": ("", "/data/somewhere"),
    "data.img_size": ("0", "64"),
    "data.resize_size": ("-5", "72"),
    "data.skip_bad_images": ("maybe", "false"),
    "data.num_workers": ("-1", "2"),
    "data.cache_dir": ("", "/tmp/dcal-cache"),
    "data.synthetic": ("7", "{num_classes: 5}"),
    "train.epochs": ("0", "3"),
    "train.batch_size": ("two", "4"),
    "train.grad_accum_steps": ("1.5", "2"),
    "train.lr_rule": ("cubic", "sqrt"),
    "train.base_lr": ("-1", "1e-3"),
    "train.lr": ("0", "1e-4"),
    "train.min_lr": ("-1e-6", "0"),
    "train.warmup_epochs": ("-1", "0.5"),
    "train.optimizer": ("sgd", "adam_l2"),
    "train.weight_decay": ("abc", "0"),
    "train.clip_grad": ("0", "1.0"),
    "train.amp": ("fp8", "bf16"),
    "train.uncertainty_init": ("nan", "[0, 0.5, 1]"),
    "train.uncertainty_bounds": ("[1, -1]", "[-1, 1]"),
    "train.eval_every": ("0", "2"),
    "train.seed": ("-1", "7"),
    "train.device": ("tpu", "cpu"),
    "train.progress": ("maybe", "false"),
    "train.save_best": ("maybe", "no"),
    "train.max_steps": ("0", "null"),
}


def all_fields() -> set[str]:
    return {f"{s}.{f.name}" for s in ("model", "data", "train") for f in dataclasses.fields(getattr(Config(), s))}


def test_table_covers_every_field():
    assert set(SCHEMA) == all_fields()
    assert set(TABLE) == all_fields()


@pytest.mark.parametrize("key", sorted(TABLE))
def test_bad_value_is_refused_naming_key_value_and_allowed(key):
    bad, _ = TABLE[key]
    with pytest.raises(ConfigError) as e:
        apply_overrides(preset("demo"), [f"{key}={bad}"])
    msg = str(e.value)
    assert key in msg and repr(bad) in msg and SCHEMA[key].allowed in msg, msg
    # The same value in a config dict (what a YAML file gives) is refused the same way.
    d = config_to_dict(preset("demo"))
    section, name = key.split(".")
    d[section][name] = bad
    with pytest.raises(ConfigError, match=f"{key}="):
        config_from_dict(d)


@pytest.mark.parametrize("key", sorted(TABLE))
def test_good_value_is_taken(key):
    _, good = TABLE[key]
    cfg = apply_overrides(preset("demo"), [f"{key}={good}"])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    validate(cfg)
    assert getattr(getattr(cfg, section), name) == value  # already normalised by the override
    assert config_from_dict(config_to_dict(cfg)) == cfg  # round trip through the run folder's config.yaml


@pytest.mark.parametrize("text,value", [
    ("true", True), ("False", False), ("yes", True), ("NO", False), ("1", True), ("0", False)])
def test_booleans_only_from_the_six_words(text, value):
    assert apply_overrides(preset("demo"), [f"model.glca={text}"]).model.glca is value


def test_numbers_are_parsed_not_strings():
    cfg = apply_overrides(preset("demo"), ["train.base_lr=5e-4", "train.epochs=5", "data.root=123"])
    assert cfg.train.base_lr == 5e-4 and cfg.train.epochs == 5
    assert cfg.data.root == "123"  # a path stays text


def test_yaml_file_values_are_checked(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("model: {glca: maybe}\n")
    with pytest.raises(ConfigError, match=r"model\.glca='maybe'.*true/false/yes/no/1/0"):
        config_from_dict(yaml.safe_load(p.read_text()))
    p.write_text("train: {base_lr: 5e-4, epochs: 2}\n")  # YAML 1.1 leaves 5e-4 a string: parsed here
    assert config_from_dict(yaml.safe_load(p.read_text())).train.base_lr == 5e-4
    with pytest.raises(ConfigError, match="unknown sections"):
        config_from_dict({"trian": {}})


def test_values_set_in_code_are_checked_before_anything_is_built(tmp_path):
    from dcal.train import build_trainer

    cfg = preset("demo")
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.train.base_lr = -1
    with pytest.raises(ConfigError, match=r"train\.base_lr=-1 .*> 0"):
        build_trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no data, no run folder


@pytest.mark.parametrize("extra,match", [
    (["train.lr_rule=fixed"], "needs train.lr"),
    (["train.uncertainty_init=[0, 1]"], "one per active branch"),
    (["data.synthetic={num_classes: 99}"], "data.synthetic="),
    (["data.synthetic={colour: red}"], "SyntheticSpec fields"),
    (["data.img_size=80"], "resize_size"),
])
def test_combinations_that_cannot_work(extra, match):
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(preset("demo"), extra))


def test_cli_prints_a_config_error_without_a_traceback(tmp_path):
    for setting, words in [("model.glca=maybe", "model.glca='maybe'"),
                           ("train.weight_decay=abc", "train.weight_decay='abc'"),
                           ("train.base_lr=-1", "train.base_lr='-1'")]:
        r = subprocess.run([sys.executable, "-m", "dcal_app", "train", "--preset", "demo", "--out", str(tmp_path / "x"),
                            "--set", setting], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and "allowed:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
