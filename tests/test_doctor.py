"""The run doctor: every public finding code is caught on a crafted run, a healthy run gives no error, the
reader reports truncated and malformed lines precisely, and the CLI's exit codes and outputs hold."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import yaml

from dcal.schedule import lr_for_rule, warmup_cosine
from dcal_app.doctor import main
from diagnostics import doctor
from diagnostics.doctor import Finding, diagnose, to_json
from diagnostics.runlog import RunLogError, RunLogWarning, load_run, read_metrics

N_STEPS, C = 300, 10
WARMUP = 30
BRANCHES = ("sa", "glca", "pwca")


# --- crafted runs

def healthy_records(n: int = N_STEPS, num_classes: int = C, eval_every: int = 50, seed: int = 0,
                    peak_lr: float | None = None) -> list[dict]:
    """Losses falling from ln C to ~0.3, w_i following log L_i with a lag, accuracy rising to 0.9, flat
    memory, varied GLCA selections."""
    rng = np.random.default_rng(seed)
    lnC = math.log(num_classes)
    peak = peak_lr if peak_lr is not None else lr_for_rule("linear", batch_size=16)
    w = dict.fromkeys(BRANCHES, 0.0)
    records = []
    for t in range(n):
        rec = {"kind": "step", "step": t, "epoch": t // 30,
               "lr": warmup_cosine(t, total_steps=n, warmup_steps=WARMUP, peak=peak, floor=1e-6),
               "grad_norm": 1.0 + 0.1 * rng.random(), "time": 0.1,
               "mem_allocated_mb": 500.0 + rng.normal(0, 1.0), "mem_peak_mb": 900.0 + rng.normal(0, 1.0)}
        total = 0.0
        for i, b in enumerate(BRANCHES):
            loss = lnC * math.exp(-t / (n / 5)) + 0.25 + 0.05 * i + 0.02 * rng.random()
            w[b] += 0.05 * (math.log(loss) - w[b])  # toward the equilibrium log L
            rec[f"loss_{b}"], rec[f"w_{b}"] = loss, w[b]
            total += 0.5 * (math.exp(-w[b]) * loss + w[b])
        rec["loss"] = total
        records.append(rec)
        if (t + 1) % eval_every == 0:
            acc = 0.9 * (1 - math.exp(-(t + 1) / (n / 5)))
            records.append({"kind": "eval", "step": t, "epoch": t // 30, "acc_sa": acc - 0.01,
                            "acc_glca": acc - 0.02, "acc_fused": acc, "part_hit": 0.7, "part_hit_chance": 0.1,
                            "selection_jaccard": 0.25, "loss_sa": records[-1]["loss_sa"], "num_classes": num_classes})
    return records


def make_config(num_classes: int = C, n: int = N_STEPS, **train) -> dict:
    g = 16
    cfg_train = {"epochs": 10, "batch_size": 16, "grad_accum_steps": 1, "lr_rule": "linear", "optimizer": "adamw",
                 "weight_decay": 0.05, "warmup_epochs": 1, "uncertainty_bounds": None}
    cfg_train.update(train)
    return {"model": {"backbone": "deit_tiny_patch16_224", "glca": True, "pwca": True},
            "data": {"format": "synthetic", "root": None, "img_size": 32},
            "train": cfg_train,
            "derived": {"global_batch": g, "lr": lr_for_rule("linear", batch_size=g), "world_size": 1,
                        "steps_per_epoch": 30, "total_steps": n, "warmup_steps": WARMUP, "num_classes": num_classes}}


def write_run(path, records: list[dict], config: dict | None = None, tail: str = ""):
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (path / "metrics.jsonl").write_text(text)
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def steps_of(records):
    return [r for r in records if r["kind"] == "step"]


def evals_of(records):
    return [r for r in records if r["kind"] == "eval"]


def codes(findings) -> dict[str, str]:
    return {f.code: f.severity for f in findings}


def at_chance_records(num_classes: int = C, excess: float = 1.0) -> list[dict]:
    """A run that never learns: losses ≈ excess·ln C, w_i converged to log L, accuracy ≈ 1/C."""
    recs = healthy_records(num_classes=num_classes)
    lnC = math.log(num_classes)
    rng = np.random.default_rng(1)
    for r in steps_of(recs):
        for b in BRANCHES:
            r[f"loss_{b}"] = excess * lnC * (1 + 0.02 * rng.standard_normal())
            r[f"w_{b}"] = math.log(excess * lnC) * min(1.0, r["step"] / 100)
    for r in evals_of(recs):
        r.update(acc_sa=1 / num_classes, acc_glca=0.8 / num_classes, acc_fused=1 / num_classes)
    return recs


# --- healthy runs

def test_healthy_run_has_no_findings(tmp_path):
    run = write_run(tmp_path / "healthy", healthy_records(), make_config())
    findings = diagnose(run)
    assert findings == [], doctor.format_text(findings)


def test_metrics_only_folder_is_diagnosed_from_the_log(tmp_path):
    run = write_run(tmp_path / "healthy", healthy_records())
    log = load_run(run)
    assert log.config is None and log.num_classes == C
    assert diagnose(run) == []
    sick = write_run(tmp_path / "sick", at_chance_records())
    found = codes(diagnose(sick))
    assert found["chance-level"] == "error" and found["uncertainty-at-chance"] == "error"
    assert "lr-rule" not in found and "coupled-weight-decay" not in found  # need the config


def test_number_of_classes_comes_from_the_config_without_eval_records(tmp_path):
    recs = [r for r in at_chance_records() if r["kind"] == "step"]
    cfg = make_config()
    assert "chance-level" not in codes(diagnose(write_run(tmp_path / "a", recs)))  # C unknown: no claim
    assert codes(diagnose(write_run(tmp_path / "b", recs, cfg)))["chance-level"] == "error"


# --- each code caught

@pytest.mark.parametrize("how", ["nan", "null", "inf_grad", "flag"])
def test_nonfinite(tmp_path, how):
    recs = healthy_records()
    for r in steps_of(recs):
        if r["step"] >= 123:
            if how == "nan":
                r["loss_glca"] = float("nan")
            elif how == "null":
                r["w_pwca"] = None
            elif how == "inf_grad":
                r["grad_norm"] = float("inf")
            else:
                r["nonfinite"] = ["loss_glca"]
    findings = diagnose(write_run(tmp_path / how, recs, make_config()))
    f = next(f for f in findings if f.code == "nonfinite")
    assert f.severity == "error" and f.evidence["first_step"] == 123
    assert "step 123" in f.message
    json.dumps(f.evidence, allow_nan=False)


def test_null_in_a_disabled_branch_is_not_nonfinite(tmp_path):
    recs = healthy_records()
    for r in steps_of(recs):
        r["loss_pwca"] = r["w_pwca"] = None
    cfg = make_config()
    cfg["model"]["pwca"] = False
    assert "nonfinite" not in codes(diagnose(write_run(tmp_path / "a", recs, cfg)))
    assert "nonfinite" not in codes(diagnose(write_run(tmp_path / "b", recs)))  # never logged: not active
    recs = healthy_records()
    for r in steps_of(recs):  # no uncertainty weighting at all: w never logged
        r["w_sa"] = r["w_glca"] = r["w_pwca"] = None
    assert "nonfinite" not in codes(diagnose(write_run(tmp_path / "c", recs, make_config())))
    for r in steps_of(recs):  # but a branch the config turns on must log a loss
        r["loss_pwca"] = None
    assert codes(diagnose(write_run(tmp_path / "d", recs, make_config())))["nonfinite"] == "error"


def test_chance_level_by_accuracy_alone(tmp_path):
    recs = healthy_records()
    for r in evals_of(recs):
        r["acc_glca"] = 0.12  # 1.2/C, losses healthy
    f = next(f for f in diagnose(write_run(tmp_path / "r", recs)) if f.code == "chance-level")
    assert f.severity == "error" and "GLCA accuracy" in f.message and "glca" in f.evidence["acc_max"]
    assert "these branches are not learning" in f.message  # a DCAL branch: said so


def test_chance_level_on_a_single_model_run_folder(tmp_path):
    """A run folder of a plain classifier (one loss, one accuracy): the loss at ln C is read, and the message
    speaks of the model, not of branches."""
    recs = [{"kind": "step", "step": t, "loss": math.log(C) * (1 + 0.01 * math.sin(t))} for t in range(60)]
    recs += [{"kind": "eval", "step": t, "val_acc": 0.1, "num_classes": C} for t in range(9, 60, 10)]
    f = next(f for f in diagnose(write_run(tmp_path / "plain", recs)) if f.code == "chance-level")
    assert set(f.evidence["loss_median"]) == {"loss"} and f.evidence["acc_max"] == {"val_acc": 0.1}
    assert "branch" not in f.message and "the model is not learning" in f.message


def test_uncertainty_at_chance_at_equilibrium(tmp_path):
    # C = 200, losses a little above ln 200 = 5.3 and every w_i at its equilibrium log L_i: effective
    # weights ≈ 0.08 read as "every branch at chance".
    recs = at_chance_records(num_classes=200, excess=1.15)
    f = next(f for f in diagnose(write_run(tmp_path / "seed", recs)) if f.code == "uncertainty-at-chance")
    assert f.severity == "error"
    assert all(0.075 < v < 0.09 for v in f.evidence["effective_weight"].values())
    assert "every branch at chance" in f.message and "0.094" in f.message


def test_weights_far_from_equilibrium_are_not_read_as_chance(tmp_path):
    """The seed's case: w ≈ 0.08 raw, losses ≈ ln C, so log L ≈ 1.65: the weights have not arrived, and
    ½·e^(−w) says how far they got, not what the losses are."""
    recs = at_chance_records(num_classes=200, excess=1.0)
    chance_w = math.log(math.log(200))
    for r in steps_of(recs):
        r.update({f"w_{b}": chance_w * min(1.0, r["step"] / 100) for b in BRANCHES})  # at log ln C ...
        r.update({f"loss_{b}": 3.0 * math.log(200) for b in BRANCHES})  # ... but log L = log(3 ln C): 1.1 away
    found = codes(diagnose(write_run(tmp_path / "r", recs)))
    assert "uncertainty-at-chance" not in found and found["chance-level"] == "error"


def test_uncertainty_at_chance_without_losses_is_a_warning(tmp_path):
    recs = at_chance_records()
    for r in recs:
        for b in BRANCHES:
            r.pop(f"loss_{b}", None)
    found = codes(diagnose(write_run(tmp_path / "r", recs)))
    assert found["uncertainty-at-chance"] == "warning"


def _clamped(recs, lo=-1.0):
    for r in steps_of(recs):
        r["w_sa"] = max(r["w_sa"], lo)  # healthy w_sa heads to log 0.25 ≈ −1.4
    return recs


def test_uncertainty_clamped_from_config_bounds(tmp_path):
    recs = _clamped(healthy_records())
    f = next(f for f in diagnose(write_run(tmp_path / "r", recs, make_config(uncertainty_bounds=[-1.0, 1.0])))
             if f.code == "uncertainty-clamped")
    assert f.severity == "warning" and f.evidence["pinned"]["sa"]["bound"] == "lower"
    assert "w_sa" in f.message and "-1" in f.message
    # The same log with a config that says "no clamp" is not flagged (w_sa hits −1 by coincidence).
    assert "uncertainty-clamped" not in codes(diagnose(write_run(tmp_path / "n", recs, make_config())))


def test_uncertainty_clamped_inferred_without_config(tmp_path):
    f = next(f for f in diagnose(write_run(tmp_path / "r", _clamped(healthy_records())))
             if f.code == "uncertainty-clamped")
    assert f.evidence["pinned"]["sa"]["bound"] == "inferred" and f.evidence["pinned"]["sa"]["value"] == -1.0


def collapse_records() -> list[dict]:
    """The seed's run: fused accuracy up to 15.38 %, then down to 1.17 % (C = 200)."""
    recs = healthy_records(num_classes=200)
    accs = [0.05, 0.1538, 0.12, 0.03, 0.015, 0.0117]
    for r, a in zip(evals_of(recs), accs, strict=True):
        r.update(acc_sa=a, acc_glca=a * 0.9, acc_fused=a)
    return recs


