"""`diagnostics.watch` on hand-written loops: a plain timm ViT with AMP-style scaling, gradient accumulation,
an injected NaN (named by module), a planted leak (named by holder), user names mapped to the run record's;
the run folder it writes is read by the doctor; 100 enter/exit cycles leave nothing behind."""
from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import dcal
import diagnostics
from diagnostics.doctor import diagnose
from diagnostics.memory.monitor import MemoryMonitor
from diagnostics.nonfinite import NonFiniteError
from diagnostics.watch import LeakWarning, MicroBatch, NonFiniteWarning, watch

IMG, CLASSES = 32, 5


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, num_classes=CLASSES)


def batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


class Armed(nn.Module):
    """Wraps a module; when armed, multiplies its output by +inf (a forward overflow at a known place)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.armed = inner, False

    def forward(self, x):
        y = self.inner(x)
        return y * float("inf") if self.armed else y


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def hooks(*objs) -> int:
    n = 0
    for o in objs:
        if isinstance(o, torch.optim.Optimizer):
            n += len(o._optimizer_step_pre_hooks) + len(o._optimizer_step_post_hooks)
            continue
        for m in o.modules():
            n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            n += len(m._backward_pre_hooks)
    return n


# ----------------------------------------------------------------------------- the records of an AMP loop
def test_amp_loop_with_accumulation_writes_the_run_records(tmp_path):
    model, crit = vit(), nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A scale of 2^127 overflows fp32 gradients: the scaler skips steps, halving the scale each time, until
    # they fit (as a GradScaler's first steps do under fp16).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    accum, losses = 2, []
    with watch(model, opt, loss_fn=crit, out_dir=tmp_path, scaler=scaler) as w:
        for i in range(16):
            x, y = batch(i)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = crit(model(x), y)
            losses.append(loss.item())
            scaler.scale(loss / accum).backward()
            if (i + 1) % accum == 0:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
                w.log(train_acc=0.25)  # after the step: lands in the record of the step just taken
            with torch.no_grad():  # an evaluation forward inside the loop is not a micro-batch
                model(x)
    recs = read(tmp_path)
    steps, end = recs[:-1], recs[-1]
    assert [r["step"] for r in steps] == list(range(1, 9)) and w.step == 8
    assert end == {"kind": "end", "status": "completed", "step": 8, "epoch": None, "exception": None}
    skipped = [r for r in steps if r.get("skipped")]
    taken = [r for r in steps if not r.get("skipped")]
    assert skipped and taken and all(r["skip_reason"] == "amp-overflow" for r in skipped)
    assert all("grad_norm" not in r for r in skipped) and all(r["grad_norm"] > 0 for r in taken)
    scales = [r["loss_scale"] for r in steps]
    assert scales[0] == 2.0 ** 127 and all(b == a / 2 for a, b in zip(scales, scales[1:len(skipped) + 1]))
    for r in steps:  # the mean of the criterion's outputs over the step's micro-batches
        assert r["micro_batches"] == accum and r["train_acc"] == 0.25 and r["lr"] == 1e-3
        i = 2 * (r["step"] - 1)
        assert r["loss"] == pytest.approx((losses[i] + losses[i + 1]) / 2, rel=1e-6)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["train"]["grad_accum_steps"] == accum and cfg["train"]["batch_size"] == 4
    assert cfg["derived"]["num_classes"] == CLASSES and cfg["derived"]["global_batch"] == 8
    assert cfg["train"]["optimizer"] == "adamw" and cfg["watch"]["grad_scaler"] is True
    findings = diagnose(tmp_path)
    assert all(f.code != "nonfinite" for f in findings), [f.message for f in findings]
    assert hooks(model, crit, opt) == 0


def test_memory_phases_and_fields_are_the_trainers(tmp_path):
    model, crit = vit(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, loss_fn=crit, out_dir=tmp_path) as w:
        w._monitor.max_overhead = None  # measure every step (the default samples on CPU)
        for i in range(3):
            x, y = batch(i)
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for r in read(tmp_path)[:-1]:
        assert r["mem_source"] == "cpu-dispatch" and r["mem_peak_mb"] >= r["mem_allocated_mb"] > 0
        assert min(r[f"mem_peak_{p}_mb"] for p in ("forward", "backward", "optimizer")) > 0


def test_without_a_criterion_the_output_is_checked_and_the_loss_can_be_logged(tmp_path):
    model = vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, out_dir=tmp_path) as w:
        for i in range(4):
            x, y = batch(i)
            loss = F.cross_entropy(model(x), y)  # functional: no module to hook
            (loss / 2).backward()
            w.log(loss=loss)
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
    recs = read(tmp_path)[:-1]
    assert [r["micro_batches"] for r in recs] == [2, 2] and all(r["loss"] > 0 for r in recs)
    assert w.accum == 2


# ----------------------------------------------------------------------------- non-finite values
def nan_loop(tmp_path, *, scaler=None, mode="raise", replay=True, persistent=False):
    model, crit = vit(), nn.CrossEntropyLoss()
    fc1 = model.blocks[1].mlp.fc1 = Armed(model.blocks[1].mlp.fc1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scale = (lambda t: scaler.scale(t)) if scaler is not None else (lambda t: t)

    def rerun(mb: MicroBatch):
        scale(crit(model(*mb.args, **mb.kwargs), *mb.targets)).backward()

    state = {}
    with watch(model, opt, loss_fn=crit, out_dir=tmp_path, scaler=scaler, replay=rerun if replay else None,
               mode=mode) as w:
        for i in range(6):
            fc1.armed = i == 4 or (persistent and i > 4)
            x, y = batch(i)
            scale(crit(model(x), y)).backward()
            if i == 4:
                state["before"] = [p.detach().clone() for p in model.parameters()]
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if i == 4:
                state["after"] = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
    return w, model, state


def test_injected_nan_is_named_by_module_before_the_update(tmp_path):
    with pytest.raises(NonFiniteError) as ei:
        nan_loop(tmp_path)
    e = ei.value
    assert isinstance(e, dcal.NonFiniteLossError)  # the trainer's type catches it too
    assert (e.module, e.phase, e.step) == ("blocks.1.mlp.fc1", "forward", 5)
    recs = read(tmp_path)
    assert [r["step"] for r in recs if r["kind"] == "step"] == [1, 2, 3, 4]
    assert recs[-1]["kind"] == "end" and recs[-1]["status"] == "crashed"
    assert recs[-1]["exception"]["type"] == "NonFiniteError" and "blocks.1.mlp.fc1" in recs[-1]["exception"]["message"]
    diagnose(tmp_path)  # the doctor reads the folder of a crashed run


def test_injected_nan_under_a_grad_scaler_is_a_fault_not_an_overflow(tmp_path):
    # The scaler skips the step (its gradients are NaN), but the forward went non-finite: that is a fault;
    # the watch names it at the next micro-batch, since optimizer.step never ran.
    with pytest.raises(NonFiniteError) as ei:
        nan_loop(tmp_path, scaler=torch.amp.GradScaler("cpu"), persistent=True)
    assert (ei.value.module, ei.value.phase, ei.value.step) == ("blocks.1.mlp.fc1", "forward", 5)


def test_without_replay_the_tier1_term_is_named(tmp_path):
    with pytest.raises(NonFiniteError, match="replay off") as ei:
        nan_loop(tmp_path, replay=False)
    assert ei.value.module == "loss"


def test_warn_mode_drops_the_step_and_marks_the_record(tmp_path):
    with pytest.warns(NonFiniteWarning, match="blocks.1.mlp.fc1"):
        w, model, state = nan_loop(tmp_path, mode="warn")
    assert all(torch.equal(a, b) for a, b in zip(state["before"], state["after"]))  # no update
    rec = next(r for r in read(tmp_path) if r.get("step") == 5)
    assert rec["skipped"] and rec["skip_reason"] == "nonfinite"
    assert rec["nonfinite"] == "blocks.1.mlp.fc1 (forward)"
    assert "blocks.1.mlp.fc1" in (tmp_path / "train.log").read_text()
    assert len(w.findings) == 1 and w.step == 6


# ----------------------------------------------------------------------------- leaks
def test_planted_leak_is_named_by_its_holder(tmp_path):
    model, crit = vit(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []  # the planted leak: every step's loss, graph and all
    with pytest.warns(LeakWarning, match="history"), watch(model, opt, loss_fn=crit, out_dir=tmp_path) as w:
        for i in range(12):
            x, y = batch(i)
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            history.append(loss)
    rep = w.leak_report
    assert rep["flagged"] == ["graph_tensors"] and rep["series"]["graph_tensors"]["slope"] == pytest.approx(1.0)
    assert rep["holders"][0]["name"].startswith("history (local variable in test_planted_leak")
    leak = [r for r in read(tmp_path) if "leak" in r]
    assert len(leak) == 1 and "history" in leak[0]["leak"]


def test_a_clean_loop_reports_no_leak(tmp_path):
    model, crit = vit(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeakWarning)
        with watch(model, opt, loss_fn=crit) as w:
            for i in range(12):
                x, y = batch(i)
                loss = crit(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())  # a number, not the graph
    assert w.leak_report is None and w.step == 12


def test_memory_monitor_flags_step_outputs_kept_alive():
    mon = MemoryMonitor("cpu", baseline=None)
    kept = []
    w = torch.ones(3, requires_grad=True)
    for step in range(1, 10):
        mon.step_begin(step)
        loss = (w * step).sum()
        mon.track(loss)
        kept.append(loss)
        fields = mon.step_end()
    assert mon.leak_report is not None and "kept" in mon.leak_report["holders"][0]["name"]
    assert "leak" not in fields  # reported once, at the step it was flagged
    mon.close()


# ----------------------------------------------------------------------------- names
class SeedLikeLoss(nn.Module):
    """Like the seed's criterion: learnable log-variances, a (total, {branch: loss}) output."""

    def __init__(self):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(2))

    def forward(self, logits, y):
        sa, aux = F.cross_entropy(logits, y), F.cross_entropy(logits * 0.5, y)
        total = 0.5 * (torch.exp(-self.log_vars[0]) * sa + self.log_vars[0] + torch.exp(-self.log_vars[1]) * aux
                       + self.log_vars[1])
        return total, {"sa": sa, "aux": aux}


