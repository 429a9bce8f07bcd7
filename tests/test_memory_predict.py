"""predict_step_memory: the peak predicted on meta tensors equals the peak measured on real CPU tensors."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn

import dcal
import dcal_app.cli
import diagnostics
from dcal.config import PRESETS
from diagnostics.memory import MemoryProfiler, MetaUnsupportedError, attention_memory, measure_step_memory
from diagnostics.memory import predict_step_memory as predict

IMG = 32
SMALL = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)
TOLERANCE = 0.02  # the issue's bar: prediction within 2 % of the measured peak


def tiny_dcal(**kw) -> dcal.DCAL:
    torch.manual_seed(0)
    return dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=IMG, patch_size=8, embed_dim=48,
                            depth=2, num_heads=3, **kw)


def mlp(d: int = 64, h: int = 256, c: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))


def close(pred: int, meas: int) -> bool:
    return abs(pred - meas) <= TOLERANCE * meas


@pytest.mark.parametrize("kind, amp, batch", [
    ("dcal", None, 4), ("dcal", torch.bfloat16, 8), ("sa_only", None, 8), ("sa_only", torch.bfloat16, 2),
    ("mlp", None, 16), ("mlp", torch.bfloat16, 64),
])
def test_prediction_equals_measurement_on_cpu(kind, amp, batch):
    make = {"dcal": tiny_dcal, "sa_only": lambda: tiny_dcal(glca=False, pwca=False), "mlp": mlp}[kind]
    x = torch.randn(batch, 64) if kind == "mlp" else torch.randn(batch, 3, IMG, IMG)
    p = predict(make(), x, amp_dtype=amp, target="cpu", eval_inputs=x)
    m = measure_step_memory(make(), x, amp_dtype=amp, eval_inputs=x)
    for phase in ("forward", "backward", "optimizer"):
        assert close(p.train[phase].peak_bytes, m.train[phase].peak_bytes), (phase, p.train, m.train)
    assert close(p.peak_bytes, m.peak_bytes) and close(p.eval_peak_bytes, m.eval_peak_bytes)
    assert close(p.train_after_eval_peak_bytes, m.train_after_eval_peak_bytes)
    assert p.train[p.peak_phase].composition == m.train[m.peak_phase].composition


def test_prediction_equals_an_independent_profiler_loop():
    """The reference is a plain loop measured by MemoryProfiler, not the predictor's own step code."""
    x = torch.randn(32, 64)
    pred = predict(mlp(), x, target="cpu")
    net = mlp()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    with MemoryProfiler("cpu", baseline=[net, opt, x]) as prof:
        for _ in range(2):
            with prof.step():
                with prof.phase("forward"):
                    loss = nn.functional.cross_entropy(net(x), torch.randint(0, 10, (32,)))
                with prof.phase("backward"):
                    loss.backward()
                    del loss
                with prof.phase("optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
    measured = max(r["mem_peak_mb"] for r in prof.history) * 1e6
    assert abs(pred.peak_bytes - measured) <= TOLERANCE * measured


def test_timm_vit_user_model_built_on_meta():
    kw = dict(img_size=IMG, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    with torch.device("meta"):
        meta_model = timm.create_model("vit_tiny_patch16_224", **kw)
    p = predict(meta_model, (4, 3, IMG, IMG), target="cpu", amp_dtype=torch.bfloat16)
    m = measure_step_memory(timm.create_model("vit_tiny_patch16_224", **kw), torch.randn(4, 3, IMG, IMG),
                            amp_dtype=torch.bfloat16)
    assert close(p.peak_bytes, m.peak_bytes)
    assert all(t.device.type == "meta" for t in meta_model.parameters())  # the user's model is untouched


def test_composition_matches_the_arithmetic_of_an_mlp():
    B, D, H, C = 8, 64, 256, 10
    p = predict(mlp(D, H, C), (B, D), target="cpu")
    n_params = D * H + H + H * C + C
    fwd = p.train["forward"].composition
    assert fwd["parameters"] == 4 * n_params and fwd["inputs"] == 4 * B * D
    assert fwd["optimizer_state"] == 2 * 4 * n_params  # exp_avg, exp_avg_sq (step counters: made outside ops)
    assert fwd["activations"] == 4 * B * H  # ReLU's output, saved by ReLU and by the second Linear
    assert p.train["backward"].composition["gradients"] > 0 and p.train["optimizer"].composition["gradients"] > 0


def test_peaks_grow_with_batch_and_image_size_as_the_arithmetic_says():
    preds = {b: predict(tiny_dcal(glca=False, pwca=False), (b, 3, IMG, IMG), target="cpu") for b in (2, 4, 8)}
    fwd = {b: p.train["forward"] for b, p in preds.items()}
    # Everything a step allocates per image scales with the batch: the forward peak is affine in B, and the
    # activations kept for backward are proportional to it. (The step's overall peak moves from the
    # optimiser phase at B=2 to backward at B=4, so it is only monotone.)
    assert preds[2].peak_bytes < preds[4].peak_bytes < preds[8].peak_bytes
    assert fwd[8].peak_bytes - fwd[4].peak_bytes == 2 * (fwd[4].peak_bytes - fwd[2].peak_bytes)
    assert fwd[8].composition["activations"] == 4 * fwd[2].composition["activations"] > 0
    # Eager attention maps: a timm ViT on its eager path keeps exactly what attention_memory counts (the
    # softmax output, saved for backward), at two image sizes.
    for img in (32, 64):
        p = predict(eager_vit(img), (2, 3, img, img), target="cpu")
        est = attention_memory({"num_heads": 3, "depth": 2, "patch_size": 8}, img, 2)
        assert p.train["forward"].composition["attention_maps"] == pytest.approx(est.loc["sa", "mb"] * 1e6, rel=1e-6)


def eager_vit(img: int = IMG) -> nn.Module:
    """A small timm ViT whose attention runs eagerly (softmax maps kept for backward), 5 classes."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=img, num_classes=5, **SMALL)
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    return vit


def test_cuda_target_rounds_blocks_and_keeps_autocast_softmax_in_fp32():
    x = (2, 3, IMG, IMG)
    cpu = predict(eager_vit(), x, target="cpu", amp_dtype=torch.float16)
    cuda = predict(eager_vit(), x, target="cuda", amp_dtype=torch.float16)
    maps_cpu = cpu.train["forward"].composition["attention_maps"]
    maps_cuda = cuda.train["forward"].composition["attention_maps"]
    assert maps_cuda >= 2 * maps_cpu > 0  # fp32 softmax (CUDA autocast) vs fp16 (CPU autocast), plus rounding
    assert all(v % 512 == 0 for v in cuda.train["forward"].composition.values())
    assert cuda.peak_bytes > cpu.peak_bytes


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        h = self.inner(x)
        if h.sum() > 0:  # a Python branch on a value: not decidable from shapes
            h = h * 2
        return h


class Gather(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x)[torch.nonzero(x[:, 0] > 0)[:, 0]]  # value-dependent shape


def test_ops_that_cannot_run_on_meta_are_named():
    with pytest.raises(MetaUnsupportedError, match=r"Python branch.*in module 'Branchy'"):
        predict(Branchy(), (3, 4), loss_fn=lambda h: h.sum())
    with pytest.raises(MetaUnsupportedError, match=r"nonzero.*module 'Gather'.*forward"):
        predict(Gather(), (3, 4), loss_fn=lambda h: h.sum())
    with pytest.raises(TypeError, match="default loss"):
        predict(nn.Linear(4, 4), (3, 2, 4))
    with pytest.raises(ValueError, match="target"):
        predict(mlp(), (2, 64), target="tpu")


def test_reads_of_values_are_listed():
    p = predict(tiny_dcal(), (2, 3, IMG, IMG), target="cpu")
    assert any("any()" in r for r in p.data_reads) and any("all()" in r for r in p.data_reads)


def test_exported_from_diagnostics():
    assert diagnostics.predict_step_memory is predict
    assert diagnostics.attention_memory is attention_memory


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dcal_memory_answers_for_every_preset(name, capsys):
    assert dcal_app.cli.main(["memory", "--preset", name, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["peak_bytes"] > 0 and res["fits"] is None
    assert res["eval_peak_bytes"] > 0 and res["train_after_eval_peak_bytes"] >= res["peak_bytes"]


def test_dcal_memory_fit_and_largest_batch(capsys):
    assert dcal_app.cli.main(["memory", "--preset", "demo", "--json", "--gpu-memory", "0.5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fits"] is False and res["largest_batch"] is None  # 0.5 GiB is all context
    assert dcal_app.cli.main(["memory", "--preset", "demo", "--json", "--gpu-memory", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fits"] is True and res["largest_batch"] > res["batch_size"]
    assert dcal_app.cli.main(["memory", "--preset", "demo", "--gpu-memory", "-1"]) == 2


def test_gpu_script_without_cuda_says_so_and_predicts(tmp_path, capsys, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder, not a package
    from benchmarks.gpu_memory import main as gpu_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert gpu_main(["--predict-only", "--models", "deit_tiny_patch16_224", "--sizes", "224", "--precisions",
                     "fp16", "--batches", "2", "--variants", "sa", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_memory.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["predicted_device"] > rows[0]["predicted"] > 0
    assert "| deit_tiny_patch16_224 | sa | 224 |" in capsys.readouterr().out


# ============================================================================ the user's own step (issue 19)
class PixelViT(nn.Module):
    """A model called the Hugging Face way: ``model(pixel_values=...)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, **SMALL)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values)


