"""Invariants of the DCAL model core (DCAL_METHOD.md §1–§5, §8)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dcal
from dcal.flops import count_flops
from dcal.layers import attention_rollout, embed_tokens

TINY = dict(patch_size=8, embed_dim=48, depth=3, num_heads=3)


def tiny(glca=True, pwca=True, img_size=32, num_classes=5, **kw):
    torch.manual_seed(0)
    kw = {**TINY, "drop_path_rate": 0.0, **kw}
    return dcal.build_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=img_size,
                            glca=glca, pwca=pwca, **kw)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


# ----------------------------------------------------------------------------- SA parity
@pytest.mark.parametrize("name,img_size,extra", [
    ("deit_tiny_patch16_224", 64, {}),
    ("deit_tiny_patch16_224", 96, {}),
    ("vit_small_patch16_224", 48, dict(depth=2)),
    ("vit_base_patch16_224", 32, dict(depth=1)),
])
def test_sa_logits_equal_timm_forward(name, img_size, extra):
    torch.manual_seed(0)
    model = dcal.build_model(name, num_classes=7, img_size=img_size, **extra).eval()
    x = torch.randn(2, 3, img_size, img_size)
    out = model(x)
    torch.testing.assert_close(out.sa_logits, model.backbone(x), atol=1e-5, rtol=0)
    assert isinstance(model.backbone, timm.models.vision_transformer.VisionTransformer)


def test_backbone_state_dict_keys_are_timms():
    model = tiny()
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, **TINY)
    assert list(model.backbone.state_dict()) == list(ref.state_dict())
    assert all(k.startswith(("backbone.", "glca.")) for k in model.state_dict())


# ----------------------------------------------------------------------------- rollout
def naive_rollout(maps):
    """Full-matrix rollout, written independently: Ŝ = S̄_L ⋯ S̄_1."""
    B, N, _ = maps[0].shape
    eye = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    acc = eye
    bars = []
    for s in maps:
        sb = 0.5 * s.double() + 0.5 * eye
        sb = sb / sb.sum(-1, keepdim=True)
        bars.append(sb)
        acc = sb @ acc
    return acc, bars


def capture_maps(model, x):
    """Head-mean softmax maps of every SA block, computed from the timm modules directly."""
    maps = []
    h = embed_tokens(model.backbone, x)
    for blk in model.backbone.blocks:
        a = blk.attn
        y = blk.norm1(h)
        B, N, C = y.shape
        qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        maps.append(((q @ k.transpose(-2, -1)) * a.scale).softmax(-1).mean(1))
        h = blk(h)
    return maps


def test_rollout_matches_naive_full_matrix_product():
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    with torch.no_grad():
        maps = capture_maps(model, x)
    acc, bars = naive_rollout(maps)
    for sb in bars:
        torch.testing.assert_close(sb.sum(-1), torch.ones_like(sb.sum(-1)))
    expected = acc[:, 0, 1:].float()  # CLS row, CLS column dropped, not renormalised
    torch.testing.assert_close(out.rollout, expected, atol=1e-5, rtol=1e-4)
    assert out.rollout.sum(-1).lt(1).all()  # CLS column dropped, no renormalisation
    topk = out.rollout.topk(model.num_local, dim=1).indices
    assert torch.equal(out.local_index, topk)
    assert out.local_index.shape == (3, max(1, math.floor(0.1 * 16)))


def test_rollout_batch_elements_are_independent():
    model = tiny().eval()
    x = torch.randn(4, 3, 32, 32)
    full = model(x)
    for i in range(4):
        single = model(x[i:i + 1])
        torch.testing.assert_close(single.rollout[0], full.rollout[i], atol=1e-6, rtol=1e-5)


def test_rollout_chain_equals_full_product_on_random_stochastic_maps():
    g = torch.Generator().manual_seed(1)
    maps = [torch.rand(2, 9, 9, generator=g).softmax(-1) for _ in range(5)]
    acc, _ = naive_rollout(maps)
    torch.testing.assert_close(attention_rollout(maps), acc[:, 0].float(), atol=1e-6, rtol=1e-5)
    # The chain starts at e_0: of the last map it reads the CLS row alone, which may be all it is given.
    torch.testing.assert_close(attention_rollout(maps[:-1] + [maps[-1][:, :1]]), acc[:, 0].float(), atol=1e-6, rtol=1e-5)


def test_rollout_with_the_callers_row_sums_equals_without():
    """Row sums taken by the caller (as `DCAL.forward` takes them, per block) give the same chain; row sums
    that do not belong to the maps are an error, and a NaN in them is caught as in the maps."""
    g = torch.Generator().manual_seed(3)
    maps = [torch.rand(2, 9, 9, generator=g).softmax(-1) * 1.3 for _ in range(4)]  # rows summing to 1.3
    maps[-1] = maps[-1][:, :1]  # the last map's CLS row
    sums = [m.sum(-1) for m in maps]
    torch.testing.assert_close(attention_rollout(maps, row_sums=sums), attention_rollout(maps))
    with pytest.raises(dcal.RolloutError, match="row sums of shapes"):
        attention_rollout(maps, row_sums=sums[:-1] + [sums[0]])
    sums[1] = sums[1].clone()
    sums[1][0, 3] = float("nan")
    with pytest.raises(dcal.RolloutError, match="blocks.1: attention map holds non-finite"):
        attention_rollout(maps, [f"blocks.{i}" for i in range(4)], row_sums=sums)


@pytest.mark.parametrize("bad,match", [
    (lambda m: m[:2] + [None] + m[3:], "blocks.2: no attention map"),
    (lambda m: m[:1] + [m[1][:, :5, :5]] + m[2:], "blocks.1: attention map has shape"),
    (lambda m: m[:1] + [m[1][:, :1]] + m[2:], r"blocks.1: attention map has shape \(2, 1, 9\)"),  # CLS row: last only
    (lambda m: m[:3] + [m[3][:, :1, :5]], r"blocks.3: .*or its CLS row"),
    (lambda m: m[:3] + [m[3].masked_fill(torch.ones_like(m[3], dtype=torch.bool).triu(), float("nan"))], "blocks.3: attention map holds non-finite"),
])
def test_rollout_never_falls_back_it_raises_naming_the_block(bad, match):
    maps = [torch.rand(2, 9, 9).softmax(-1) for _ in range(4)]
    with pytest.raises(dcal.RolloutError, match=match) as e:
        attention_rollout(bad(maps), [f"blocks.{i}" for i in range(4)])
    assert e.value.nonfinite is ("non-finite" in match)  # a numerical fault vs a wiring bug


def test_rollout_ignores_autocast_and_runs_fp32():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x).rollout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.rollout.dtype == torch.float32
    assert torch.isfinite(out.rollout).all()
    assert (out.rollout - ref).abs().max() < 0.05  # bf16 q/k, fp32 softmax and chain


# ----------------------------------------------------------------------------- PWCA
def test_pwca_with_self_pairs_equals_sa():
    model = no_dropout(tiny()).train()
    x = torch.randn(4, 3, 32, 32)
    out = model(x, pair_index=torch.arange(4))
    torch.testing.assert_close(out.pwca_logits, out.sa_logits, atol=1e-5, rtol=0)


def test_pwca_with_real_pairs_differs_and_reuses_the_sa_pass():
    model = no_dropout(tiny()).train()
    x = torch.randn(4, 3, 32, 32)
    out = model(x, pair_index=torch.tensor([1, 0, 3, 2]))
    assert (out.pwca_logits - out.sa_logits).abs().max() > 1e-4
    # SA and GLCA do not depend on the pairing.
    out2 = model(x, pair_index=torch.tensor([2, 3, 0, 1]))
    torch.testing.assert_close(out.sa_logits, out2.sa_logits)
    torch.testing.assert_close(out.glca_logits, out2.glca_logits)


def test_pwca_gradient_reaches_image_two_unless_detached():
    for detach in (False, True):
        model = no_dropout(tiny(pwca_detach_kv=detach)).train()
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        out = model(x, pair_index=torch.tensor([1, 0]))
        out.pwca_logits[0].sum().backward()  # image 0's PWCA output only
        reaches_image_1 = x.grad[1].abs().sum() > 0
        assert bool(reaches_image_1) is (not detach)


def test_pwca_is_training_only_and_needs_pairs():
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    assert model.eval()(x).pwca_logits is None
    model.train()
    assert model(x).pwca_logits.shape == (3, 5)
    with pytest.raises(dcal.ConfigError, match="micro-batch has 1 image"):
        model(x[:1])
    with pytest.raises(dcal.ConfigError, match="pair_index"):
        model(x, pair_index=torch.tensor([0, 1]))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=2, max_value=64), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_derangement_has_no_fixed_point(n, seed):
    p = dcal.derangement(n, generator=torch.Generator().manual_seed(seed))
    assert sorted(p.tolist()) == list(range(n))
    assert not (p == torch.arange(n)).any()


def test_derangement_of_one_is_a_config_error():
    with pytest.raises(dcal.ConfigError):
        dcal.derangement(1)


# ----------------------------------------------------------------------------- GLCA
def test_glca_cost_deit_tiny_448_200_classes():
    model = dcal.build_model("deit_tiny_patch16_224", num_classes=200, img_size=448).eval()
    p_glca = sum(p.numel() for p in model.glca.parameters())
    p_bb = sum(p.numel() for p in model.backbone.parameters())
    assert 0.07 <= p_glca / p_bb <= 0.11, p_glca / p_bb  # paper: +9%
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ours = count_flops(lambda: model(x))
        timm_fwd = count_flops(lambda: model.backbone(x))
    assert model.num_local == 78
    ratio = ours["DCAL.glca"] / timm_fwd["Global"]
    assert 0 < ratio <= 0.04, ratio  # paper: +2%


def test_flop_count_is_the_same_per_head_and_in_one_pass():
    """The CPU per-head attention (in-place `baddbmm_`) counts the FLOPs of the one pass; the inference
    FLOP ratio stays at the rollout's small overhead over timm (DCAL_METHOD.md §10: ≈ 1.02)."""
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        per_head = count_flops(lambda: model(x))["Global"]
        model.attention_tiling = False
        one_pass = count_flops(lambda: model(x))["Global"]
        timm_fwd = count_flops(lambda: model.backbone(x))["Global"]
    assert per_head == one_pass
    assert per_head > timm_fwd