def test_accuracy_collapse(tmp_path):
    f = next(f for f in diagnose(write_run(tmp_path / "r", collapse_records())) if f.code == "accuracy-collapse")
    fused = f.evidence["branches"]["fused"]
    assert f.severity == "error" and fused["best"] == pytest.approx(0.1538) and fused["final"] == pytest.approx(0.0117)
    assert "15.38%" in f.message and "1.17%" in f.message


def test_a_dip_that_recovers_is_not_a_collapse(tmp_path):
    recs = healthy_records()
    evals_of(recs)[3]["acc_fused"] = 0.1
    assert "accuracy-collapse" not in codes(diagnose(write_run(tmp_path / "r", recs)))


def test_memory_growth(tmp_path):
    recs = healthy_records()
    for r in steps_of(recs):
        r["mem_allocated_mb"] = 500.0 + 0.5 * r["step"] + np.random.default_rng(r["step"]).normal(0, 1.0)
    f = next(f for f in diagnose(write_run(tmp_path / "r", recs)) if f.code == "memory-growth")
    assert f.evidence["slope_mb_per_step"] == pytest.approx(0.5, rel=0.05)
    assert f.severity == "warning" and "MB per step" in f.message
    for r in steps_of(recs):
        r["mem_allocated_mb"] = 500.0 + 2.0 * r["step"]
    assert codes(diagnose(write_run(tmp_path / "e", recs)))["memory-growth"] == "error"  # doubled


