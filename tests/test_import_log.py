"""`diagnostics.import_log` and the doctor on logs this project did not write: the seed's real training log
(../shared/seed/train_log.txt), and small logs in the shapes hand-rolled trainers print (Keras, the PyTorch
MNIST example, time-stamped logging, fairseq-style `name value |`, tqdm postfixes rewritten with \\r, a
"Validation:" section, CSV, JSON lines, TensorBoard event files)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dcal_app.doctor import main
from diagnostics import import_log
from diagnostics.doctor import diagnose, diagnose_log
from diagnostics.logimport import LogImportError, detect_format, parse_oom

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed"
SEED_LOG = SEED / "train_log.txt"
needs_seed = pytest.mark.skipif(not SEED_LOG.is_file(), reason=f"the seed's log is not at {SEED_LOG} "
                                "(CI has ../shared beside the repository)")
MiB, GiB = 2**20, 2**30


def codes(findings) -> dict[str, str]:
    return {f.code: f.severity for f in findings}


def find(findings, code):
    return next(f for f in findings if f.code == code)


def write(tmp_path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --- the seed's log

@pytest.fixture(scope="module")
def seed_log():
    if not SEED_LOG.is_file():
        pytest.skip(f"the seed's log is not at {SEED_LOG}")
    return import_log(SEED_LOG)


@needs_seed
def test_seed_log_records(seed_log):
    log = seed_log
    assert log.source.format == "text" and log.step_unit == "epoch"
    assert list(log.steps["epoch"]) == list(range(1, 16))
    assert log.steps["loss_sa"].iloc[3] == pytest.approx(4.9672) and log.steps["w_pwca"].iloc[-1] == 0.0834
    assert log.steps["lr"].iloc[0] == pytest.approx(1.6e-5) and log.steps["train_acc_sa"].iloc[-1] == 0.0105
    assert list(log.evals["epoch"]) == [5, 10, 15]
    assert log.evals["val_acc"].tolist() == pytest.approx([0.1538, 0.0186, 0.0117])  # 15.38 % → 0-1 scale
    assert any("percentages" in n and "Val Top-1 Acc" in n for n in log.source.notes)
    # The tqdm postfix's bare "SA=0.01" could be a loss or an accuracy: left out, and said.
    assert {"SA", "Weight SA"} <= set(log.source.unrecognised)
    assert log.steps_per_epoch == pytest.approx(374.5) and "1498" in log.steps_per_epoch_source
    assert log.num_classes is None  # the log does not say; --num-classes does


@needs_seed
def test_seed_log_ends_in_a_cuda_oom(seed_log):
    end = seed_log.end
    assert end.status == "crashed" and end.epoch == 16 and end.exception["type"] == "torch.OutOfMemoryError"
    assert end.context["progress"] == [0, 1498] and end.context["after_eval"] is True
    assert "train.py:514 in train_epoch" in end.context["user_where"]
    oom = parse_oom(end.exception["message"])
    assert oom["requested"] == 226 * MiB and oom["total"] == pytest.approx(15.89 * GiB)
    assert oom["allocated"] == pytest.approx(14.12 * GiB) and oom["reserved_unallocated"] == pytest.approx(1.25 * GiB)
    assert oom["free"] == pytest.approx(225.12 * MiB)


@needs_seed
def test_doctor_on_the_seed_log(seed_log):
    found = diagnose_log(seed_log)
    c = codes(found)
    assert c["accuracy-collapse"] == "error" and c["oom"] == "error"
    assert c["uncertainty-lag"] == "warning" and c["loss-rising"] == "warning"
    assert "chance-level" not in c and "uncertainty-at-chance" not in c
    skipped = [f for f in found if f.code == "check-skipped"]
    assert any("--num-classes" in f.message for f in skipped)  # C unknown: said, not silently skipped
    collapse = find(found, "accuracy-collapse").message
    assert "15.38%" in collapse and "1.17%" in collapse
    oom = find(found, "oom").message
    assert all(s in oom for s in ("226.00 MiB", "14.12 GiB", "1.25 GiB", "15.89 GiB", "epoch 16"))
    lag = find(found, "uncertainty-lag")
    for b in ("sa", "glca", "pwca"):
        r = lag.evidence["branches"][b]
        assert 0.9 < r["speed_median"] < 1.1  # w moves at ≈ lr per optimiser step: Adam's limit
        assert r["gap"] > 1.4  # far from log L ≈ 1.65
    assert "374.5" in lag.message
    rising = find(found, "loss-rising").evidence
    assert rising["losses"]["loss_sa"]["from_step"] == 4 and rising["lr"]["flat_or_falling"]


@needs_seed
def test_doctor_on_the_seed_log_with_the_number_of_classes(seed_log):
    found = diagnose(SEED_LOG, num_classes=200)
    chance = find(found, "chance-level")
    assert chance.severity == "error" and set(chance.evidence["loss_median"]) == {"sa", "glca", "pwca"}
    assert "ln C = 5.30" in chance.message
    assert "uncertainty-at-chance" not in codes(found)  # the weights are far from equilibrium: no ½/ln C reading
    assert not any(f.code == "check-skipped" and "--num-classes" in f.message for f in found)


@needs_seed
def test_the_oom_request_matches_the_pwca_score_map(seed_log):
    found = diagnose_log(seed_log, model={"backbone": "vit_base_patch16_224", "img_size": 448, "batch_size": 4})
    oom = find(found, "oom")
    (match,) = oom.evidence["matches"]
    assert match["component"] == "pwca" and match["dtype"] == "fp32"
    assert match["bytes"] == 4 * 12 * 785 * 1570 * 4
    assert "4×12×785×1570" in oom.message and "225.67 MiB" in oom.message


@needs_seed
def test_dcal_doctor_command_on_the_seed_log():
    proc = subprocess.run([sys.executable, "-m", "dcal_app", "doctor", str(SEED_LOG), "--num-classes", "200"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    for s in ("[error] chance-level", "[error] accuracy-collapse", "[error] oom", "[warning] uncertainty-lag",
              "15.38%", "1.17%", "226.00 MiB"):
        assert s in out, s


@needs_seed
def test_json_and_html_on_the_seed_log(tmp_path, capsys):
    report = tmp_path / "seed.html"
    assert main([str(SEED_LOG), "--json", "--html", str(report)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert all(set(d) == {"code", "severity", "message", "evidence"} for d in out)
    skipped = [d for d in out if d["code"] == "check-skipped"]
    assert skipped and "num_classes unknown" in {d["evidence"]["reason"] for d in skipped}
    page = report.read_text()
    assert "check-skipped" in page and "How the log was read" in page
    assert page.count('<img src="data:image/png;base64,') == 3


@needs_seed
def test_seed_csv_gives_the_same_story(tmp_path):
    csv = SEED / "seed_run_epochs.csv"
    log = import_log(csv)
    assert log.evals["val_acc"].tolist() == pytest.approx([0.1538, 0.0186, 0.0117])  # "val_top1_pct"
    found = diagnose_log(log)
    assert {"accuracy-collapse", "loss-rising"} <= set(codes(found))
    lag_skip = [f for f in found if f.code == "check-skipped" and "uncertainty-lag" in f.evidence["checks"]]
    assert lag_skip and "--steps-per-epoch" in lag_skip[0].message  # no progress bars in a CSV: said
    assert "uncertainty-lag" in codes(diagnose(csv, steps_per_epoch=374.5))


# --- other shapes of text log

KERAS = """Epoch 1/3
1875/1875 [==============================] - 5s 3ms/step - loss: 0.2987 - accuracy: 0.9134 - val_loss: 0.1432 - val_accuracy: 0.9571
Epoch 2/3
1875/1875 [==============================] - 4s 2ms/step - loss: 0.1421 - accuracy: 0.9577 - val_loss: 0.1012 - val_accuracy: 0.9690
Epoch 3/3
1875/1875 [==============================] - 4s 2ms/step - loss: 0.1071 - accuracy: 0.9678 - val_loss: 0.0891 - val_accuracy: 0.9721
"""

MNIST = """Train Epoch: 1 [0/60000 (0%)]\tLoss: 2.300000
Train Epoch: 1 [59520/60000 (99%)]\tLoss: 0.300000