def glca_on(model, x, query_index):
    bb = model.backbone
    with torch.no_grad():
        h = bb.blocks(embed_tokens(bb, x))
        return model.glca(h, query_index)


def test_glca_queries_are_cls_plus_selected_tokens():
    model = tiny(pwca=False, glca_ratio=0.25, glca_pool="cls").eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.local_index.shape == (2, 4)
    cls = torch.zeros(2, 1, dtype=torch.long)
    qi = torch.cat([cls, out.local_index + 1], 1)
    torch.testing.assert_close(glca_on(model, x, qi), out.glca_logits)
    # With the head on GLCA's CLS output (DCAL_METHOD.md §3) the CLS query attends to every token, so the
    # logits do not depend on which local tokens were selected: only the CLS query reaches the head.
    other = torch.cat([cls, (out.local_index + 5) % 16 + 1], 1)
    torch.testing.assert_close(glca_on(model, x, other), out.glca_logits)
    torch.testing.assert_close(glca_on(model, x, cls), out.glca_logits)


def test_glca_pool_mean_makes_the_selection_matter():
    model = tiny(pwca=False, glca_ratio=0.25, glca_pool="mean").eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    cls = torch.zeros(2, 1, dtype=torch.long)
    qi = torch.cat([cls, out.local_index + 1], 1)
    torch.testing.assert_close(glca_on(model, x, qi), out.glca_logits)
    other = torch.cat([cls, (out.local_index + 5) % 16 + 1], 1)
    assert (glca_on(model, x, other) - out.glca_logits).abs().max() > 1e-4
    with pytest.raises(dcal.ConfigError, match="glca_pool"):
        tiny(glca_pool="max")


