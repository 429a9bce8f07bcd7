"""NaN/Inf detection: tier-1 checks, the tier-2 detector naming the first module, and the trainer callback."""
from __future__ import annotations

import gc
import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcal
from dcal.callbacks import Callback
from diagnostics.nonfinite import NonFiniteCallback, NonFiniteDetector, NonFiniteError, finite_checks

IMG = 32


def tiny_model(**kw) -> dcal.DCAL:
    torch.manual_seed(0)
    return dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=IMG, patch_size=8, embed_dim=48,
                            depth=2, num_heads=3, **kw)


class Armed(nn.Module):
    """Wraps a module; when armed, multiplies its output by +inf (a forward overflow at a known place)."""

    def __init__(self, inner: nn.Module, once: bool = False):
        super().__init__()
        self.inner, self.armed, self.once = inner, False, once

    def forward(self, x):
        y = self.inner(x)
        if self.armed:
            self.armed = not self.once
            return y * float("inf")
        return y


class NaNGrad(torch.autograd.Function):
    """Identity in forward; NaN gradient in backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class BadBackward(nn.Module):
    """Wraps a module; when armed, its backward returns NaN w.r.t. its input (a backward blow-up)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.armed = inner, False

    def forward(self, x):
        return self.inner(NaNGrad.apply(x) if self.armed else x)


def dcal_loss(out: dcal.DCALOutput, y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(z, y) for z in (out.sa_logits, out.glca_logits, out.pwca_logits))


def batch(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, 5, (n,), generator=g)


def hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        n += sum(len(p._backward_hooks or {}) for p in m.parameters(recurse=False))
    return n


# ----------------------------------------------------------------------------- tier 1
def test_finite_checks_names_the_term():
    ok = {"loss": torch.tensor(1.0), "loss_sa": torch.tensor(0.5), "w": torch.zeros(3), "grad_norm": 2.0, "x": None}
    assert finite_checks(ok) == []
    bad = {**ok, "loss_glca": torch.tensor(float("nan")), "w": torch.tensor([0.0, float("inf"), 0.0]),
           "grad_norm": float("inf"), "half": torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16)}
    assert set(finite_checks(bad)) == {"loss_glca", "w[1]", "grad_norm", "half[1]"}


def test_finite_checks_syncs_once_when_healthy(monkeypatch):
    calls = []
    orig = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: calls.append(1) or orig(self))
    finite_checks({"loss": torch.tensor(1.0), "loss_sa": torch.tensor(2.0), "w": torch.zeros(3),
                   "grad_norm": torch.tensor(3.0)})
    assert len(calls) == 1


# ----------------------------------------------------------------------------- tier 2: forward
def test_forward_inf_names_the_module_and_its_input():
    model = tiny_model()
    model.backbone.blocks[1].mlp.fc1 = Armed(model.backbone.blocks[1].mlp.fc1)
    model.backbone.blocks[1].mlp.fc1.armed = True
    x, _ = batch()
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(model, step=7):
        model(x)
    e = ei.value
    assert (e.module, e.phase, e.step) == ("backbone.blocks.1.mlp.fc1", "forward", 7)
    assert "+inf" in e.detail and "input[0]" in e.detail and "all finite" in e.detail  # input was fine
    assert "backbone.blocks.1.mlp.fc1" in str(e) and "step 7" in str(e)
    assert hook_count(model) == 0


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_forward_structured_outputs_name_the_element(kind):
    class Two(nn.Module):
        def forward(self, x):
            a, b = x * 2, x / 0.0
            return (a, b) if kind == "tuple" else {"a": a, "b": b}

    net = nn.Sequential(nn.Linear(4, 4))
    net.add_module("two", Two())
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(net):
        net(torch.ones(2, 4))
    assert ei.value.module == "two"
    assert ("output[1]" if kind == "tuple" else "output['b']") in ei.value.detail


def test_non_finite_input_is_blamed_on_code_before_the_module():
    model = tiny_model()
    x, _ = batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(model):
        model(x)
    assert ei.value.module == "backbone.patch_embed.proj"
    assert "input was already non-finite" in ei.value.detail


# ----------------------------------------------------------------------------- tier 2: backward
def test_backward_nan_names_the_module():
    model = tiny_model()
    mlp = model.backbone.blocks[0].mlp
    mlp.fc2 = BadBackward(mlp.fc2)
    mlp.fc2.armed = True
    x, y = batch()
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(model, step=3):
        dcal_loss(model(x), y).backward()  # the error propagates out of backward() unchanged
    e = ei.value
    assert (e.module, e.phase, e.step) == ("backbone.blocks.0.mlp.fc2", "backward", 3)
    assert "grad_input" in e.detail and "nan" in e.detail
    assert hook_count(model) == 0


