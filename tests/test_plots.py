"""Plotting helpers: pure (data in, Figure out), they reject bad input with a clear error; the uncertainty
reading; the LR rule table agrees with dcal.schedule; the run explorer builds and redraws."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from dcal.schedule import lr_for_rule, warmup_cosine
from diagnostics import curves
from diagnostics.runlog import frames_from_records, load_run

C = 10


def records(n: int = 120, at_chance: bool = False) -> list[dict]:
    """A small run: losses toward 0.3 (or stuck at ln C), w_i at their equilibrium log L_i."""
    lnC = math.log(C)
    out = []
    for t in range(n):
        rec = {"kind": "step", "step": t, "lr": warmup_cosine(t, total_steps=n, warmup_steps=10, peak=1e-4, floor=1e-6)}
        for i, b in enumerate(("sa", "glca", "pwca")):
            loss = lnC if at_chance else lnC * math.exp(-t / 20) + 0.3 + 0.05 * i
            rec[f"loss_{b}"], rec[f"w_{b}"] = loss, math.log(loss) * min(1.0, t / 40)
        out.append(rec)
        if (t + 1) % 30 == 0:
            acc = 1 / C if at_chance else 0.9 * (1 - math.exp(-(t + 1) / 20))
            out.append({"kind": "eval", "step": t, "acc_sa": acc, "acc_glca": acc, "acc_fused": acc,
                        "loss_sa": rec["loss_sa"], "num_classes": C})
    return out


@pytest.fixture
def close():
    figs = []
    yield figs.append
    import matplotlib.pyplot as plt
    for f in figs:
        plt.close(f)


def test_plot_curves_accepts_each_input_form(close, tmp_path):
    recs = records()
    steps, evals = frames_from_records(recs)
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for data in (recs, (steps, evals), {"steps": steps, "evals": evals}, load_run(run)):
        fig = curves.plot_curves(data)
        close(fig)
        assert isinstance(fig, Figure) and len(fig.axes) == 2
    fig = curves.plot_curves(steps, metrics=["loss_sa", "lr"], smooth=1)  # step records only: one panel
    close(fig)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) >= 2
    fig = curves.plot_curves(recs, metrics=["eval/loss_sa", "acc_fused"], num_classes=C)
    close(fig)
    assert len(fig.axes) == 1  # both are eval columns


def test_plot_curves_rejects_bad_input():
    steps, evals = frames_from_records(records())
    with pytest.raises(ValueError, match=r"not in the records.*loss_sa"):
        curves.plot_curves((steps, evals), metrics=["loss_nope"])
    with pytest.raises(ValueError, match="empty"):
        curves.plot_curves((pd.DataFrame(), pd.DataFrame()))
    with pytest.raises(ValueError, match="none of the default metrics"):
        curves.plot_curves(pd.DataFrame({"step": [0, 1], "lr": [0.1, 0.2]}))
    with pytest.raises(ValueError, match="missing column"):
        curves.plot_curves(steps.drop(columns="step"), metrics=["loss_sa"])
    with pytest.raises(ValueError, match="smooth"):
        curves.plot_curves(steps, smooth=0)
    with pytest.raises(TypeError, match="RunLog"):
        curves.plot_curves("runs/some_run")  # a path is not data: load_run it first
    with pytest.raises(ValueError, match="num_classes"):
        curves.plot_curves(steps, num_classes=1)


def test_plot_uncertainty_and_its_reading(close):
    fig = curves.plot_uncertainty(records(), num_classes=C)
    close(fig)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    # w (3) + log L (3) + the chance line on the first panel
    assert len(fig.axes[0].lines) == 7
    assert "every branch at chance" not in fig._suptitle.get_text()

    fig = curves.plot_uncertainty(records(at_chance=True), num_classes=C)
    close(fig)
    reading = curves.uncertainty_reading(records(at_chance=True), C)
    assert reading.startswith("weights ≈ ½/ln(C) = 0.217") and "every branch at chance" in reading
    assert fig._suptitle.get_text() == reading
    healthy = curves.uncertainty_reading(records(), C)
    assert "every branch at chance" not in healthy and "equilibrium" in healthy

    st = curves.uncertainty_state(records(), C)
    for v in st["branches"].values():  # at equilibrium the effective weight is ½/L
        assert v["effective_weight"] == pytest.approx(0.5 / v["loss"], rel=1e-3)


def test_plot_uncertainty_rejects_bad_input():
    with pytest.raises(ValueError, match="no w_sa/w_glca/w_pwca"):
        curves.plot_uncertainty(pd.DataFrame({"step": [0, 1], "loss_sa": [2.0, 1.0]}))
    with pytest.raises(ValueError, match="empty"):
        curves.plot_uncertainty(pd.DataFrame())
    with pytest.raises(ValueError, match="missing column.*step"):
        curves.plot_uncertainty(pd.DataFrame({"w_sa": [0.0, 0.1]}))
    assert curves.uncertainty_reading(pd.DataFrame({"step": [0], "loss_sa": [1.0]})) is None


def test_lr_rule_table_matches_dcal_schedule(close):
    table = curves.lr_rule_table([2, 4, 8, 16, 32])
    assert set(table["rule"]) == {"linear", "linear_per_gpu", "sqrt"}  # every rule but 'fixed'
    at16 = table[table.batch_size == 16].set_index("rule")["lr"]
    assert at16["linear"] == pytest.approx(1.5625e-5)
    assert at16["linear_per_gpu"] == pytest.approx(6.25e-5)
    assert at16["sqrt"] == pytest.approx(5e-4)
    t2 = curves.lr_rule_table([2], grad_accum_steps=8, world_size=2)
    row = t2[t2.rule == "linear"].iloc[0]
    assert row.global_batch == 32 and row.lr == lr_for_rule("linear", batch_size=2, grad_accum_steps=8, world_size=2)
    fig = curves.plot_lr_rules(table)
    close(fig)
    assert isinstance(fig, Figure) and fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="positive int"):
        curves.lr_rule_table([16, 0])
    with pytest.raises(ValueError, match="no batch sizes"):
        curves.lr_rule_table([])
    with pytest.raises(ValueError, match=r"missing column.*rule"):
        curves.plot_lr_rules(table.drop(columns="rule"))
    with pytest.raises(ValueError, match="empty"):
        curves.plot_lr_rules(table.iloc[:0])


def test_plot_lr_schedule(close):
    lrs = [warmup_cosine(t, total_steps=100, warmup_steps=10, peak=1e-4, floor=1e-6) for t in range(100)]
    fig = curves.plot_lr_schedule(lrs, warmup_steps=10, reference_lr=1e-4)
    close(fig)
    assert isinstance(fig, Figure)
    y = fig.axes[0].lines[0].get_ydata()
    assert np.allclose(y, lrs)  # draws what it was given, unchanged
    fig = curves.plot_lr_schedule({"warmup": lrs, "no warmup": lrs[10:]}, log_scale=True)
    close(fig)
    with pytest.raises(ValueError, match="holds no LR"):
        curves.plot_lr_schedule([])
    with pytest.raises(ValueError, match="non-finite or negative LR nan at index 1"):
        curves.plot_lr_schedule([1e-4, float("nan")])
    with pytest.raises(ValueError, match="3 steps for 2 LRs"):
        curves.plot_lr_schedule([1e-4, 1e-5], steps=[0, 1, 2])
    with pytest.raises(TypeError, match="sequence of LRs"):
        curves.plot_lr_schedule(1e-4)


def test_run_explorer(tmp_path):
    import ipywidgets as widgets

    from diagnostics.widgets import run_explorer

    for name, recs in (("good", records()), ("stuck", records(at_chance=True))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    box = run_explorer(tmp_path)
    ex = box.explorer
    assert isinstance(box, widgets.VBox) and len(ex.run.options) == 2
    assert "loss_sa" in ex.metrics.options and "eval/loss_sa" in ex.metrics.options
    assert set(ex.metrics.value) == {"loss_sa", "loss_glca", "loss_pwca", "acc_sa", "acc_glca", "acc_fused"}
    assert ex.png.startswith(b"\x89PNG") and ex.output.outputs[0]["data"]["image/png"]
    first = ex.png
    ex.run.value = str(tmp_path / "stuck")  # observers reload and redraw
    assert ex.png != first and ex.log.name == "stuck"
    ex.metrics.value = ("lr",)
    assert len(ex.figure.axes) == 1
    ex.view.value = "uncertainty"
    assert len(ex.figure.axes) == 3
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="no run folder"):
        run_explorer(tmp_path / "empty_root")


def test_run_explorer_takes_an_imported_log(tmp_path):
    """A log from any trainer (here a CSV), imported with `import_log`, beside one of our run folders."""
    from diagnostics import import_log
    from diagnostics.widgets import run_explorer

    csv = tmp_path / "their_run.csv"
    csv.write_text("epoch,loss,val_acc\n" + "".join(f"{e},{2.3 - 0.2 * e},{0.1 + 0.05 * e}\n" for e in range(1, 9)))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    ex = run_explorer([import_log(csv), tmp_path / "ours"]).explorer
    assert [p.name for p in ex.runs] == ["ours", "their_run.csv"]
    ex.run.value = str(csv)
    assert ex.log.name == "their_run.csv" and "loss" in ex.metrics.options and ex.png.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no runs"):
        run_explorer([])