class DictViT(PixelViT):
    """A model that takes one dict batch: ``model({"image": ...})``."""

    def forward(self, batch: dict) -> torch.Tensor:
        return self.vit(batch["image"])


def user_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, **SMALL)


@pytest.mark.parametrize("form", ["snippet", "keyword", "dict_batch", "targets"])
def test_the_issue_snippet_and_its_forms_equal_the_measured_peak(form):
    import torch.nn.functional as F

    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    make, inputs, targets, loss = {
        "snippet": (user_vit, x, None, lambda out: F.cross_entropy(out, y)),  # a loss closing over real labels
        "keyword": (PixelViT, {"pixel_values": x}, None, lambda out: F.cross_entropy(out, y)),
        "dict_batch": (DictViT, ({"image": x},), None, lambda out: F.cross_entropy(out, y)),
        "targets": (user_vit, x, y, F.cross_entropy),  # loss_fn(output, *targets)
    }[form]
    p = predict(make(), inputs, targets, loss_fn=loss, target="cpu")
    m = measure_step_memory(make(), inputs, targets, loss_fn=loss)
    assert close(p.peak_bytes, m.peak_bytes), (p.peak_bytes, m.peak_bytes)
    for phase in ("forward", "backward", "optimizer"):
        assert close(p.train[phase].peak_bytes, m.train[phase].peak_bytes), phase
    assert p.train["forward"].composition["inputs"] == x.nbytes + (y.nbytes if targets is not None else 0)
    assert predict(make(), inputs, targets, loss_fn=loss).peak_bytes >= p.peak_bytes  # the CUDA target runs too