def test_parameter_gradient_names_its_module():
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ NaNGrad.apply(self.weight)  # only the weight's gradient goes bad

    net = nn.Sequential(nn.Linear(4, 4), Lin(), nn.Linear(4, 1))
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(net):
        net(torch.randn(3, 4)).sum().backward()
    assert (ei.value.module, ei.value.phase) == ("1", "backward")
    assert "parameter 'weight'" in ei.value.detail


def test_functional_nan_after_the_last_module_is_reported_at_end_of_backward():
    model = tiny_model()
    x, _ = batch()
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(model):
        out = model(x)
        (out.sa_logits - out.sa_logits.detach()).sqrt().sum().backward()  # d sqrt(0) = inf, in no module
    assert (ei.value.module, ei.value.phase) == ("backbone.head", "backward")
    assert "made by functional code" in ei.value.detail


def test_gradient_checkpointing_reports_once():
    model = tiny_model(grad_checkpointing=True)
    x, y = batch()
    with NonFiniteDetector(model) as det:  # healthy: the recompute inside backward is not checked again
        dcal_loss(model(x), y).backward()
    assert det._calls["backbone.blocks.0.mlp.fc1"] == 2  # SA + PWCA, not 4 (recompute skipped)
    mlp = model.backbone.blocks[1].mlp
    mlp.fc2 = BadBackward(mlp.fc2)
    mlp.fc2.armed = True
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(model):
        dcal_loss(model(x), y).backward()
    assert (ei.value.module, ei.value.phase) == ("backbone.blocks.1.mlp.fc2", "backward")
    mlp.fc2.armed = False
    mlp.fc1 = Armed(mlp.fc1)
    mlp.fc1.armed = True
    with pytest.raises(NonFiniteError) as ei, NonFiniteDetector(model):
        dcal_loss(model(x), y).backward()
    assert (ei.value.module, ei.value.phase, ei.value.detail.count("call 1")) == ("backbone.blocks.1.mlp.fc1", "forward", 1)
    assert hook_count(model) == 0


def test_healthy_model_is_unchanged_by_the_detector():
    x, y = batch()

    def run(detect: bool):
        model = tiny_model()
        torch.manual_seed(5)
        if detect:
            with NonFiniteDetector(model, extra={"loss_fn": nn.Identity()}):
                out = model(x)
                dcal_loss(out, y).backward()
        else:
            out = model(x)
            dcal_loss(out, y).backward()
        return out, [p.grad for p in model.parameters()]

    (o1, g1), (o2, g2) = run(False), run(True)
    for a, b in zip((o1.sa_logits, o1.glca_logits, o1.pwca_logits), (o2.sa_logits, o2.glca_logits, o2.pwca_logits)):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_hooks_released_and_no_growth_over_100_uses():
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    x = torch.randn(4, 8)

    def use(i):
        bad = i % 10 == 0  # every 10th use raises on purpose: the exception path must clean up too
        with pytest.raises(NonFiniteError) if bad else nullcontext(), NonFiniteDetector(net, step=i):
            net(x * (float("inf") if bad else 1.0)).sum().backward()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)

    for i in range(10):
        use(i)
    before, objs = live_tensors(), len(gc.get_objects())
    for i in range(100):
        use(i)
    assert live_tensors() == before
    assert len(gc.get_objects()) - objs < 200
    assert hook_count(net) == 0


def test_exceptions_are_not_swallowed():
    net = nn.Linear(2, 2)
    with pytest.raises(KeyError), NonFiniteDetector(net):
        raise KeyError("mine")
    assert hook_count(net) == 0


# ----------------------------------------------------------------------------- callback with a fake trainer
class FakeTrainer:
    """The `dcal.callbacks` contract, in the order dcal.train.Trainer announces events."""

    def __init__(self, model, callbacks, accum=1):
        self.model, self.loss_fn = model, dcal.UncertaintyLoss(3)
        self.optimizer = torch.optim.AdamW(dcal.param_groups(model, self.loss_fn), lr=1e-3)
        self.callbacks = sorted(callbacks, key=lambda c: c.order)
        self.accum, self.step, self.logs, self.history = accum, 0, [], []
        self.skip_step, self.record, self.grad_norm = False, {}, None
        self.device = torch.device("cpu")

    def emit(self, event):
        for cb in self.callbacks:
            getattr(cb, event)(self)

    def log(self, message):
        self.logs.append(message)

    def compute_loss(self, b):
        out = self.model(b["image"])
        branch = {k: F.cross_entropy(getattr(out, f"{k}_logits"), b["label"]) for k in ("sa", "glca", "pwca")}
        return self.loss_fn(list(branch.values())), branch, out

    def replay(self, b, state):
        saved = torch.get_rng_state()
        torch.set_rng_state(state)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            total, _, _ = self.compute_loss(b)
            total.backward()
        finally:
            torch.set_rng_state(saved)

    def train_step(self, seed=0):
        for i in range(self.accum):
            x, y = batch(4, seed * 10 + i)
            self.micro_step, self.batch, self.batch_rng_state = i, {"image": x, "label": y}, torch.get_rng_state()
            self.emit("before_batch")
            total, branch, out = self.compute_loss(self.batch)
            self.outputs, self.loss, self.branch_losses = out, total, branch
            self.emit("after_forward")
            self.emit("after_loss")
            (total / self.accum).backward()
            self.emit("after_backward")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        self.skip_step = False
        self.emit("before_step")
        if not self.skip_step:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.record = {"kind": "step", "step": self.step, "loss": float(total.detach())}
        if self.skip_step:
            self.record["skipped"] = True
        self.emit("after_step")
        self.history.append(self.record)