def test_glca_parallel_placement_uses_block_L_input_and_rollout_of_L_minus_1():
    model = tiny(pwca=False, glca_placement="parallel").eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    with torch.no_grad():
        maps = capture_maps(model, x)[:-1]
    acc, _ = naive_rollout(maps)
    torch.testing.assert_close(out.rollout, acc[:, 0, 1:].float(), atol=1e-5, rtol=1e-4)


def test_glca_init_copy_and_random():
    torch.manual_seed(0)
    copied = tiny(pwca=False, glca_init="copy")
    for (n, a), b in zip(copied.glca.block.state_dict().items(), copied.backbone.blocks[-1].state_dict().values()):
        assert torch.equal(a, b), n
    rand = tiny(pwca=False, glca_init="random")
    assert not torch.equal(rand.glca.block.attn.qkv.weight, rand.backbone.blocks[-1].attn.qkv.weight)
    # Copied, not shared: training GLCA must not move the SA block.
    assert copied.glca.block.attn.qkv.weight.data_ptr() != copied.backbone.blocks[-1].attn.qkv.weight.data_ptr()


# ----------------------------------------------------------------------------- switches
def test_switches_off_is_exactly_the_timm_model():
    model = tiny(glca=False, pwca=False).train()
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, **TINY)
    assert model.glca is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    ref.load_state_dict(model.backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval(), ref.eval()
    out = model(x)
    assert out.glca_logits is None and out.pwca_logits is None
    torch.testing.assert_close(out.sa_logits, ref(x), atol=1e-5, rtol=0)
    model.train()
    assert model(x).pwca_logits is None  # PWCA off in training too


def test_glca_off_removes_its_compute():
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on = count_flops(lambda: tiny(pwca=False).eval()(x))
        off = count_flops(lambda: tiny(glca=False, pwca=False).eval()(x))
    assert "DCAL.glca" in on and "DCAL.glca" not in off
    assert off["Global"] < on["Global"]


def test_predict_fuses_probabilities():
    model = tiny(pwca=False).eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    p = model.predict(x)
    torch.testing.assert_close(p, out.sa_logits.softmax(-1) + out.glca_logits.softmax(-1))
    torch.testing.assert_close(p.sum(-1), torch.full((3,), 2.0))
    sa_only = tiny(glca=False, pwca=False)
    torch.testing.assert_close(sa_only.predict(x), sa_only.eval()(x).sa_logits.softmax(-1))
    model.train()
    model.predict(x)
    assert model.training  # predict restores the mode


# ----------------------------------------------------------------------------- gradients and loss
def test_every_parameter_of_model_and_loss_gets_a_finite_gradient():
    model = tiny(drop_path_rate=0.1).train()
    loss_fn = dcal.UncertaintyLoss(3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(x)
    total = loss_fn([F.cross_entropy(t, y) for t in (out.sa_logits, out.glca_logits, out.pwca_logits)])
    total.backward()
    for name, p in [*model.named_parameters(), *loss_fn.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert (loss_fn.log_vars.grad != 0).all()


def test_branch_losses_are_the_fp32_cross_entropies_of_the_present_branches():
    from dcal.loss import branch_losses

    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = tiny().train()(x, pair_index=torch.tensor([1, 2, 3, 0]))
    expected = [F.cross_entropy(t, y) for t in (out.sa_logits, out.glca_logits, out.pwca_logits)]
    for got, want in zip(branch_losses(out, y), expected, strict=True):
        torch.testing.assert_close(got, want)
    glca, sa = branch_losses(out, y, ["glca", "sa"])  # in the order asked for
    torch.testing.assert_close(glca, expected[1])
    torch.testing.assert_close(sa, expected[0])
    half = dcal.DCALOutput(out.sa_logits.half(), None, None, out.rollout, out.local_index)
    (only_sa,) = branch_losses(half, y)  # eval/SA-only outputs: the present branch, computed in fp32
    assert only_sa.dtype == torch.float32
    with pytest.raises(ValueError, match="no pwca logits"):
        branch_losses(half, y, ["sa", "pwca"])
    with pytest.raises(ValueError, match="unknown branch"):
        branch_losses(out, y, ["sa", "gcla"])


def test_uncertainty_loss_formula():
    loss_fn = dcal.UncertaintyLoss(3)
    L = [torch.tensor(2.0), torch.tensor(0.5), torch.tensor(3.0)]
    torch.testing.assert_close(loss_fn(L), torch.tensor(0.5 * 5.5))  # w = 0: ½·ΣL
    with torch.no_grad():
        loss_fn.log_vars.copy_(torch.tensor([0.3, -1.2, 2.0]))
    w = [0.3, -1.2, 2.0]
    expected = 0.5 * sum(math.exp(-wi) * float(li) + wi for wi, li in zip(w, L))
    assert abs(loss_fn(L).item() - expected) < 1e-5
    # Optimum at w = log L: the gradient vanishes there.
    with torch.no_grad():
        loss_fn.log_vars.copy_(torch.log(torch.stack(L)))
    loss_fn.log_vars.grad = None
    loss_fn(L).backward()
    assert loss_fn.log_vars.grad.abs().max() < 1e-6


def test_uncertainty_loss_bounds_reproduce_the_seed_clamp():
    loss_fn = dcal.UncertaintyLoss(3, init=[1.5, 0.0, -3.0], bounds=(-1.0, 1.0))
    torch.testing.assert_close(loss_fn.weights(), torch.tensor([1.0, 0.0, -1.0]))
    loss_fn([torch.tensor(1.0)] * 3).backward()
    assert loss_fn.log_vars.grad[0] == 0 and loss_fn.log_vars.grad[2] == 0  # pinned: no gradient
    with pytest.raises(ValueError, match="expects 3 losses"):
        loss_fn([torch.tensor(1.0)] * 2)
    with pytest.raises(dcal.ConfigError):
        dcal.UncertaintyLoss(3, bounds=(1.0, -1.0))


def test_param_groups_no_decay_on_bias_norm_pos_cls_and_w():
    model = tiny()
    loss_fn = dcal.UncertaintyLoss(3)
    groups = {g["name"]: g for g in dcal.param_groups(model, loss_fn, weight_decay=0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "backbone.head.bias",
            "glca.norm.bias", "backbone.blocks.0.attn.qkv.bias"} <= no_decay
    assert {"backbone.blocks.0.attn.qkv.weight", "glca.block.mlp.fc1.weight", "backbone.head.weight"} <= decay
    assert groups["uncertainty"]["params"] == [loss_fn.log_vars] and groups["uncertainty"]["weight_decay"] == 0
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0
    n_total = sum(len(g["params"]) for g in groups.values())
    assert n_total == len(list(model.parameters())) + 1


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_is_exact():
    a = tiny()
    b = tiny(glca_init="copy")
    b.load_state_dict(a.state_dict())
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x).glca_logits, b.eval()(x).glca_logits, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_loads_as_pretrained_path_with_resampled_pos_embed(tmp_path, fmt):
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=11, img_size=32, **TINY)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(src.state_dict(), str(path))
    else:
        torch.save({"model": src.state_dict()}, path)
    model = dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=48, pretrained=str(path), **TINY)
    assert model.backbone.pos_embed.shape == (1, 1 + 36, 48)  # 4×4 grid resampled to 6×6
    torch.testing.assert_close(model.backbone.cls_token, src.cls_token)
    torch.testing.assert_close(model.backbone.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert model.backbone.head.weight.shape == (5, 48)  # mismatched head dropped, fresh one kept
    # GLCA starts from a copy of the (pretrained) last block by default.
    torch.testing.assert_close(model.glca.block.attn.qkv.weight, src.blocks[-1].attn.qkv.weight)


def test_truncated_or_mismatched_checkpoint_gives_a_clear_error(tmp_path):
    from safetensors.torch import save_file
    src = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, **TINY)
    good = tmp_path / "good.safetensors"
    save_file(src.state_dict(), str(good))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(dcal.CheckpointError, match="trunc.safetensors.*cannot read"):
        dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=str(trunc), **TINY)
    with pytest.raises(dcal.CheckpointError, match="missing.pth: weights file not found"):
        dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=str(tmp_path / "missing.pth"), **TINY)
    wide = dict(TINY, embed_dim=96)
    with pytest.raises(dcal.CheckpointError, match="good.safetensors: does not fit"):
        dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=str(good), **wide)
    pt = tmp_path / "trunc.pth"
    torch.save(src.state_dict(), pt)
    pt.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(dcal.CheckpointError, match="trunc.pth"):
        dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=str(pt), **TINY)


