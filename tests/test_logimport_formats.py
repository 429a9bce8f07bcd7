"""The native readers (issue 16 item 1), each on a log written the way its framework writes it: Hugging Face
trainer_state.json, Lightning metrics.csv, timm summary.csv, DeiT log.txt, mmengine text and scalars.json,
Keras CSV and fit output, notebook output. The logs in tests/data/logs/formats (generate.py) are new to the
doctor — healthy and broken ones — and EXPECTED.json says what it must and must not say; the unit tests below
pin each reader's rules on a few lines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dcal_app.doctor import main as doctor_main
from diagnostics import import_log
from diagnostics.logimport import detect_format

HERE = Path(__file__).parent / "data" / "logs" / "formats"
EXPECTED = json.loads((HERE / "EXPECTED.json").read_text(encoding="utf-8"))


def test_every_log_has_an_expectation():
    files = {p.name for p in HERE.iterdir() if p.name not in ("EXPECTED.json", "generate.py")}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_doctor_on_logs_it_has_never_seen(name, capsys):
    want = EXPECTED[name]
    assert detect_format(HERE / name) == want["format"]
    code = doctor_main([str(HERE / name), "--num-classes", str(want["num_classes"]), "--json"])
    findings = json.loads(capsys.readouterr().out)
    codes = {f["code"] for f in findings}
    assert code == want["exit"], [f["message"][:120] for f in findings]
    assert set(want["must"]) <= codes
    assert not set(want["must_not"]) & codes, [f["message"][:160] for f in findings if f["code"] in want["must_not"]]
    if want["exit"] == 0 and not want["must"]:  # a healthy run: no error, and nothing alarming
        assert not [f for f in findings if f["severity"] == "error"]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --- Hugging Face
def test_hf_final_summary_is_the_completion_not_a_loss():
    log = import_log(HERE / "hf-healthy-c10-trainer_state.json")
    assert log.source.format == "hf-trainer-state"
    assert log.end is not None and log.end.status == "completed"
    assert log.source.settings["planned_steps"] == 600
    assert log.steps["step"].max() == 600 and len(log.steps) == 30  # the summary's train_loss is not a record
    assert {"eval_runtime", "train_runtime"}.isdisjoint(log.source.recognised)


def test_hf_f1_is_not_an_accuracy(tmp_path):
    state = {"log_history": [{"loss": 0.5, "step": 10, "epoch": 0.1}, {"eval_f1": 0.9, "eval_loss": 0.4, "step": 10}]}
    log = import_log(_write(tmp_path, "trainer_state.json", json.dumps(state, indent=2)))
    assert "val_acc" not in log.evals and log.evals["val_loss"].tolist() == [0.4]
    assert any("no accuracy was logged" in n for n in log.source.notes)


def test_hf_malformed_is_unreadable_not_a_crash(tmp_path):
    from diagnostics import LogImportError

    p = _write(tmp_path, "trainer_state.json", '{"log_history": [1, 2')
    with pytest.raises(LogImportError):
        import_log(p, format="hf-trainer-state")


# --- Lightning
def test_lightning_step_and_epoch_values_are_kept_apart():
    log = import_log(HERE / "lightning-healthy-c10-metrics.csv")
    assert log.source.recognised["train_loss_step"] == "loss" and log.source.recognised["lr-AdamW"] == "lr"
    assert int(log.steps["loss"].notna().sum()) == 32  # the 4 per-epoch step rows x 8 epochs, no epoch means
    assert any("train_loss_epoch" in n for n in log.source.notes)


@pytest.mark.parametrize("others,expected", [("val_loss", "val_acc"), ("train_loss", "train_acc")])
def test_lightning_bare_acc_follows_the_rows_it_is_logged_in(tmp_path, others, expected):
    rows = ["acc,epoch,step," + others] + [f"0.{i + 2},{i},{i * 10 + 9},1.{i}" for i in range(4)]
    log = import_log(_write(tmp_path, "metrics.csv", "\n".join(rows) + "\n"))
    assert log.source.format == "lightning-csv"
    assert expected in (log.evals if expected.startswith("val") else log.steps).columns
    assert any("'acc'" in n for n in log.source.notes)


# --- timm and DeiT
def test_timm_summary_percentages():
    log = import_log(HERE / "timm-healthy-c100-summary.csv")
    assert 0.7 < log.evals["val_acc"].iloc[-1] <= 1.0 and log.step_unit == "epoch"


def test_deit_several_resolutions_pick_the_highest_and_say_so(tmp_path):
    lines = [json.dumps({"train_loss": 6.9 - e, "test_96_acc1": 10.0 * e, "test_384_acc1": 12.0 * e, "epoch": e})
             for e in range(4)]
    log = import_log(_write(tmp_path, "log.txt", "\n".join(lines)))
    assert log.source.format == "deit-log"
    np.testing.assert_allclose(log.evals["val_acc"], [0.0, 0.12, 0.24, 0.36])
    assert any("test_384_acc1" in n and "test_96_acc1" in n for n in log.source.notes)


def test_deit_map_picks_another_resolution(tmp_path):
    lines = [json.dumps({"train_loss": 6.9 - e, "test_96_acc1": 10.0 * e, "test_384_acc1": 12.0 * e, "epoch": e})
             for e in range(4)]
    log = import_log(_write(tmp_path, "log.txt", "\n".join(lines)), mapping=["val_acc=test_96_acc1"])
    np.testing.assert_allclose(log.evals["val_acc"], [0.0, 0.1, 0.2, 0.3])


# --- OpenMMLab
def test_mmengine_text_config_is_not_metrics_and_val_sits_at_the_epoch_end():
    log = import_log(HERE / "mmengine-healthy-c10.log")
    assert log.source.format == "mmengine-text"
    assert log.source.settings["planned_epochs"] == 4 and log.num_classes == 10  # from the config dump
    assert log.evals["step"].tolist() == [300, 600, 900, 1200]
    assert log.steps["step"].tolist()[:3] == [100, 200, 300]
    assert (log.steps["lr"] < 0.11).all() and len(log.steps) == 12  # not lr=0.1 from the optimiser config line


def test_mmengine_scalars_read_the_same_run_as_the_text_log():
    text, scalars = import_log(HERE / "mmengine-healthy-c10.log"), import_log(HERE / "mmengine-healthy-c10-scalars.json")
    assert scalars.evals["step"].tolist() == text.evals["step"].tolist()  # not at steps 1..4 (the epochs)
    np.testing.assert_allclose(scalars.evals["val_acc"], text.evals["val_acc"], atol=1e-4)


def test_mmengine_validation_only_log_is_per_epoch(tmp_path):
    lines = [f"2023/02/05 15:0{e}:00 - mmengine - INFO - Epoch(val) [{e}][18/18]  accuracy/top1: {60 + e:.4f}"
             for e in range(1, 6)]
    log = import_log(_write(tmp_path, "run.log", "\n".join(lines)))
    assert log.step_unit == "epoch" and log.evals["val_acc"].iloc[-1] == pytest.approx(0.65)


# --- Keras
def test_keras_csv_without_epoch_column_numbers_rows_as_epochs(tmp_path):
    p = _write(tmp_path, "log.csv", "val_loss,val_accuracy,loss,accuracy\n" +
               "\n".join(f"{1.0 - 0.1 * i},{0.5 + 0.05 * i},{1.1 - 0.1 * i},{0.5 + 0.04 * i}" for i in range(5)))
    log = import_log(p)
    assert log.source.format == "keras-csv" and log.step_unit == "epoch"
    assert log.evals["step"].tolist() == [0, 1, 2, 3, 4]
    assert any("no epoch column" in n for n in log.source.notes)


def test_keras_stdout_planned_epochs_and_early_stopping():
    log = import_log(HERE / "keras-healthy-c5-stdout.txt")
    assert log.source.settings["planned_epochs"] == 30
    assert log.end.status == "completed" and len(log.evals) == 12


# --- text reader rules the corpus showed
def test_best_is_not_the_current_accuracy(tmp_path):
    p = _write(tmp_path, "log.txt", "[Step 100/1000] loss=1.0 | val_acc=0.50 | best=0.50\n"
                                    "[Step 200/1000] loss=0.9 | val_acc=0.40 | best=0.50\n")
    log = import_log(p)
    assert log.evals["val_acc"].tolist() == [0.5, 0.4]
    assert log.source.settings["planned_steps"] == 1000


def test_a_per_epoch_step_counter_is_not_the_planned_length(tmp_path):
    lines = [f"epoch {e} step {s}/50 loss: {1.0 / (e + s):.3f}" for e in range(1, 3) for s in (10, 50)]
    log = import_log(_write(tmp_path, "log.txt", "\n".join(lines)))
    assert "planned_steps" not in log.source.settings


def test_openmmlab_evaluator_keys_are_validation_in_any_reader(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "accuracy/top1": 10.0 * s}) for s in range(1, 4)]
    log = import_log(_write(tmp_path, "metrics.jsonl", "\n".join(lines)))
    assert "val_acc" in log.evals and "train_acc" not in log.steps


def test_one_json_document_that_is_not_a_trainer_state_says_so(tmp_path):
    from diagnostics import LogImportError

    with pytest.raises(LogImportError, match="one JSON document"):
        import_log(_write(tmp_path, "results.json", '{\n  "accuracy": 0.9\n}\n'))


def test_hf_trainer_state_on_one_line(tmp_path):
    state = {"log_history": [{"loss": 0.5, "step": 10}, {"eval_accuracy": 0.8, "step": 10}], "max_steps": 10}
    p = _write(tmp_path, "trainer_state.json", json.dumps(state))
    assert detect_format(p) == "hf-trainer-state" and import_log(p).evals["val_acc"].tolist() == [0.8]


def test_mmcv_0x_text_log(tmp_path):
    lines = ["2021-03-01 10:00:00,000 - mmcls - INFO - Epoch [1][10/20]\tlr: 1.000e-01, eta: 0:01:00, time: 0.1, "
             "data_time: 0.01, memory: 1000, loss: 2.1000",
             "2021-03-01 10:00:10,000 - mmcls - INFO - Epoch [1][20/20]\tlr: 1.000e-01, eta: 0:00:50, time: 0.1, "
             "data_time: 0.01, memory: 1000, loss: 1.9000",
             "2021-03-01 10:00:20,000 - mmcls - INFO - Epoch(val) [1][5]\taccuracy_top-1: 62.5000, accuracy_top-5: 98.0000"]
    log = import_log(_write(tmp_path, "20210301_100000.log", "\n".join(lines)))
    assert log.source.format == "mmengine-text"
    assert log.steps["loss"].tolist() == [2.1, 1.9] and log.evals["val_acc"].tolist() == [0.625]
    assert log.evals["step"].tolist() == [20]