def test_keys_map_user_names_and_the_uncertainty_weights_are_read(tmp_path):
    model, crit = vit(), SeedLikeLoss()
    opt = torch.optim.Adam(list(model.parameters()) + list(crit.parameters()), lr=1e-3, weight_decay=0.05)
    keys = {"w1": "w_sa", "w2": "w_glca", "sa": "loss_sa", "aux": "loss_glca"}
    with watch(model, opt, loss_fn=crit, out_dir=tmp_path, keys=keys):
        for i in range(2):
            x, y = batch(i)
            total, _ = crit(model(x), y)
            total.backward()
            opt.step()
            opt.zero_grad()
    rec = read(tmp_path)[1]
    assert {"loss", "loss_sa", "loss_glca", "w_sa", "w_glca"} <= set(rec)
    assert rec["w_sa"] == pytest.approx(crit.log_vars[0].item()) and rec["w_sa"] != 0.0
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["train"]["optimizer"] == "adam_l2" and cfg["train"]["weight_decay"] == 0.05  # the seed's coupled L2
    with pytest.raises(KeyError, match=r"\['w_1'\] match no name.*'w1'"), \
            watch(model, opt, loss_fn=crit, keys={"w_1": "w_sa"}):
        for i in range(2):
            crit(model(batch(i)[0]), batch(i)[1])[0].backward()
            opt.step()
            opt.zero_grad()