# ----------------------------------------------------------------------------- bad config
@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="deit_tiny_patch16_224", img_size=100), "not divisible by the patch size"),
    (dict(backbone="deit_tiny_patch16_224", img_size=64, glca_ratio=0.0), "glca_ratio"),
    (dict(backbone="deit_tiny_patch16_224", img_size=64, glca_ratio=1.5), "glca_ratio"),
    (dict(backbone="deit_tiny_patch16_224", img_size=64, glca_placement="sideways"), "glca_placement"),
    (dict(backbone="no_such_vit_1234", img_size=64), "unknown timm model 'no_such_vit_1234'"),
    (dict(backbone="deit_tiny_patch16_224", img_size=64, class_token=False, global_pool="avg"), "no class token"),
    (dict(backbone="resnet18", img_size=64), "not a ViT"),
])
def test_bad_config_gives_a_clear_error(kwargs, match):
    with pytest.raises(dcal.ConfigError, match=match):
        dcal.build_model(num_classes=5, **kwargs)


# ----------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for ckpt in (False, True):
        model = tiny(drop_path_rate=0.1, grad_checkpointing=ckpt).train()
        torch.manual_seed(123)
        out = model(x, pair_index=torch.tensor([1, 2, 3, 0]))
        sum(F.cross_entropy(t, y) for t in (out.sa_logits, out.glca_logits, out.pwca_logits)).backward()
        grads.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o0, g0), (o1, g1) = grads
    torch.testing.assert_close(o0.pwca_logits, o1.pwca_logits, atol=1e-6, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-4, msg=n)