def test_real_tensors_read_as_constants_and_loud_errors():
    import torch.nn.functional as F

    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    weight = torch.rand(10)  # class weights captured by the loss: a constant
    p = predict(mlp(), x, loss_fn=lambda out: F.cross_entropy(out, y, weight=weight) * (y.max().item() + 1))
    assert any(f"-> {y.max().item()}" in r for r in p.data_reads)  # the real value, not a stand-in
    scale = torch.ones(10, requires_grad=True)  # a trainable tensor outside the model: its grad would be fake
    with pytest.raises(MetaUnsupportedError, match=r"real \(10,\) tensor that requires grad.*nn.Parameter"):
        predict(mlp(), x, loss_fn=lambda out: F.cross_entropy(out * scale, y))
    on_device = torch.zeros(4, dtype=torch.long, device="meta")  # stands for labels left on a GPU
    with pytest.raises(MetaUnsupportedError, match=r"real \(4,\) tensor on meta.*targets="):
        predict(mlp(), x, loss_fn=lambda out: F.cross_entropy(out, on_device))
    with pytest.raises(TypeError, match="keys must be str"):
        predict(mlp(), {0: x})
    with pytest.raises(MetaUnsupportedError, match=r"module 'Branchy\.inner'|module 'Branchy'"):
        predict(Branchy(), (3, 4), loss_fn=lambda h: h.sum())


def test_value_dependent_ops_on_real_labels_are_exact():
    import torch.nn.functional as F

    x, y = torch.randn(6, 64), torch.tensor([0, 1, 1, 3, 3, 3])
    def loss(out):  # class-balanced CE: the weights' shape depends on the labels' values
        w = 1.0 / torch.bincount(y, minlength=10).clamp(min=1).float()
        return F.cross_entropy(out, y, weight=w)
    p = predict(mlp(), x, loss_fn=loss, target="cpu")
    assert close(p.peak_bytes, measure_step_memory(mlp(), x, loss_fn=loss).peak_bytes)
