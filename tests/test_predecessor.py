"""dcal_studies.predecessor: the predecessor's model runs its step as its code does (maps cleared at the end of
the training forward, kept after evaluation; bool dropout masks), and its prediction equals a CPU measurement."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dcal_studies.predecessor import (
    PREDECESSOR_OOM,
    VIT_B16,
    KeepsEvalMaps,
    PredecessorDCAL,
    PredecessorLoss,
    predecessor_case,
    predecessor_optimizer,
)
from diagnostics.memory import measure_step_memory, predict_step_memory

IMG = 32
SMALL = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=192, dropout=0.1, top_k_ratio=0.1)
N = (IMG // 8) ** 2 + 1
BLOCK = 512  # the CUDA allocator's smallest block; a process's first prediction may count one more
FACTS = Path(__file__).resolve().parents[1] / "notebooks" / "seed_evidence" / "facts.yaml"


def small(cls=PredecessorDCAL, **kw) -> PredecessorDCAL:
    torch.manual_seed(0)
    return cls(IMG, 5, **{**SMALL, **kw})


def predict(model, batch=2, eval_batch=2, **kw):
    x = (batch, 3, IMG, IMG)
    kw = {"amp_dtype": torch.float16, "target": "cuda", **kw}
    return predict_step_memory(model, (x, x), loss_fn=PredecessorLoss(), optimizer=predecessor_optimizer,
                               eval_inputs=((eval_batch, 3, IMG, IMG),), **kw)


def test_parameter_count_is_the_logs():
    with torch.device("meta"):
        model = PredecessorDCAL(448, 200, **VIT_B16)
    n = sum(p.numel() for p in model.parameters())
    assert n == 93_645_715
    assert round(n / 1e6, 2) == yaml.safe_load(FACTS.read_text())["run"]["parameters_millions"]


def test_maps_kept_in_eval_and_cleared_by_the_training_forward():
    model = small()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        out = model.eval()(x)
    assert set(out) == {"sa_logits", "glca_logits"}
    maps = model.attention_maps["sa_attention"]
    assert len(maps) == SMALL["depth"] and maps[0].shape == (2, SMALL["num_heads"], N, N)
    out = model.train()(x, x.flip(0))
    assert set(out) == {"sa_logits", "glca_logits", "pwca_logits"} and model.attention_maps == {}


def test_dropout_keeps_a_bool_mask_and_is_off_in_eval():
    model = small()
    x = torch.randn(2, 3, IMG, IMG, requires_grad=True)
    sa = model.blocks[0].attn
    a = sa.attn_drop(torch.ones(2, 3, N, N))
    assert ((a == 0) | torch.isclose(a, torch.tensor(1 / 0.9))).all() and (a == 0).any()
    assert torch.equal(sa.attn_drop.eval()(x), x)
    with pytest.raises(ValueError, match="dropout"):
        small(dropout=1.0)


def test_prediction_equals_the_cpu_measurement():
    x = torch.randn(2, 3, IMG, IMG)
    kw = dict(loss_fn=PredecessorLoss(), optimizer=predecessor_optimizer, eval_inputs=(x[:1],))
    measured = measure_step_memory(small(), (x, x.flip(0)), **kw)
    with torch.device("meta"):
        meta = small()
    predicted = predict_step_memory(meta, ((2, 3, IMG, IMG), (2, 3, IMG, IMG)), target="cpu",
                                    **{**kw, "eval_inputs": ((1, 3, IMG, IMG),)})
    for name in ("peak_bytes", "eval_peak_bytes", "train_after_eval_peak_bytes"):
        assert getattr(predicted, name) == pytest.approx(getattr(measured, name), rel=0.02), name


def test_the_evaluations_maps_live_through_the_next_forward_only():
    p = predict(small(), eval_batch=2)
    maps = SMALL["depth"] * 2 * SMALL["num_heads"] * N * N * 4  # the last evaluation batch's fp32 SA maps
    maps = -(-maps // BLOCK) * BLOCK
    fwd = p.train_after_eval["forward"].peak_bytes - p.train["forward"].peak_bytes
    bwd = p.train_after_eval["backward"].peak_bytes - p.train["backward"].peak_bytes
    assert abs(fwd - maps) <= BLOCK * SMALL["depth"] and abs(bwd) <= BLOCK
    # The control: a model that keeps them through training carries them into the backward.
    q = predict(small(KeepsEvalMaps), eval_batch=2)
    assert q.train_after_eval["backward"].peak_bytes - q.train["backward"].peak_bytes >= maps - BLOCK


def test_dropout_masks_are_in_the_prediction():
    with_dropout = predict(small(), eval_batch=1)
    without = predict(small(dropout=0.0), eval_batch=1)
    B, H, C, hidden, L = 2, SMALL["num_heads"], SMALL["embed_dim"], SMALL["mlp_dim"], SMALL["depth"]
    masks = L * B * H * N * (N + N + 2 * N) + L * 3 * B * N * (hidden + 2 * C)  # 1 byte each, lower bound
    assert with_dropout.train["forward"].peak_bytes - without.train["forward"].peak_bytes >= masks


def test_case_returns_the_log_and_the_setting():
    r = predecessor_case(batch_size=2, img_size=IMG, num_classes=5, arch=SMALL)
    assert r["log"] == PREDECESSOR_OOM and r["log"]["requested_bytes"] == 226 * 2 ** 20
    assert r["parameters"] == sum(p.numel() for p in small().parameters())
    assert r["predecessor"].train_after_eval_peak_bytes > r["predecessor"].peak_bytes > 0