Test set: Average loss: 0.1000, Accuracy: 9700/10000 (97%)

Train Epoch: 2 [59520/60000 (99%)]\tLoss: 0.150000

Test set: Average loss: 0.0700, Accuracy: 9800/10000 (98%)
"""

STAMPED = """2024-03-01 10:00:00,123 - trainer - INFO - Number of classes: 10
2024-03-01 10:00:00,124 - trainer - INFO - batch_size=32 grad_accum=2
2024-03-01 10:01:00,000 - trainer - INFO - [epoch 1] train_loss=2.10 train_acc=25.0% lr=1.0e-3
2024-03-01 10:01:10,000 - trainer - INFO - [epoch 1] val_loss=1.90 val_acc=31.5%
2024-03-01 10:02:00,000 - trainer - INFO - [epoch 2] train_loss=1.50 train_acc=48.0% lr=9.0e-4
2024-03-01 10:02:10,000 - trainer - INFO - [epoch 2] val_loss=1.40 val_acc=52.5%
Traceback (most recent call last):
  File "/home/u/train.py", line 88, in <module>
    main()
  File "/home/u/train.py", line 70, in main
    loss = step(batch)
ValueError: loss is nan at step 1234
"""

FAIRSEQ = """[00:00:05] epoch 001 | step 100 | loss 4.512 | lr 0.0005 | gnorm 1.23
[00:00:10] epoch 001 | step 200 | loss 3.912 | lr 0.0005 | gnorm 1.10
[00:00:15] epoch 001 | valid on 'valid' subset | loss 3.800 | accuracy 41.2
[00:00:20] epoch 002 | step 300 | loss 3.512 | lr 0.0004 | gnorm 0.98
"""

TQDM = ("Epoch 1:  50%|#####     | 50/100 [00:10<00:10,  5.00it/s, loss=1.23, acc=0.45]\r"
        "Epoch 1: 100%|##########| 100/100 [00:20<00:00,  5.00it/s, loss=1.01, acc=0.55]\n"
        "Epoch 2: 100%|##########| 100/100 [00:20<00:00,  5.00it/s, loss=0.81, acc=0.65]\n")

SECTIONS = """=== Epoch 1 ===
Train:
  loss: 1.20
  accuracy: 61.0