def test_callback_raise_names_the_module_from_the_replay():
    model = tiny_model()
    model.backbone.blocks[1].mlp.fc1 = Armed(model.backbone.blocks[1].mlp.fc1)
    tr = FakeTrainer(model, [NonFiniteCallback("raise")], accum=2)
    tr.train_step(0)
    model.backbone.blocks[1].mlp.fc1.armed = True
    with pytest.raises(NonFiniteError) as ei:
        tr.train_step(1)
    e = ei.value
    assert (e.module, e.phase, e.step) == ("backbone.blocks.1.mlp.fc1", "forward", 2)
    assert "micro-batch 0" in e.detail
    assert hook_count(model) == 0 and hook_count(tr.loss_fn) == 0


def test_callback_warn_skips_the_step_and_marks_the_record():
    model = tiny_model()
    mlp = model.backbone.blocks[0].mlp
    mlp.fc2 = BadBackward(mlp.fc2)
    cb = NonFiniteCallback("warn")
    tr = FakeTrainer(model, [cb])
    tr.train_step(0)
    assert "nonfinite" not in tr.record
    mlp.fc2.armed = True
    before = [p.detach().clone() for p in model.parameters()]
    tr.train_step(1)
    assert tr.skip_step and tr.record.get("skipped")
    assert tr.record["nonfinite"] == "backbone.blocks.0.mlp.fc2 (backward)"
    assert any("backbone.blocks.0.mlp.fc2" in m for m in tr.logs)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no optimiser step
    mlp.fc2.armed = False
    tr.train_step(2)
    assert "nonfinite" not in tr.record and not tr.skip_step


def test_callback_not_reproduced_names_the_tier1_term():
    model = tiny_model()
    model.backbone.blocks[1].mlp.fc1 = Armed(model.backbone.blocks[1].mlp.fc1, once=True)  # gone on replay
    model.backbone.blocks[1].mlp.fc1.armed = True
    tr = FakeTrainer(model, [NonFiniteCallback("raise")])
    with pytest.raises(NonFiniteError) as ei:
        tr.train_step(0)
    assert ei.value.module == "loss_sa" and "not reproduced on replay" in ei.value.detail


def test_callback_healthy_run_and_replay_off():
    class Count(Callback):
        n = 0

        def after_forward(self, trainer):
            Count.n += 1

    model = tiny_model()
    tr = FakeTrainer(model, [NonFiniteCallback("raise", replay=False), Count()])
    for s in range(2):
        tr.train_step(s)
    assert Count.n == 2 and all("nonfinite" not in r for r in tr.history)
    model.backbone.blocks[1].mlp.fc1 = Armed(model.backbone.blocks[1].mlp.fc1)
    model.backbone.blocks[1].mlp.fc1.armed = True
    with pytest.raises(NonFiniteError, match="replay off") as ei:
        tr.train_step(2)
    assert ei.value.module == "loss_sa"


def test_error_pickles():
    import pickle
    e = pickle.loads(pickle.dumps(NonFiniteError("a.b", "forward", 3, "d")))
    assert (e.module, e.phase, e.step, e.detail) == ("a.b", "forward", 3, "d")
    with pytest.raises(ValueError):
        NonFiniteError("a", "sideways")


def test_locate_names_the_origin_when_the_model_raised_first():
    model = tiny_model()
    model.backbone.blocks[0].mlp.fc2 = Armed(model.backbone.blocks[0].mlp.fc2)
    model.backbone.blocks[0].mlp.fc2.armed = True
    cb = NonFiniteCallback()
    tr = FakeTrainer(model, [cb])
    with pytest.raises(dcal.RolloutError, match="backbone.blocks.1"):  # the symptom, one block later
        tr.train_step(0)
    e = cb.locate(tr, step=1)
    assert (e.module, e.phase, e.step) == ("backbone.blocks.0.mlp.fc2", "forward", 1)


