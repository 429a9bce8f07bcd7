"""GLCA's head must depend on the selected local queries (DCAL_METHOD.md §3, issue 9), and the selection
switches that measure what the rollout buys."""
from __future__ import annotations

import pytest
import torch

import dcal
from dcal.layers import embed_tokens
from dcal.model import GLCA_SELECTIONS, select_local

TINY = dict(patch_size=8, embed_dim=48, depth=3, num_heads=3, drop_path_rate=0.0)


def tiny(**kw):
    torch.manual_seed(0)
    return dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pwca=False, glca_ratio=0.25,
                            **TINY, **kw).eval()


def glca_logits(model, x, local_index):
    """GLCA's logits for given local queries (CLS always first), from the model's own modules."""
    bb = model.backbone
    cls = torch.zeros(len(x), 1, dtype=torch.long)
    with torch.no_grad():
        h = bb.blocks(embed_tokens(bb, x))
        return model.glca(h, torch.cat([cls, local_index + 1], 1))


def test_default_head_reads_the_local_queries():
    model = tiny()
    assert model.glca.pool != "cls"
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    torch.testing.assert_close(glca_logits(model, x, out.local_index), out.glca_logits)
    other = (out.local_index + 5) % model.num_patches  # different patches, same k
    assert (glca_logits(model, x, other) - out.glca_logits).abs().max() > 1e-4


@pytest.mark.parametrize("pool", ["mean", "local"])
def test_pooled_heads_depend_on_the_selection(pool):
    model = tiny(glca_pool=pool)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    other = (out.local_index + 5) % model.num_patches
    assert (glca_logits(model, x, other) - out.glca_logits).abs().max() > 1e-4


def test_cls_head_ignores_the_selection():
    model = tiny(glca_pool="cls")
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    other = (out.local_index + 5) % model.num_patches
    torch.testing.assert_close(glca_logits(model, x, other), out.glca_logits)


def test_selection_modes():
    scores = torch.rand(4, 16)
    torch.testing.assert_close(select_local(scores, 3, "rollout"), scores.topk(3, dim=1).indices)
    uni = select_local(scores, 3, "uniform")  # the seed's fallback: one set for every image
    assert (uni == uni[:1]).all()
    torch.manual_seed(1)
    rnd = select_local(scores, 3, "random")
    assert all(len(set(r.tolist())) == 3 for r in rnd) and not (rnd == rnd[:1]).all()
    with pytest.raises(dcal.ConfigError, match="glca_selection"):
        select_local(scores, 3, "attention")
    assert GLCA_SELECTIONS == ("rollout", "uniform", "random")


@pytest.mark.parametrize("mode", ["uniform", "random"])
def test_model_selection_switch(mode):
    model = tiny(glca_selection=mode)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.local_index.shape == (3, model.num_local)
    if mode == "uniform":
        assert (out.local_index == out.local_index[:1]).all()
    with pytest.raises(dcal.ConfigError, match="glca_selection"):
        tiny(glca_selection="topk")
