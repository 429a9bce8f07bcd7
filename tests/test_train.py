"""The trainer, its run folder, the CLI, resume and multi-process training, on tiny CPU configs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import dcal
from dcal.callbacks import Callback
from dcal.config import apply_overrides, preset
from dcal.errors import ConfigError, NonFiniteLossError
from dcal.train import build_trainer, dry_run_lr, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A tiny DCAL on a tiny embedded benchmark: seconds per run on one CPU thread.
TINY = [
    "model.pretrained=false",
    "model.timm_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
    "data.img_size=32", "data.resize_size=32",
    "data.synthetic={num_classes: 3, train_per_class: 16, test_per_class: 8, part_size: 10, mark_grid: 1, seed: 0}",
    "train.batch_size=8", "train.epochs=2", "train.warmup_epochs=1", "train.progress=false",
]


def tiny_cfg(*extra, cache=None):
    cfg = apply_overrides(preset("demo"), TINY + list(extra))
    if cache is not None:
        cfg.data.cache_dir = str(cache)
    return cfg


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def last_eval(recs: list[dict]) -> dict:
    return [r for r in recs if r["kind"] == "eval"][-1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ----------------------------------------------------------------------------- config
def test_overrides_apply_before_derived_values(cache, tmp_path):
    cfg = tiny_cfg("train.batch_size=4", "train.grad_accum_steps=2", "train.lr_rule=linear", "train.base_lr=5e-4", cache=cache)
    tr = build_trainer(cfg, None)
    assert cfg.derived["global_batch"] == 8
    assert cfg.derived["lr"] == pytest.approx(5e-4 * 8 / 512)
    assert tr.optimizer.param_groups[0]["initial_lr"] == pytest.approx(cfg.derived["lr"])


@pytest.mark.parametrize("extra,match", [
    (["train.batch_size=1"], "batch_size=1 with model.pwca=true"),
    (["train.lr_rule=cubic"], "train.lr_rule"),
    (["train.optimizer=sgd"], "train.optimizer"),
    (["data.format=cub"], "needs data.root"),
])
def test_impossible_configs_are_clear_errors(extra, match, cache):
    with pytest.raises(ConfigError, match=match):
        build_trainer(tiny_cfg(*extra, cache=cache), None)


def test_unknown_override_key_names_the_field():
    with pytest.raises(ConfigError, match="unknown field train.lrr"):
        apply_overrides(preset("demo"), ["train.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(preset("demo"), ["train.lr"])


def test_lr_rules():
    from dcal.schedule import lr_for_rule

    assert lr_for_rule("linear", batch_size=2, grad_accum_steps=8) == pytest.approx(1.5625e-5)
    assert lr_for_rule("linear_per_gpu", batch_size=16) == pytest.approx(6.25e-5)
    assert lr_for_rule("sqrt", batch_size=2, grad_accum_steps=8) == pytest.approx(5e-4)
    assert lr_for_rule("linear", batch_size=4, grad_accum_steps=2, world_size=4) == pytest.approx(5e-4 * 32 / 512)


# ----------------------------------------------------------------------------- a run and its folder
def test_a_run_writes_the_public_run_folder(cache, tmp_path):
    run = tmp_path / "run"
    tr = build_trainer(tiny_cfg(cache=cache), run)
    tr.fit()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("global_batch", "lr", "total_steps", "warmup_steps", "num_classes", "steps_per_epoch"):
        assert key in cfg["derived"]
    recs = read_metrics(run)
    steps = [r for r in recs if r["kind"] == "step"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert len(steps) == cfg["derived"]["total_steps"] == 2 * (48 // 8)
    assert len(evals) == 2
    assert set(steps[0]) >= {"kind", "step", "epoch", "lr", "loss", "loss_sa", "loss_glca", "loss_pwca", "w_sa",
                             "w_glca", "w_pwca", "grad_norm", "time"}
    assert set(evals[0]) >= {"kind", "step", "epoch", "acc_sa", "acc_glca", "acc_fused", "part_hit", "loss_sa", "num_classes"}
    assert evals[-1]["num_classes"] == 3 and 0 <= evals[-1]["part_hit"] <= 1
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    # The LR in the log is the one the scheduler produced, which is what the dry run reads.
    assert [s["lr"] for s in steps] == pytest.approx(dry_run_lr(tr.cfg, cfg["derived"]["steps_per_epoch"]))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == len(steps) and set(ckpt) >= {"model", "loss", "optimizer", "scheduler", "scaler", "rng"}
    assert (run / "best.pt").exists()


def test_ablation_switches_give_null_fields(cache, tmp_path):
    run = tmp_path / "sa"
    build_trainer(tiny_cfg("model.glca=false", "model.pwca=false", "train.epochs=1", cache=cache), run).fit()
    recs = read_metrics(run)
    step, ev = recs[0], last_eval(recs)
    assert step["loss_glca"] is None and step["loss_pwca"] is None and step["w_glca"] is None
    assert step["loss_sa"] is not None
    assert ev["acc_glca"] is None and ev["acc_fused"] == ev["acc_sa"]


def test_accumulation_matches_the_large_batch_without_pwca(cache):
    """Batch 8 vs batch 4 × 2 accumulation: same gradients when nothing pairs images (no PWCA)."""
    grads = []
    for extra in (["train.batch_size=8"], ["train.batch_size=4", "train.grad_accum_steps=2"]):
        cfg = tiny_cfg(*extra, "model.pwca=false", "model.drop_path_rate=0.0", "train.max_steps=1", cache=cache)
        tr = build_trainer(cfg, None)
        seen = {}

        class Grab(Callback):
            def __init__(self, store):
                self.store = store

            def before_step(self, trainer):
                self.store.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

        # Same 8 images in the same order for both: turn off the augmentation randomness.
        tr.train_loader = torch.utils.data.DataLoader(tr.train_loader.dataset, batch_size=cfg.train.batch_size,
                                                      shuffle=False, drop_last=True)
        tr.train_loader.dataset.transform = tr.eval_loader.dataset.transform
        tr.callbacks.append(Grab(seen))
        tr.fit()
        grads.append(seen)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4, msg=n)


def test_adam_l2_is_coupled_and_adamw_groups_exclude_norms(cache):
    tr = build_trainer(tiny_cfg("train.optimizer=adam_l2", cache=cache), None)
    assert type(tr.optimizer) is torch.optim.Adam and tr.optimizer.param_groups[0]["weight_decay"] == 0.05
    tr = build_trainer(tiny_cfg(cache=cache), None)
    assert type(tr.optimizer) is torch.optim.AdamW
    assert {g["name"]: g["weight_decay"] for g in tr.optimizer.param_groups} == {"decay": 0.05, "no_decay": 0.0, "uncertainty": 0.0}


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    run = tmp_path / "nan"
    tr = build_trainer(tiny_cfg("train.epochs=3", cache=cache), run)

    class Poison(Callback):  # GLCA's head overflows at step 9 (the rollout stays finite)
        def before_batch(self, trainer):
            if trainer.step == 8:
                trainer.model.glca.head.register_forward_hook(lambda m, i, o: o * float("inf"))

    tr.callbacks.insert(0, Poison())
    with pytest.raises(NonFiniteLossError, match=r"step 9 \(epoch 2\): non-finite loss, glca"):
        tr.fit()
    assert load_checkpoint(run / "last.pt")["step"] == 6  # end of epoch 1, untouched
    end = read_metrics(run)[-1]
    assert end["status"] == "crashed" and end["exception"]["type"] == "NonFiniteLossError"
    assert "train.py:" in end["exception"]["where"] and end["exception"]["where"].endswith("in _optimizer_step")


class Crash(Callback):
    """Raises at the start of optimiser step `at` (1-based)."""

    def __init__(self, at: int):
        self.at = at

    def before_batch(self, trainer):
        if trainer.step + 1 == self.at:
            raise RuntimeError(f"injected crash at step {self.at}")


def test_a_completed_run_ends_with_an_end_record(cache, tmp_path):
    run = tmp_path / "run"
    build_trainer(tiny_cfg(cache=cache), run).fit()
    recs = read_metrics(run)
    assert recs[-1] == {"kind": "end", "status": "completed", "step": 12, "epoch": 2, "exception": None}
    assert [r["kind"] for r in recs].count("end") == 1


def test_a_crash_is_recorded_reraised_and_keeps_last_pt(cache, tmp_path):
    run = tmp_path / "run"
    tr = build_trainer(tiny_cfg(cache=cache), run, callbacks=[Crash(at=9)])
    with pytest.raises(RuntimeError, match="injected crash at step 9"):
        tr.fit()
    end = read_metrics(run)[-1]
    assert end["kind"] == "end" and end["status"] == "crashed" and end["step"] == 8 and end["epoch"] == 1
    exc = end["exception"]
    assert exc["type"] == "RuntimeError" and exc["message"] == "injected crash at step 9"
    assert exc["where"].startswith(__file__ + ":") and exc["where"].endswith(" in before_batch")
    assert load_checkpoint(run / "last.pt")["step"] == 6  # the end of epoch 1, untouched


def test_crash_then_resume_gives_the_uninterrupted_metrics_and_keeps_the_end_record(cache, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    build_trainer(tiny_cfg(cache=cache), ref).fit()
    with pytest.raises(RuntimeError):
        build_trainer(tiny_cfg(cache=cache), cut, callbacks=[Crash(at=9)]).fit()
    build_trainer(tiny_cfg(cache=cache), cut, resume=True).fit()
    a, b = strip_time(read_metrics(ref)), strip_time(read_metrics(cut))
    crashed = [r for r in b if r["kind"] == "end" and r["status"] == "crashed"]
    assert len(crashed) == 1 and crashed[0]["step"] == 8  # kept as history, after the checkpoint's records
    assert [r for r in b if r not in crashed] == a  # everything else exactly as if it had never crashed
    assert b.index(crashed[0]) == [r["kind"] for r in b].index("eval") + 1  # right after epoch 1's eval


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "last.pt"
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(dcal.CheckpointError, match="last.pt: cannot read checkpoint"):
        load_checkpoint(p)


def test_gradient_checkpointing_gives_identical_training(cache, tmp_path):
    logs = []
    for ckpt in ("false", "true"):
        run = tmp_path / f"gc-{ckpt}"
        build_trainer(tiny_cfg(f"model.grad_checkpointing={ckpt}", "train.epochs=1", cache=cache), run).fit()
        logs.append([{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run)])
    a, b = logs
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
            else:
                assert ra[k] == rb[k], k


# ----------------------------------------------------------------------------- CLI, resume, torchrun
def cli(*args, env=None, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "dcal_app", *args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def tiny_args(cache, *extra):
    args = []
    for s in TINY + [f"data.cache_dir={cache}", "train.epochs=3"] + list(extra):
        args += ["--set", s]
    return args


def strip_time(recs):
    return [{k: v for k, v in r.items() if k != "time"} for r in recs]


@pytest.mark.slow
def test_sigkill_then_resume_gives_exactly_the_uninterrupted_metrics(cache, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    five = tiny_args(cache, "train.epochs=5")
    p = cli("train", "--preset", "demo", "--out", str(ref), "--no-diagnostics", *five)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    # Same run, killed with SIGKILL right after the first checkpoint exists.
    p = cli("train", "--preset", "demo", "--out", str(cut), "--no-diagnostics", *five)
    deadline = time.time() + 600
    while not (cut / "last.pt").exists():
        assert p.poll() is None, p.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.1)  # let it run on into the next epoch before the kill
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert load_checkpoint(cut / "last.pt")["epoch"] < 5
    p = cli("train", "--preset", "demo", "--out", str(cut), "--resume", "--no-diagnostics", *five)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    a, b = strip_time(read_metrics(ref)), strip_time(read_metrics(cut))
    assert a == b  # exact: same floats, same records, no duplicates


def test_cli_errors_are_clear(cache, tmp_path):
    p = cli("train", "--preset", "cub_deit_tiny", "--out", str(tmp_path / "x"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "needs data.root" in err
    p = cli("train", "--preset", "nope", "--out", str(tmp_path / "x"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "unknown preset 'nope'" in err
    p = cli("train", "--preset", "demo", "--out", str(tmp_path / "x"), *tiny_args(cache, "train.batch_size=1"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "PWCA" in err
    p = cli("train", "--preset", "demo", "--out", str(tmp_path / "y"), "--resume", *tiny_args(cache))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "nothing to resume" in err


@pytest.mark.slow
def test_make_dataset_cub_then_train_and_eval_on_it(cache, tmp_path):
    root = tmp_path / "cub"
    p = cli("make-dataset", "--format", "cub", "--out", str(root), "--seed", "0", "--cache-dir", str(cache),
            "--set", "num_classes=3", "--set", "train_per_class=16", "--set", "test_per_class=8",
            "--set", "img_size=32", "--set", "part_size=10", "--set", "mark_grid=1")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    for f in ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
              "parts/part_locs.txt"):
        assert (root / f).exists(), f
    run = tmp_path / "run"
    p = cli("train", "--preset", "demo", "--out", str(run), *tiny_args(cache, "data.format=cub", f"data.root={root}", "train.epochs=1"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    ev = last_eval(read_metrics(run))
    assert ev["num_classes"] == 3 and ev["part_hit"] is not None
    p = cli("eval", "--checkpoint", str(run / "last.pt"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["acc_fused"] == pytest.approx(ev["acc_fused"])


@pytest.mark.slow
def test_torchrun_two_processes_gloo_evaluates_exactly_like_one_process(cache, tmp_path):
    """2 gloo processes on an odd test set (3 × 7 = 21 images): the eval record equals a one-process
    evaluation of the same weights (a padded DistributedSampler would score 22, one twice)."""
    from dcal.evaluate import evaluate
    from dcal.train import build_datasets, config_of_checkpoint, model_from_config, normalisation

    run = tmp_path / "ddp"
    odd = "data.synthetic={num_classes: 3, train_per_class: 16, test_per_class: 7, part_size: 10, mark_grid: 1, seed: 0}"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            "-m", "dcal_app", "train", "--preset", "demo", "--out", str(run), "--no-diagnostics",
            *tiny_args(cache, "train.epochs=1", "train.batch_size=4", odd)]
    r = subprocess.run(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["derived"]["world_size"] == 2 and cfg["derived"]["global_batch"] == 8
    recs = read_metrics(run)
    steps = [x for x in recs if x["kind"] == "step"]
    assert len(steps) == 48 // 8  # each rank sees half the data per epoch: 6 optimiser steps
    assert [s["step"] for s in steps] == list(range(1, 7))  # rank 0 alone writes the log
    assert recs[-1]["kind"] == "end" and recs[-1]["status"] == "completed"
    ddp_eval = last_eval(recs)
    assert ddp_eval["num_images"] == 21

    ckpt = load_checkpoint(run / "last.pt")
    one = config_of_checkpoint(ckpt)
    one.model.pretrained = False
    _, test_ds, num_classes = build_datasets(one, *normalisation(one.model.backbone))
    model = model_from_config(one, num_classes)
    model.load_state_dict(ckpt["model"])
    res, _ = evaluate(model, torch.utils.data.DataLoader(test_ds, batch_size=64), torch.device("cpu"))
    assert res["num_images"] == 21 and res["part_hit"] is not None and res["distractor_hit"] is not None
    # Every count is exact; the mean loss agrees to ~1e-8: an image's fp32 logits change in the last bits
    # with the batch it is computed in (64 images here, 10 or 11 per process there).
    for k, v in res.items():
        assert ddp_eval[k] == (pytest.approx(v, rel=1e-6) if k == "loss_sa" else v), k


def test_the_cli_destroys_the_process_group_also_when_the_run_fails(monkeypatch, tmp_path):
    import dcal.distributed
    import dcal.train
    from dcal_app.cli import main

    calls = []
    monkeypatch.setattr(dcal.distributed, "teardown_distributed", lambda: calls.append("teardown"))

    def failing_build(*args, **kwargs):
        raise ConfigError("data went missing")

    monkeypatch.setattr(dcal.train, "build_trainer", failing_build)
    assert main(["train", "--preset", "demo", "--out", str(tmp_path / "x"), "--no-diagnostics"]) == 2
    assert calls == ["teardown"]


def test_nonfinite_callback_names_the_module_of_a_forward_overflow_in_a_training_run(cache, tmp_path):
    """An Inf inside an SA block surfaces as a non-finite attention map; tier 2 still names its module."""
    from diagnostics import NonFiniteCallback, NonFiniteError

    tr = build_trainer(tiny_cfg("train.epochs=1", cache=cache), tmp_path / "run", callbacks=[NonFiniteCallback()])
    tr.model.backbone.blocks[0].mlp.fc1.register_forward_hook(
        lambda m, i, o: o * float("inf") if tr.step == 2 else o)
    with pytest.raises(NonFiniteError) as e:
        tr.fit()
    assert e.value.module == "backbone.blocks.0.mlp.fc1" and e.value.phase == "forward" and e.value.step == 3