Validation:
  loss: 1.10
  accuracy: 64.5
=== Epoch 2 ===
Train:
  loss: 0.90
  accuracy: 72.0
Validation:
  loss: 0.95
  accuracy: 70.0
"""


def test_keras_progress_lines(tmp_path):
    log = import_log(write(tmp_path, "keras.log", KERAS))
    assert log.step_unit == "epoch" and log.steps["loss"].tolist() == [0.2987, 0.1421, 0.1071]
    assert log.steps["train_acc"].iloc[0] == 0.9134 and log.evals["val_acc"].tolist() == [0.9571, 0.969, 0.9721]
    assert log.evals["val_loss"].iloc[-1] == 0.0891


def test_pytorch_mnist_example_log(tmp_path):
    log = import_log(write(tmp_path, "mnist.log", MNIST))
    assert log.steps["loss"].tolist() == [0.3, 0.15]  # the last train loss printed in each epoch
    assert log.evals["val_loss"].tolist() == [0.1, 0.07]  # "Test set:" makes the line a validation one
    assert log.evals["val_acc"].tolist() == [0.97, 0.98]  # 9700/10000


def test_time_stamped_lines_percentages_settings_and_a_traceback(tmp_path):
    log = import_log(write(tmp_path, "train.log", STAMPED))
    assert log.steps["train_acc"].tolist() == pytest.approx([0.25, 0.48])
    assert log.evals["val_acc"].tolist() == pytest.approx([0.315, 0.525])
    assert log.steps["lr"].tolist() == [1e-3, 9e-4] and log.num_classes == 10  # "Number of classes: 10"
    assert log.source.settings["batch_size"] == 32 and log.source.settings["grad_accum_steps"] == 2
    assert any("percentages" in n for n in log.source.notes)
    assert log.end.exception == {"type": "ValueError", "message": "loss is nan at step 1234",
                                 "where": "/home/u/train.py:70 in main"}
    crash = find(diagnose_log(log), "crash")
    assert crash.severity == "error" and crash.evidence["kind"] == "nonfinite" and "epoch 2" in crash.message
    assert "train.py:70 in main" in crash.message and "log line 12" in crash.message


def test_name_value_pipes_and_a_validation_line(tmp_path):
    log = import_log(write(tmp_path, "fairseq.log", FAIRSEQ))
    assert log.step_unit == "step" and log.steps["step"].tolist() == [100, 200, 300]
    assert log.steps["loss"].tolist() == [4.512, 3.912, 3.512] and log.steps["grad_norm"].iloc[0] == 1.23
    assert log.evals["val_loss"].tolist() == [3.8] and log.evals["val_acc"].tolist() == pytest.approx([0.412])
    assert any("0–100 scale" in n for n in log.source.notes)  # 41.2 → 0.412, and said


def test_tqdm_postfix_rewritten_with_carriage_returns(tmp_path):
    log = import_log(write(tmp_path, "tqdm.log", TQDM))
    assert log.steps["loss"].tolist() == [1.01, 0.81] and log.steps["train_acc"].tolist() == [0.55, 0.65]
    assert log.steps_per_epoch == 100 and "progress bars" in log.steps_per_epoch_source


def test_section_headers_set_the_split(tmp_path):
    log = import_log(write(tmp_path, "sections.log", SECTIONS))
    assert log.steps["loss"].tolist() == [1.2, 0.9] and log.evals["val_loss"].tolist() == [1.1, 0.95]
    assert log.evals["val_acc"].tolist() == pytest.approx([0.645, 0.70])
    assert log.steps["train_acc"].tolist() == pytest.approx([0.61, 0.72])


def test_printed_python_dicts(tmp_path):
    """Hugging Face's Trainer prints dicts: quoted names, the epoch at the end, eval_ names."""
    text = ("{'loss': 2.1, 'learning_rate': 5e-05, 'epoch': 1.0}\n{'eval_loss': 1.9, 'eval_accuracy': 0.41, 'epoch': 1.0}\n"
            "{'loss': 1.6, 'learning_rate': 4e-05, 'epoch': 2.0}\n{'eval_loss': 1.5, 'eval_accuracy': 0.55, 'epoch': 2.0}\n")
    path = write(tmp_path, "hf.log", text)
    assert detect_format(path) == "text"  # starts with "{" but is not JSON
    log = import_log(path)
    assert log.steps["loss"].tolist() == [2.1, 1.6] and log.steps["lr"].tolist() == [5e-05, 4e-05]
    assert log.evals["val_acc"].tolist() == [0.41, 0.55] and log.evals["epoch"].tolist() == [1, 2]