def test_selection_static(tmp_path):
    recs = healthy_records()
    for r in evals_of(recs):
        r.update(selection_jaccard=0.97, part_hit=0.11)
    f = next(f for f in diagnose(write_run(tmp_path / "r", recs)) if f.code == "selection-static")
    assert f.severity == "error" and "0.970" in f.message and f.evidence["part_hit_chance"] == 0.1


def test_lr_rule(tmp_path):
    cfg = make_config(lr_rule="sqrt")
    cfg["derived"]["lr"] = lr_for_rule("sqrt", batch_size=16)  # 5e-4: 32x the linear rule
    recs = healthy_records(peak_lr=cfg["derived"]["lr"])
    f = next(f for f in diagnose(write_run(tmp_path / "r", recs, cfg)) if f.code == "lr-rule")
    assert f.severity == "warning" and f.evidence["ratio"] == pytest.approx(32)
    assert "0.0005" in f.message and "1.56e-05" in f.message
    # The per-GPU reading of the paper (4x) is within tolerance.
    cfg["derived"]["lr"] = lr_for_rule("linear_per_gpu", batch_size=16)
    assert "lr-rule" not in codes(diagnose(write_run(tmp_path / "p", healthy_records(), cfg)))


def test_coupled_weight_decay(tmp_path):
    cfg = make_config(optimizer="adam_l2")
    assert codes(diagnose(write_run(tmp_path / "a", healthy_records(), cfg)))["coupled-weight-decay"] == "warning"
    found = codes(diagnose(write_run(tmp_path / "b", collapse_records(), make_config(200, optimizer="adam_l2"))))
    assert found["coupled-weight-decay"] == "error" and found["accuracy-collapse"] == "error"
    assert "coupled-weight-decay" not in codes(diagnose(write_run(tmp_path / "c", healthy_records(),
                                                                  make_config(optimizer="adam_l2", weight_decay=0.0))))