# ----------------------------------------------------------------------------- one hierarchy, and AMP
def test_the_trainers_type_catches_the_detectors_error():
    with pytest.raises(dcal.NonFiniteLossError):
        raise NonFiniteError("a.b", "forward", 1, "d")
    assert issubclass(NonFiniteError, FloatingPointError)


def test_detector_with_a_scaler_keeps_backward_overflows_and_raises_on_forward():
    from diagnostics.nonfinite import NonFiniteDetector

    model = tiny_model()
    mlp = model.backbone.blocks[0].mlp
    mlp.fc2 = BadBackward(mlp.fc2)
    mlp.fc2.armed = True
    x, y = batch()
    scaler = torch.amp.GradScaler("cpu")
    with NonFiniteDetector(model, scaler=scaler) as det:  # scaled gradients: the scaler skips this step
        dcal_loss(model(x), y).backward()
    assert det.finding is None and det.overflow.module == "backbone.blocks.0.mlp.fc2"
    mlp.fc2.armed = False
    model.backbone.blocks[1].mlp.fc1 = Armed(model.backbone.blocks[1].mlp.fc1)
    model.backbone.blocks[1].mlp.fc1.armed = True
    with pytest.raises(NonFiniteError, match="blocks.1.mlp.fc1"), NonFiniteDetector(model, scaler=scaler):
        model(x)  # a forward value is never scaled: a fault with or without a scaler
    with pytest.raises(TypeError, match="GradScaler"):
        NonFiniteDetector(model, scaler=object())


def test_guard_counts_overflows_and_calls_a_long_run_of_them_a_fault():
    from diagnostics.nonfinite import MAX_OVERFLOWS_IN_A_ROW, FiniteGuard

    model = tiny_model()
    guard = FiniteGuard(model, scaler=torch.amp.GradScaler("cpu"))
    ok, inf = {"loss": torch.tensor(1.0)}, torch.tensor(float("inf"))
    for i in range(MAX_OVERFLOWS_IN_A_ROW - 1):
        guard.begin_step()
        guard.add_micro(ok)
        res = guard.check(i + 1, {"grad_norm": inf})
        assert res.overflow and res.error is None
    guard.begin_step()
    guard.add_micro(ok)
    res = guard.check(MAX_OVERFLOWS_IN_A_ROW, {"grad_norm": inf})
    assert not res.overflow and res.error.module == "grad_norm" and "overflows in a row" in res.error.detail
    guard.begin_step()
    guard.add_micro({"loss": torch.tensor(float("nan"))})  # a non-finite loss is never an overflow
    assert guard.check(1, {"grad_norm": inf}).error.module == "loss"
    guard.begin_step()
    guard.add_micro(ok)
    assert guard.check(1, scaler_skipped=True).overflow  # the scaler skipped it, the loss was fine
    guard.begin_step()
    guard.add_micro(ok)
    assert guard.check(1, {"grad_norm": inf}, scaler_skipped=False).error is not None  # the step ran anyway


def test_callback_under_an_enabled_scaler_marks_an_overflow_as_skipped():
    class ScaledTrainer(FakeTrainer):
        scaler = torch.amp.GradScaler("cpu")

    model = tiny_model()
    cb = NonFiniteCallback("raise")
    tr = ScaledTrainer(model, [cb])
    tr.train_step(0)
    mlp = model.backbone.blocks[0].mlp
    mlp.fc2 = BadBackward(mlp.fc2)
    mlp.fc2.armed = True  # the gradient overflows, the loss is finite: what the scaler skips
    tr.train_step(1)
    assert tr.record["skipped"] and tr.record["skip_reason"] == "amp-overflow" and not cb.findings


def test_a_training_run_whose_scaler_overflows_skips_those_steps(tmp_path):
    """The trainer with an fp16-style GradScaler: steps whose scaled gradients overflow are skipped by the
    scaler (its scale halves), recorded as such, and neither the trainer nor the callback stops the run."""
    from dcal.config import apply_overrides, preset
    from dcal.train import build_trainer
    from diagnostics.doctor import diagnose

    cfg = apply_overrides(preset("demo"), [
        "model.pretrained=false", "model.timm_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
        "data.img_size=32", "data.resize_size=32", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic={num_classes: 3, train_per_class: 16, test_per_class: 8, part_size: 10, mark_grid: 1, seed: 0}",
        "train.batch_size=8", "train.epochs=1", "train.warmup_epochs=0", "train.progress=false"])
    tr = build_trainer(cfg, tmp_path / "run", callbacks=[NonFiniteCallback()])
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # fp32 gradients × 2^127 overflow at first
    tr.fit()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    skipped = [r["step"] for r in steps if r.get("skip_reason") == "amp-overflow"]
    assert skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) < len(steps)
    assert tr.scaler.get_scale() == 2.0 ** (127 - len(skipped))
    assert all(f.code != "nonfinite" for f in diagnose(tmp_path / "run"))