def test_healthy_run_whose_total_loss_goes_negative_has_no_finding(tmp_path):
    """Under uncertainty weighting w_i < 0 once L_i < 1, and the total ½·Σ(e^(−w)·L + w) goes negative."""
    lines = []
    for e in range(1, 21):
        losses = {b: 4.0 * math.exp(-e / 4) + 0.1 + 0.02 * i for i, b in enumerate(("sa", "glca", "pwca"))}
        ws = {b: math.log(v) for b, v in losses.items()}  # at equilibrium
        total = 0.5 * sum(math.exp(-ws[b]) * losses[b] + ws[b] for b in losses)
        fields = " ".join([f"loss={total:.4f}"] + [f"loss_{b}={v:.4f}" for b, v in losses.items()]
                          + [f"w_{b}={w:.4f}" for b, w in ws.items()] + [f"lr={1e-3 * (1 - e / 25):.6f}"])
        lines.append(f"epoch {e}: {fields} val_acc={min(0.95, 0.05 * e + 0.1):.3f}")
    log = import_log(write(tmp_path, "healthy.log", "\n".join(lines) + "\n"), num_classes=10,
                     steps_per_epoch=100)
    assert log.steps["loss"].iloc[-1] < 0
    found = diagnose_log(log)
    assert set(codes(found)) == {"log-import"}, [f.message for f in found]
    assert main([str(tmp_path / "healthy.log"), "--num-classes", "10", "--steps-per-epoch", "100"]) == 0


def test_a_nan_written_in_the_log_is_nonfinite(tmp_path):
    text = "".join(f"epoch {e} | loss {v}\n" for e, v in ((1, "2.0"), (2, "1.5"), (3, "nan"), (4, "nan")))
    f = find(diagnose(write(tmp_path, "nan.log", text)), "nonfinite")
    assert f.severity == "error" and f.evidence["first_step"] == 3 and "epoch 3" in f.message