def test_dcal_with_uncertainty_loss_gets_the_branch_names(tmp_path):
    torch.manual_seed(0)
    model = dcal.build_model("vit_tiny_patch16_224", num_classes=CLASSES, img_size=IMG, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3)
    crit = dcal.UncertaintyLoss(3)
    opt = torch.optim.AdamW(dcal.param_groups(model, crit), lr=1e-3)
    with watch(model, opt, loss_fn=crit, out_dir=tmp_path):
        x, y = batch(0)
        out = model(x)
        crit([F.cross_entropy(z, y) for z in (out.sa_logits, out.glca_logits, out.pwca_logits)]).backward()
        opt.step()
    rec = read(tmp_path)[0]
    assert {f"{k}_{b}" for k in ("loss", "w") for b in ("sa", "glca", "pwca")} <= set(rec)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["model"]["glca"] is True and cfg["train"]["uncertainty_bounds"] is None

    # The labels go to F.cross_entropy, not to the hooked criterion: set_batch hands them to the replay.
    def losses(out, y):
        return [F.cross_entropy(z, y) for z in (out.sa_logits, out.glca_logits, out.pwca_logits)]

    def replay(mb: MicroBatch):
        x, y = mb.batch
        crit(losses(model(x), y)).backward()

    model.glca.head = Armed(model.glca.head)
    model.glca.head.armed = True
    with pytest.raises(NonFiniteError) as ei, watch(model, opt, loss_fn=crit, replay=replay) as w:
        x, y = batch(1)
        out = model(x)
        w.set_batch((x, y))
        crit(losses(out, y)).backward()
        opt.step()
    assert (ei.value.module, ei.value.phase) == ("glca.head", "forward")


# ----------------------------------------------------------------------------- clean-up
def test_100_enter_exit_cycles_leave_no_hook_and_no_tensor():
    model, crit = vit(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = batch(0)

    def cycle():
        with watch(model, opt, loss_fn=crit, memory=True):
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)

    for _ in range(5):
        cycle()
    before, objs = live_tensors(), len(gc.get_objects())
    for _ in range(100):
        cycle()
    assert live_tensors() == before
    assert len(gc.get_objects()) - objs < 200
    assert hooks(model, crit, opt) == 0


def test_arguments_are_checked():
    model = vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="loss_fn must be an nn.Module"):
        watch(model, opt, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="mode must be one of"):
        watch(model, opt, mode="ignore")
    with pytest.raises(TypeError, match="GradScaler"):
        watch(model, opt, scaler=object())
    assert diagnostics.watch is watch