def test_errors_come_first_and_evidence_is_strict_json(tmp_path):
    cfg = make_config(optimizer="adam_l2")
    findings = diagnose(write_run(tmp_path / "r", at_chance_records(), cfg))
    sev = [f.severity for f in findings]
    assert sev == sorted(sev, key=doctor.SEVERITIES.index) and sev[0] == "error"
    assert {f.code for f in findings} <= set(doctor.CODES)
    json.loads(to_json(findings))  # allow_nan=False inside: would raise on NaN
    with pytest.raises(ValueError, match="severity"):
        Finding("x", "fatal", "m")


# --- the reader

def test_truncated_last_line_is_a_warning(tmp_path):
    run = write_run(tmp_path / "r", healthy_records(), tail='{"kind": "step", "step": 300, "lo')
    with pytest.warns(RunLogWarning, match=r"metrics.jsonl:\d+: last line is truncated"):
        steps, _ = read_metrics(run)
    assert len(steps) == N_STEPS
    found = codes(diagnose(run))
    assert found == {"truncated-log": "warning"}


def test_malformed_middle_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "r", healthy_records())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunLogError, match=r"metrics\.jsonl:3: malformed JSON"):
        load_run(run)
    assert main([str(run)]) == 2


def test_reader_types(tmp_path):
    recs = [{"kind": "step", "step": 0, "loss": 1.0, "loss_pwca": None, "note": "x"},
            {"kind": "step", "step": 1, "loss": 0.5, "loss_pwca": None, "extra": 3},
            {"kind": "other", "step": 1}, {"kind": "eval", "step": 1, "acc_sa": 0.5, "num_classes": 4}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps, evals = read_metrics(write_run(tmp_path / "r", recs) / "metrics.jsonl")
    assert steps["step"].dtype == "int64" and steps["loss_pwca"].isna().all()
    assert steps["loss_pwca"].dtype == float and list(evals["acc_sa"]) == [0.5]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_run(tmp_path / "nowhere")


# --- output and the command

def test_cli_exit_codes_and_json(tmp_path, capsys):
    healthy = write_run(tmp_path / "healthy", healthy_records(), make_config())
    sick = write_run(tmp_path / "sick", at_chance_records(), make_config())
    assert main([str(healthy)]) == 0
    assert "no findings" in capsys.readouterr().out
    assert main([str(sick), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and out
    assert all(set(d) == {"code", "severity", "message", "evidence"} for d in out)
    assert "chance-level" in {d["code"] for d in out}
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2


def test_text_output_states_the_numbers(tmp_path):
    run = write_run(tmp_path / "r", at_chance_records(), make_config())
    log = load_run(run)
    text = doctor.format_text(doctor.diagnose_log(log), doctor.summarize(log))
    assert "[error] chance-level" in text and "ln C = 2.30" in text and "C = 10" in text


def test_html_report_is_self_contained(tmp_path, capsys):
    run = write_run(tmp_path / "r", at_chance_records(), make_config())
    report = tmp_path / "report.html"
    assert main([str(run), "--html", str(report)]) == 1
    page = report.read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    assert "chance-level" in page and "lr_rule" in page  # findings table and config
    assert "http://" not in page and "https://" not in page


def test_empty_log_and_a_sparse_log_still_report(tmp_path, capsys):
    empty = write_run(tmp_path / "empty", [])
    assert codes(diagnose(empty)) == {"empty-log": "warning"}
    assert main([str(empty), "--html", str(tmp_path / "e.html")]) == 0
    assert "not drawn" in (tmp_path / "e.html").read_text()
    sparse = [{"kind": "step", "step": t, "loss": 1.0 / (t + 1)} for t in range(20)]  # no branch fields at all
    found = diagnose(write_run(tmp_path / "sparse", sparse))
    # a plain loss could be read against ln C: without C that is said, and nothing else is
    assert [(f.code, f.evidence["reason"]) for f in found] == [("check-skipped", "num_classes unknown")]
    assert diagnose(write_run(tmp_path / "sparse", sparse), num_classes=10) == []


def test_a_run_that_never_left_warm_up_is_not_called_at_chance(tmp_path):
    recs = [r for r in at_chance_records() if r["step"] < 30]  # warm-up is 30 steps
    assert "chance-level" not in codes(diagnose(write_run(tmp_path / "r", recs, make_config())))


# --- how the run ended (the trainer's end record), the weights' speed, a rising loss, skipped checks

OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 226.00 MiB. GPU 0 has a total capacity of 15.89 GiB of which "
               "225.12 MiB is free. Of the allocated memory 14.12 GiB is allocated by PyTorch, and 1.25 GiB is "
               "reserved by PyTorch but unallocated.")


def end_record(status="crashed", type_="OutOfMemoryError", message=OOM_MESSAGE, step=300, epoch=9):
    exc = None if status == "completed" else {"type": type_, "message": message, "where": "dcal/train.py:380 in step"}
    return {"kind": "end", "status": status, "step": step, "epoch": epoch, "exception": exc}


def test_end_record_oom_names_the_tensor_from_the_config(tmp_path):
    cfg = make_config()
    cfg["model"]["backbone"], cfg["data"]["img_size"], cfg["train"]["batch_size"] = "vit_base_patch16_224", 448, 4
    run = write_run(tmp_path / "r", healthy_records() + [end_record()], cfg)
    log = load_run(run)
    assert log.end.status == "crashed" and log.end.step == 300
    f = next(f for f in diagnose(run) if f.code == "oom")
    assert f.severity == "error" and f.evidence["allocator_bytes"]["requested"] == 226 * 2**20
    assert [m["component"] for m in f.evidence["matches"]] == ["pwca"] and "the run's config" in f.message
    assert "step 300" in f.message and "14.12 GiB" in f.message
    assert main([str(run)]) == 1


def test_end_record_crash_and_completed(tmp_path):
    crashed = write_run(tmp_path / "c", healthy_records() + [end_record(type_="KeyError", message="'pwca'")],
                        make_config())
    f = next(f for f in diagnose(crashed) if f.code == "crash")
    assert f.severity == "error" and "KeyError: 'pwca'" in f.message and "dcal/train.py:380" in f.message
    done = write_run(tmp_path / "d", healthy_records() + [end_record("completed")], make_config())
    assert diagnose(done) == []
    resumed = write_run(tmp_path / "r", healthy_records()[:50] + [end_record()] + healthy_records()[50:],
                        make_config())
    assert load_run(resumed).end is None  # records after an end: the run was resumed and has not ended
    bad = write_run(tmp_path / "b", healthy_records() + [{"kind": "end", "status": "exploded"}])
    with pytest.raises(RunLogError, match="end record status"):
        load_run(bad)


def test_uncertainty_lag_on_step_records(tmp_path):
    """w_i growing by lr every step (Adam's speed limit) toward log L_i = log 3 ≈ 1.1, still 0.95 away."""
    recs = healthy_records()
    lr = 5e-4
    for r in steps_of(recs):
        r["lr"] = lr
        for i, b in enumerate(BRANCHES):
            r[f"loss_{b}"] = 3.0 + 0.01 * i
            r[f"w_{b}"] = lr * (r["step"] + 1)
    f = next(f for f in diagnose(write_run(tmp_path / "r", recs)) if f.code == "uncertainty-lag")
    assert f.severity == "warning" and set(f.evidence["branches"]) == set(BRANCHES)
    assert f.evidence["branches"]["sa"]["speed_median"] == pytest.approx(1.0, rel=0.01)
    assert "more optimiser steps" in f.message
    assert "uncertainty-lag" not in codes(diagnose(write_run(tmp_path / "h", healthy_records())))


def rising_records() -> list[dict]:
    """Branch losses fall to step 100, then rise by 10 % at a falling LR while accuracy falls."""
    recs = healthy_records()
    for r in steps_of(recs):
        for i, b in enumerate(BRANCHES):
            t = r["step"]
            r[f"loss_{b}"] = (1.0 + 0.1 * i) * (1.0 + (0.5 * (100 - t) / 100 if t < 100 else 0.1 * (t - 100) / 200))
    for r, a in zip(evals_of(recs), [0.5, 0.6, 0.55, 0.45, 0.4, 0.35], strict=True):
        r.update(acc_sa=a, acc_glca=a, acc_fused=a)
    return recs


def test_loss_rising_and_its_tie_to_coupled_weight_decay(tmp_path):
    f = next(f for f in diagnose(write_run(tmp_path / "r", rising_records())) if f.code == "loss-rising")
    assert f.severity == "warning" and f.evidence["lr"]["flat_or_falling"]
    assert f.evidence["losses"]["loss_sa"]["rise_fraction"] == pytest.approx(0.1, abs=0.02)
    found = codes(diagnose(write_run(tmp_path / "w", rising_records(), make_config(optimizer="adam_l2"))))
    assert found["loss-rising"] == "warning" and found["coupled-weight-decay"] == "error"
    recs = rising_records()
    for r in evals_of(recs):
        r.update(acc_sa=0.9, acc_glca=0.9, acc_fused=0.9)  # accuracy holds: not erosion
    assert "loss-rising" not in codes(diagnose(write_run(tmp_path / "a", recs)))


def test_chance_checks_say_when_they_are_skipped(tmp_path):
    recs = [r for r in at_chance_records() if r["kind"] == "step"]  # no eval record: no num_classes
    findings = diagnose(write_run(tmp_path / "r", recs))
    skipped = [f for f in findings if f.code == "check-skipped"]
    assert skipped and skipped[0].severity == "info" and "number of classes C is unknown" in skipped[0].message
    assert "no findings" not in doctor.format_text(findings)
    assert not any(f.code == "check-skipped" for f in diagnose(write_run(tmp_path / "c", recs), num_classes=C))