# --- what cannot be read

def test_unrecognised_labels_are_reported_and_map_names_them(tmp_path):
    text = "ep 1 vacc: 0.50\nep 2 vacc: 0.61\n"
    path = write(tmp_path, "odd.log", text)
    with pytest.raises(LogImportError, match=r"no metric could be read.*'vacc' \(line 1\).*--map"):
        import_log(path)
    assert main([str(path)]) == 2
    log = import_log(path, mapping=["val_acc=vacc"])
    assert log.evals["val_acc"].tolist() == [0.5, 0.61] and log.source.recognised == {"vacc": "val_acc"}
    with pytest.raises(LogImportError, match="not a canonical name"):
        import_log(path, mapping=["validation_accuracy=vacc"])
    assert main([str(path), "--map", "nope"]) == 2


def test_a_value_that_is_not_a_number_is_named_with_its_line(tmp_path):
    text = "epoch 1 | loss: 2.0\nepoch 2 | loss: n/a\nepoch 3 | loss: 1.0\n"
    log = import_log(write(tmp_path, "bad.log", text))
    assert log.source.problems == [(2, "'loss' has the value 'n/a', not a number")]
    f = find(diagnose_log(log), "log-import")
    assert f.severity == "warning" and "line 2" in f.message


@pytest.mark.parametrize("content", [b"", b"just some words\nand more words\n", b"\x00\x01\x02binary"])
def test_unreadable_inputs_exit_2(tmp_path, content, capsys):
    path = tmp_path / "x.log"
    path.write_bytes(content)
    assert main([str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main([str(tmp_path / "folder")]) == 2


# --- tables and event files

def test_csv_with_sparse_rows(tmp_path):
    text = "epoch,step,train_loss,val_loss,val_acc\n0,49,2.1,,\n0,99,1.9,1.8,0.41\n1,149,1.5,,\n1,199,1.4,1.3,0.55\n"
    log = import_log(write(tmp_path, "metrics.csv", text))
    assert log.step_unit == "step" and log.steps["step"].tolist() == [49, 99, 149, 199]
    assert log.evals["step"].tolist() == [99, 199] and log.evals["val_acc"].tolist() == [0.41, 0.55]


def test_csv_bad_cell_is_named(tmp_path):
    log = import_log(write(tmp_path, "m.csv", "epoch,loss\n1,2.0\n2,oops\n3,1.0\n"))
    assert log.source.problems == [(3, "column 'loss': 'oops' is not a number")]


def test_json_lines_of_nested_metrics(tmp_path):
    rows = [{"epoch": e, "train": {"loss": 2.0 / e, "acc": 0.3 * e}, "val": {"loss": 1.9 / e, "acc": 0.3 * e},
             "lr": 1e-3} for e in (1, 2)]
    path = write(tmp_path, "log.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    assert detect_format(path) == "jsonl"
    log = import_log(path)
    assert log.steps["train_acc"].tolist() == pytest.approx([0.3, 0.6]) and log.evals["val_loss"].iloc[1] == 0.95
    assert log.source.problems[0][0] == 3 and "malformed JSON" in log.source.problems[0][1]


def test_tensorboard_file_and_folder(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb" / "train")) as w:
        for s in range(6):
            w.add_scalar("epoch_loss", 2.0 - 0.2 * s, s)
            w.add_scalar("lr", 1e-3, s)
            w.add_scalar("custom/thing", 1.0, s)
    with SummaryWriter(str(tmp_path / "tb" / "validation")) as w:
        for s in range(6):
            w.add_scalar("epoch_accuracy", 40.0 + 5 * s, s)  # a percentage
    log = import_log(tmp_path / "tb")
    assert log.source.format == "tensorboard" and log.steps["loss"].tolist() == pytest.approx([2.0 - 0.2 * s for s in range(6)])
    assert log.evals["val_acc"].tolist() == pytest.approx([0.40 + 0.05 * s for s in range(6)])
    assert "train custom/thing" in log.source.unrecognised
    (event_file,) = (tmp_path / "tb" / "train").glob("*tfevents*")
    assert detect_format(event_file) == "tensorboard"
    assert import_log(event_file).steps["lr"].tolist() == pytest.approx([1e-3] * 6)
