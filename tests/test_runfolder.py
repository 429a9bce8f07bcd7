"""The run folder has one owner (`dcal.runfolder`): the trainer and `diagnostics.watch` write the same layout
through the one `RunWriter`, with one encoding of non-finite values, and `RunLog` reads both (and older
folders, which wrote null for a non-finite value)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from test_train import tiny_cfg

from dcal import runfolder
from dcal.callbacks import Callback
from dcal.runfolder import (
    CONFIG_FILE,
    LAST_CHECKPOINT,
    LOG_FILE,
    METRICS_FILE,
    RunFolderError,
    RunWriter,
    decode_record,
    encode_record,
)
from dcal.train import build_trainer
from diagnostics.runlog import load_run, read_metrics
from diagnostics.watch import watch


def lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


@pytest.fixture
def writes(monkeypatch):
    """Every record written through `RunWriter.write`, as (run folder name, kind)."""
    seen = []
    original = RunWriter.write

    def spy(self, record):
        seen.append((self.out_dir.name, record["kind"]))
        return original(self, record)

    monkeypatch.setattr(RunWriter, "write", spy)
    return seen


class NaNProbe(Callback):
    """Adds a NaN field to each step record (callbacks run before the metrics logger)."""

    def after_step(self, trainer):
        trainer.record["probe"] = float("nan")
        trainer.record["probes"] = torch.tensor([1.0, float("inf")])


def trainer_run(root):
    run = root / "trainer"
    cfg = tiny_cfg("train.epochs=1", "model.pwca=false", f"data.cache_dir={root / 'cache'}")
    build_trainer(cfg, run, callbacks=[NaNProbe()]).fit()
    return run


def watch_run(root):
    run = root / "watch"
    torch.manual_seed(0)
    model, crit = nn.Linear(4, 3), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, loss_fn=crit, out_dir=run, memory=False) as w:
        for _ in range(3):
            loss = crit(model(torch.randn(8, 4)), torch.randint(0, 3, (8,)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.log(probe=float("nan"), probes=torch.tensor([1.0, float("inf")]))
        w.log_eval(acc=0.5)
    return run


def test_trainer_and_watch_write_one_layout_through_one_writer_and_runlog_reads_both(tmp_path, writes):
    runs = {"trainer": trainer_run(tmp_path), "watch": watch_run(tmp_path)}
    kinds = {name: [k for n, k in writes if n == name] for name in runs}
    for name, run in runs.items():
        recs = lines(run)
        assert [r["kind"] for r in recs] == kinds[name], name  # every line went through RunWriter.write
        assert kinds[name][-1] == "end" and set(kinds[name]) == set(runfolder.RECORD_KINDS), name
        assert isinstance(yaml.safe_load((run / CONFIG_FILE).read_text()), dict)
        steps = [r for r in recs if r["kind"] == "step"]
        # One encoding: a non-finite value is a string, at any depth; JSON without NaN literals.
        assert all(r["probe"] == "nan" and r["probes"] == [1.0, "inf"] for r in steps), name
        assert "NaN" not in (run / METRICS_FILE).read_text() and "Infinity" not in (run / METRICS_FILE).read_text()
        log = load_run(run)
        assert log.end.status == "completed" and log.end.step == len(steps), name
        assert len(log.steps) == len(steps) and log.steps["probe"].isna().all(), name
        assert all(p[1] == math.inf for p in log.steps["probes"]), name
        assert len(log.evals) == kinds[name].count("eval") >= 1
    trainer_steps = [r for r in lines(runs["trainer"]) if r["kind"] == "step"]
    # null still means "does not apply" (the ablated PWCA branch), apart from NaN.
    assert all(r["loss_pwca"] is None and r["w_pwca"] is None for r in trainer_steps)
    assert load_run(runs["trainer"]).steps["loss_pwca"].isna().all()
    assert (runs["trainer"] / LAST_CHECKPOINT).is_file() and (runs["trainer"] / LOG_FILE).is_file()


def test_older_run_folders_still_read(tmp_path):
    """Before the one encoding, a non-finite value was written as null; Python's json writes bare NaN."""
    run = tmp_path / "old"
    run.mkdir()
    (run / METRICS_FILE).write_text(
        '{"kind": "step", "step": 1, "epoch": 0, "loss": null, "loss_pwca": null}\n'
        '{"kind": "step", "step": 2, "epoch": 0, "loss": NaN, "grad_norm": Infinity}\n'
        '{"kind": "step", "step": 3, "epoch": 0, "loss": "nan", "grad_norm": "-inf"}\n')
    steps, _ = read_metrics(run)
    assert steps["loss"].isna().all() and steps["loss"].dtype == float
    assert steps["grad_norm"].tolist()[1:] == [math.inf, -math.inf]


def test_encode_decode_round_trip_and_refusals(tmp_path):
    rec = {"kind": "step", "a": float("nan"), "b": np.float32(2.5), "c": torch.tensor([float("-inf"), 1.0]),
           "d": {"e": [float("inf"), None]}, "f": None, "g": "nan-free text", "h": np.int64(3), "i": True}
    enc = encode_record(rec)
    assert enc == {"kind": "step", "a": "nan", "b": 2.5, "c": ["-inf", 1.0], "d": {"e": ["inf", None]}, "f": None,
                   "g": "nan-free text", "h": 3, "i": True}
    json.dumps(enc, allow_nan=False)
    dec = decode_record(json.loads(json.dumps(enc)))
    assert math.isnan(dec["a"]) and dec["c"] == [-math.inf, 1.0] and dec["d"] == {"e": [math.inf, None]}
    assert dec["f"] is None and dec["g"] == "nan-free text"
    with pytest.raises(RunFolderError, match=r"field x\.y"):
        encode_record({"kind": "step", "x": {"y": object()}})
    w = RunWriter(tmp_path / "r")
    with pytest.raises(RunFolderError, match="record kind must be one of"):
        w.write({"kind": "epoch"})
    w.write({"kind": "step", "step": 1})
    w.close()
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl already holds a run"):
        RunWriter(tmp_path / "r")
    with pytest.raises(RunFolderError, match="status must be one of"):
        runfolder.end_record("killed", 1, 0)
    RunWriter(tmp_path / "r", resume=True).write_end("completed", 1, 0)
    assert load_run(tmp_path / "r").end.status == "completed"