def test_per_head_and_tiled_attention_equal_the_one_pass(monkeypatch):
    """The CPU path (one head at a time, then also in tiles of query rows) gives the one pass's numbers:
    inference output + weights, training weights."""
    import dcal.layers as layers

    x = torch.randn(3, 3, 32, 32)
    one_pass = tiny().eval()
    one_pass.attention_tiling = False
    ref = one_pass(x)
    train_one = no_dropout(tiny()).train()
    train_one.attention_tiling = False
    ref_train = train_one(x, pair_index=torch.tensor([1, 2, 0]))
    for max_bytes in (layers._UNTILED_MAX_BYTES, 4 * 3 * 17 * 5):  # per head; then 5 rows per tile, uneven last
        monkeypatch.setattr(layers, "_UNTILED_MAX_BYTES", max_bytes)
        out = tiny().eval()(x)
        torch.testing.assert_close(out.sa_logits, ref.sa_logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.glca_logits, ref.glca_logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.rollout, ref.rollout, atol=1e-6, rtol=1e-5)
        assert torch.equal(out.local_index, ref.local_index)
        train = no_dropout(tiny()).train()(x, pair_index=torch.tensor([1, 2, 0]))
        torch.testing.assert_close(train.rollout, ref_train.rollout, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(train.pwca_logits, ref_train.pwca_logits, atol=1e-6, rtol=1e-5)


def test_per_head_attention_tiles_and_layout():
    """`_attention_per_head` against the textbook formula, with tiles of 5 query rows and PWCA's 2N keys."""
    import dcal.layers as layers

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 17, 8).unbind(0)  # (B, H, N, hd)
    k2 = torch.randn(2, 4, 34, 8)
    ref_a = ((q * 0.3) @ k.transpose(-2, -1)).softmax(-1)
    old = layers._UNTILED_MAX_BYTES
    try:
        layers._UNTILED_MAX_BYTES = 4 * 2 * 17 * 5
        assert layers._tile_rows(2, 17, 17) == 5
        o, w = layers._attention_per_head(q, k, 0.3, v)
        w2 = layers.head_mean_attention(q, k2, 0.3)
    finally:
        layers._UNTILED_MAX_BYTES = old
    torch.testing.assert_close(o, ref_a @ v)
    torch.testing.assert_close(w, ref_a.mean(1))
    torch.testing.assert_close(w2, ((q * 0.3) @ k2.transpose(-2, -1)).softmax(-1).mean(1))
    assert o.shape == (2, 4, 17, 8) and o.transpose(1, 2).is_contiguous()  # heads merge without a copy


def test_attention_tiling_off_runs_one_pass(monkeypatch):
    """`attention_tiling = False` (what a GPU step runs) never takes the per-head CPU path; the switch
    belongs to the model, so another model in the same process still does."""
    import dcal.layers as layers

    x = torch.randn(3, 3, 32, 32)
    untiled, tiled = tiny().eval(), tiny().eval()
    untiled.attention_tiling = False
    calls = []
    real = layers._attention_per_head
    monkeypatch.setattr(layers, "_attention_per_head", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    for grad in (False, True):  # inference (one explicit softmax) and training (SDPA + recomputed weights)
        with torch.set_grad_enabled(grad):
            untiled(x)
            assert calls == [], "attention_tiling=False ran the per-head CPU path"
            tiled(x)
            assert calls, "attention_tiling=True did not run the per-head CPU path"
            calls.clear()
    with pytest.raises(dcal.ConfigError, match="attention_tiling must be a bool"):
        untiled.attention_tiling = "false"
