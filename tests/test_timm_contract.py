"""DCAL keeps timm's model contract: no_weight_decay, set_grad_checkpointing, forward_features/forward_head,
and a documented hook point (hooks on `attn` modules see nothing; hooks on `attn.proj` see every branch)."""
from __future__ import annotations

import timm
import torch

import dcal

TINY = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0)


def tiny(**kw):
    torch.manual_seed(0)
    return dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, **{**TINY, **kw})


def test_no_weight_decay_names_real_parameters_and_param_groups_use_it():
    model = tiny()
    names = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert {"backbone.pos_embed", "backbone.cls_token"} <= skip & set(names)
    groups = {g["name"]: g for g in dcal.param_groups(model, dcal.UncertaintyLoss(3), weight_decay=0.05)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(names["backbone.pos_embed"]) in no_decay and id(names["backbone.cls_token"]) in no_decay
    assert groups["uncertainty"]["weight_decay"] == 0.0 and len(groups["uncertainty"]["params"]) == 1


def test_set_grad_checkpointing_leaves_outputs_and_gradients_unchanged():
    x = torch.randn(4, 3, 32, 32)
    pairs = torch.tensor([1, 0, 3, 2])
    results = []
    for enable in (False, True):
        model = tiny()
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable and model.backbone.grad_checkpointing is enable
        torch.manual_seed(1)
        out = model(x, pair_index=pairs)
        (out.sa_logits.sum() + out.glca_logits.sum() + out.pwca_logits.sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    for k in ("sa_logits", "glca_logits", "pwca_logits", "rollout"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), atol=1e-6, rtol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-4, msg=n)


def test_forward_features_and_forward_head_are_the_sa_branch():
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (3, 1 + 16, 48)
        torch.testing.assert_close(feats, model.backbone.forward_features(x), atol=0, rtol=0)
        torch.testing.assert_close(model.forward_head(feats), model(x).sa_logits, atol=1e-5, rtol=0)
        assert model.forward_head(feats, pre_logits=True).shape == (3, 48)


def test_embed_tokens_is_the_start_of_timms_forward_features():
    """`dcal.layers.embed_tokens`, the one caller of timm's private `_pos_embed`, gives the tokens timm's own
    blocks start from, with a pre-norm and register tokens too (so a timm change there fails here)."""
    from dcal.layers import embed_tokens

    for extra in ({}, dict(pre_norm=True, reg_tokens=2)):
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, **TINY, **extra).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            h = embed_tokens(vit, x)
            assert h.shape == (2, vit.num_prefix_tokens + 16, 48)
            torch.testing.assert_close(vit.norm(vit.blocks(h)), vit.forward_features(x))


def test_hooks_on_attn_see_nothing_hooks_on_the_documented_points_see_every_branch():
    model = tiny().train()
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.hook_points().items():
        handles.append(module.register_forward_hook(lambda m, i, o, n=name: calls.__setitem__(n, calls.get(n, 0) + 1)))
    attn_calls = []
    for blk in model.backbone.blocks:
        handles.append(blk.attn.register_forward_hook(lambda m, i, o: attn_calls.append(1)))
    model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert attn_calls == []  # dcal's layers never call attn.forward
    assert calls == {"backbone.blocks.0.attn.proj": 2, "backbone.blocks.1.attn.proj": 2,  # SA and PWCA
                     "glca.block.attn.proj": 1}


# ----------------------------------------------------------------------------- local checkpoints through timm
def _save(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_shipped_backbone_loads_through_timm_and_matches_the_file():
    from safetensors.torch import load_file

    from dcal.config import preset

    m = preset("demo").model
    model = dcal.build_model(m.backbone, num_classes=10, img_size=64, pretrained=m.pretrained, **m.timm_kwargs)
    weights = load_file(m.pretrained)
    own = model.backbone.state_dict()
    for k, v in weights.items():
        if not k.startswith("head."):
            assert torch.equal(own[k], v), k
    assert own["head.weight"].shape[0] == 10  # the file's head has another class count: the fresh one is kept


def test_a_matching_head_is_loaded_and_missing_blocks_are_an_error_even_with_a_new_head(tmp_path):
    import pytest
    import timm

    src = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, **TINY)
    path = _save(src, tmp_path / "w.safetensors")
    model = dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=str(path), **TINY)
    torch.testing.assert_close(model.backbone.head.weight, src.head.weight, atol=0, rtol=0)
    deeper = dict(TINY, depth=3)
    with pytest.raises(dcal.CheckpointError, match=r"(?s)w\.safetensors: does not fit .*Missing key.*blocks\.2\."):
        dcal.build_model("vit_tiny_patch16_224", num_classes=7, img_size=32, pretrained=str(path), **deeper)
