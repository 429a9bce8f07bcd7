"""Rollout heatmaps, selection statistics, PWCA distractor mass, the rollout callback and explorer widget."""
from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import dcal  # noqa: E402
from dcal.callbacks import Callback  # noqa: E402
from dcal.metrics import chance_hit_rate, patches_in_boxes  # noqa: E402
from dcal_studies import uniform_fallback_selection  # noqa: E402
from diagnostics.attention import (  # noqa: E402
    RolloutCallback,
    plot_compare,
    plot_pwca_mass,
    plot_rollout,
    pwca_distractor_mass,
    rollout_heatmap,
)
from diagnostics.selection import (  # noqa: E402
    random_selection,
    selection_jaccard,
    selection_stats,
)
from diagnostics.widgets_rollout import rollout_explorer  # noqa: E402

IMG, PATCH = 32, 8  # a 4×4 grid, P = 16
MEAN = STD = (0.5, 0.5, 0.5)


def tiny(**kw):
    kw = dict(num_classes=5, img_size=IMG, patch_size=PATCH, embed_dim=48, depth=2, num_heads=3,
              drop_path_rate=0.0, glca_ratio=0.25) | kw
    return dcal.build_model("vit_tiny_patch16_224", **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, IMG, IMG, generator=g)


def rects(fig: Figure, gid: str) -> list[Rectangle]:
    return [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle) and p.get_gid() == gid]


# ----------------------------------------------------------------------------------------- heatmaps
def test_heatmap_square_grid_upsamples_and_keeps_the_grid_values():
    r = torch.rand(16)
    assert rollout_heatmap(r, (4, 4)).shape == (4, 4)
    np.testing.assert_allclose(rollout_heatmap(r, (4, 4)), r.view(4, 4).numpy())
    assert rollout_heatmap(r, (4, 4), (32, 32)).shape == (32, 32)
    near = rollout_heatmap(r[None].repeat(3, 1), (4, 4), (32, 32), mode="nearest")  # (3, 32, 32)
    assert near.shape == (3, 32, 32)
    np.testing.assert_allclose(near[0, ::8, ::8], r.view(4, 4).numpy())  # each cell filled with its value


def test_heatmap_non_square_grid_is_row_major():
    r = torch.zeros(2, 6)
    r[0, 1] = 1.0  # row 0, col 1 of a 2×3 grid
    r[1, 5] = 1.0  # row 1, col 2
    h = rollout_heatmap(r, (2, 3), (16, 24), mode="nearest")
    assert h.shape == (2, 16, 24) and h.dtype == np.float32
    assert h[0, :8, 8:16].min() == 1.0 and h[0].sum() == 64
    assert h[1, 8:, 16:].min() == 1.0 and h[1].sum() == 64
    assert rollout_heatmap(r, (2, 3), (16, 24)).shape == (2, 16, 24)  # bilinear


def test_heatmap_drops_prefix_tokens_and_names_the_shapes_on_mismatch():
    full = torch.rand(2, 1 + 6)  # CLS + a 2×3 grid
    np.testing.assert_array_equal(rollout_heatmap(full, (2, 3), (8, 12), num_prefix_tokens=1),
                                  rollout_heatmap(full[:, 1:], (2, 3), (8, 12)))
    with pytest.raises(ValueError, match=r"rollout has 7 tokens \(shape \(2, 7\)\).*\(2, 3\).*0 \+ 2×3 = 6"):
        rollout_heatmap(full, (2, 3))
    with pytest.raises(ValueError, match=r"needs 2 \+ 2×3 = 8"):
        rollout_heatmap(full, (2, 3), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="non-finite"):
        rollout_heatmap(torch.tensor([0.1, float("nan"), 0.2, 0.3]), (2, 2))
    with pytest.raises(ValueError, match="grid_size"):
        rollout_heatmap(torch.rand(6), (2, 0))


# ----------------------------------------------------------------------------------------- plots
def test_plot_rollout_draws_the_selection_and_the_boxes(images):
    B, k = 3, 2
    rollout = torch.rand(B, 16)
    index = rollout.topk(k, dim=1).indices
    part = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(B, 1)
    dis = torch.full((B, 2, 4), float("nan"))
    dis[:, 0] = torch.tensor([16.0, 16.0, 32.0, 32.0])  # one real distractor + one padding row
    fig = plot_rollout(images[:B], rollout, (4, 4), local_index=index, part_boxes=part, distractor_boxes=dis,
                       titles=["a", "b", "c"], ncols=2, mean=MEAN, std=STD)
    try:
        assert isinstance(fig, Figure)
        assert len(rects(fig, "selected")) == B * k
        assert len(rects(fig, "part")) == B and len(rects(fig, "distractor")) == B
        r = rects(fig, "selected")[0]  # first selected patch of image 0, at its grid cell
        row, col = divmod(int(index[0, 0]), 4)
        assert (r.get_x(), r.get_y(), r.get_width(), r.get_height()) == (col * 8, row * 8, 8, 8)
        assert sum(ax.has_data() for ax in fig.axes) == B  # 2×2 grid, last panel empty
    finally:
        plt.close(fig)


def test_plot_rollout_validates_its_inputs(images):
    x, r = images[:2], torch.rand(2, 16)
    with pytest.raises(ValueError, match="rollout has 3 rows for 2 images"):
        plot_rollout(x, torch.rand(3, 16), (4, 4))
    with pytest.raises(ValueError, match=r"local_index values must lie in 0\.\.15"):
        plot_rollout(x, r, (4, 4), local_index=torch.tensor([[0], [16]]))
    with pytest.raises(ValueError, match=r"do not split into grid_size \(3, 3\)"):
        plot_rollout(x, torch.rand(2, 9), (3, 3))
    with pytest.raises(ValueError, match="both mean and std"):
        plot_rollout(x, r, (4, 4), mean=MEAN)
    with pytest.raises(ValueError, match="part_boxes must be"):
        plot_rollout(x, r, (4, 4), part_boxes=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="titles has 1 entries for 2 images"):
        plot_rollout(x, r, (4, 4), titles=["only one"])
    with pytest.raises(ValueError, match="images must be"):
        plot_rollout(torch.rand(2, 5, 32, 32), r, (4, 4))


def test_plot_rollout_non_square_and_single_image():
    x = torch.rand(3, 16, 24)  # one image, 2×3 grid of 8-px patches
    fig = plot_rollout(x, torch.rand(1 + 6), (2, 3), local_index=torch.tensor([5]), num_prefix_tokens=1)
    try:
        (r,) = rects(fig, "selected")
        assert (r.get_x(), r.get_y()) == (16, 8)
    finally:
        plt.close(fig)


def test_plot_compare_side_by_side(images):
    a, b = torch.rand(2, 16), torch.rand(2, 16)
    fig = plot_compare(images[:2], a, b, (4, 4), local_index_a=a.topk(3).indices, local_index_b=b.topk(3).indices,
                       part_boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2), mean=MEAN, std=STD)
    try:
        assert len(fig.axes) == 4
        assert [ax.get_title() for ax in fig.axes[:2]] == ["SA-only", "DCAL"]
        assert len(rects(fig, "selected")) == 2 * 2 * 3
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="rollout_b has 15 tokens"):
        plot_compare(images[:2], a, torch.rand(2, 15), (4, 4))


# ----------------------------------------------------------------------------------------- selection
def test_part_hit_and_chance_against_hand_made_masks():
    index = torch.tensor([[0, 1], [2, 3], [0, 3]])  # k = 2 of P = 4
    part = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    dis = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    s = selection_stats(index, 4, part, dis)
    assert s["part_hit"] == pytest.approx(2 / 3)  # hit, miss, hit
    # m = 1, 1, 2 part patches: 1 - C(4-m, 2)/C(4, 2) = 1/2, 1/2, 5/6
    assert s["part_hit_chance"] == pytest.approx((0.5 + 0.5 + 5 / 6) / 3)
    assert s["part_hit_chance"] == pytest.approx(chance_hit_rate(part, 2))
    assert s["distractor_hit"] == pytest.approx(1 / 3)
    # Jaccard: {0,1}~{2,3} 0, {0,1}~{0,3} 1/3, {2,3}~{0,3} 1/3
    assert s["selection_jaccard"] == pytest.approx(2 / 9)
    torch.testing.assert_close(s["token_frequency"], torch.tensor([2, 1, 1, 2]) / 3)
    assert s["token_frequency"].sum() == pytest.approx(2.0)  # k per image, averaged
    assert selection_stats(index, 4)["part_hit"] is None
    with pytest.raises(ValueError, match=r"part_mask must be \(B, P\) = \(3, 4\)"):
        selection_stats(index, 4, part[:, :3])
    with pytest.raises(ValueError, match=r"local_index values must lie in 0\.\.3"):
        selection_stats(index + 2, 4)


def test_uniform_fallback_is_flagged_static_and_a_real_model_is_not(model, images):
    B, P, k = images.shape[0], model.num_patches, model.num_local
    fallback = uniform_fallback_selection(B, P, k)
    torch.testing.assert_close(fallback, torch.ones(B, P).topk(k).indices)
    # A model whose rollout is all-equal (the seed's torch.ones fallback) selects exactly this.
    torch.testing.assert_close(torch.ones(B, P).topk(k, dim=1, sorted=True).indices, fallback)
    s = selection_stats(fallback, P)
    assert s["selection_jaccard"] == 1.0 and s["selection_static"]
    assert s["token_frequency"].max() == 1.0 and int((s["token_frequency"] > 0).sum()) == k

    model.eval()
    with torch.no_grad():
        out = model(images)
    real = selection_stats(out.local_index, P)
    assert real["selection_jaccard"] < 0.9 and not real["selection_static"]

    rnd = random_selection(B, P, k, torch.Generator().manual_seed(0))
    assert rnd.shape == (B, k) and all(len(set(row.tolist())) == k for row in rnd)
    assert selection_jaccard(rnd, P) < 0.9
    with pytest.raises(ValueError, match="k=17 exceeds"):
        random_selection(B, P, 17)


# ----------------------------------------------------------------------------------------- PWCA
def test_pwca_mass_is_one_half_for_self_pairs_and_a_fraction_otherwise(model, images):
    before = {n: p.clone() for n, p in model.state_dict().items()}
    model.train()
    B, L = images.shape[0], len(model.backbone.blocks)
    self_mass = pwca_distractor_mass(model, images, torch.arange(B))
    assert set(self_mass) == {"all", "cls"} and self_mass["all"].shape == (B, L)
    torch.testing.assert_close(self_mass["all"], torch.full((B, L), 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(self_mass["cls"], torch.full((B, L), 0.5), atol=1e-6, rtol=0)
    pair = dcal.derangement(B, torch.Generator().manual_seed(0))
    mass = pwca_distractor_mass(model, images, pair)
    for m in mass.values():
        assert ((m > 0) & (m < 1)).all()
        assert (m - 0.5).abs().max() > 1e-5  # not the self-pair value
    assert model.training  # flag restored
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    fig = plot_pwca_mass(mass)
    try:
        assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 3  # all, CLS, the 0.5 line
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match=r"pair_index must be a LongTensor of shape \(8,\)"):
        pwca_distractor_mass(model, images, torch.arange(4))
    with pytest.raises(ValueError, match="must hold fractions"):
        plot_pwca_mass(torch.tensor([0.2, 1.5]))


# ----------------------------------------------------------------------------------------- callback
def fake_trainer(model, images, tmp_path, **outputs):
    model.eval()
    with torch.no_grad():
        out = model(images)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(len(images), 1)
    eval_outputs = {"local_index": out.local_index, "rollout": out.rollout, "label": torch.arange(len(images)) % 5,
                    "part_mask": patches_in_boxes(boxes, model.grid_size, model.patch_size),
                    "image": images, "part_box": boxes} | outputs
    return SimpleNamespace(model=model, eval_outputs={k: v for k, v in eval_outputs.items() if v is not None},
                           eval_record={"kind": "eval", "part_hit": None}, out_dir=tmp_path, step=12,
                           log=lambda msg: None)


def test_rollout_callback_writes_the_record_and_a_figure(model, images, tmp_path):
    cb = RolloutCallback(num_images=4)
    assert isinstance(cb, Callback)
    tr = fake_trainer(model, images, tmp_path)
    model.train()
    cb.after_eval(tr)
    assert model.training  # the probe forward restored the flag
    rec = tr.eval_record
    expect = selection_stats(tr.eval_outputs["local_index"], model.num_patches, tr.eval_outputs["part_mask"])
    for key in ("part_hit", "part_hit_chance", "selection_jaccard"):
        assert rec[key] == pytest.approx(expect[key])
    assert rec["distractor_hit"] is None  # no distractor mask in this eval
    png = tmp_path / "figures" / "rollout_step000012.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rec["rollout_figure"] == str(png)

    # A part_hit the trainer already computed is kept; the probe batch is used when eval has no images.
    tr = fake_trainer(model, images, tmp_path, image=None)
    tr.eval_record["part_hit"] = 0.123
    tr.step = 13
    probe = {"image": images[:2], "part_box": torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)}
    RolloutCallback(probe_batch=probe, out_dir=tmp_path / "figs").after_eval(tr)
    assert tr.eval_record["part_hit"] == 0.123
    assert (tmp_path / "figs" / "rollout_step000013.png").is_file()

    # Distractor hit-rate from the mask; like the trainer, no part hit-rate when an image has no part patch.
    dis = patches_in_boxes(torch.tensor([[16.0, 16.0, 32.0, 32.0]] * 8), model.grid_size, model.patch_size)
    part = tr.eval_outputs["part_mask"].clone()
    part[0] = False
    tr = fake_trainer(model, images, tmp_path, distractor_mask=dis, part_mask=part)
    RolloutCallback(every=2).after_eval(tr)
    rec = tr.eval_record
    assert rec["part_hit"] is None and rec["part_hit_chance"] is None
    assert rec["distractor_hit"] == pytest.approx(selection_stats(tr.eval_outputs["local_index"], 16, None, dis)["distractor_hit"])


def test_rollout_callback_fails_loudly(model, images, tmp_path):
    tr = fake_trainer(model, images, tmp_path, image=None)
    with pytest.raises(ValueError, match="no probe images"):
        RolloutCallback().after_eval(tr)
    tr = fake_trainer(model, images, tmp_path, rollout=None)
    with pytest.raises(ValueError, match=r"lacks \['rollout'\]"):
        RolloutCallback().after_eval(tr)
    tr = fake_trainer(model, images, tmp_path, rollout=torch.rand(8, 17))
    with pytest.raises(ValueError, match=r"rollout'\] has shape \(8, 17\)"):
        RolloutCallback().after_eval(tr)


# ----------------------------------------------------------------------------------------- widget
def test_rollout_explorer_redraws_without_rerunning_the_model(model, images):
    torch.manual_seed(3)
    baseline = tiny(glca=False, pwca=False)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(4, 1)
    ex = rollout_explorer(model, images[:4], boxes, baseline_model=baseline)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (model, baseline)]
    try:
        model.eval()
        with torch.no_grad():
            out = model(images[:4])
        calls.clear()
        # At the model's own R the explorer selects what the model selected.
        assert ex.k == model.num_local and torch.equal(ex.selected, out.local_index[0])
        png0, n0 = ex.png, len(rects(ex.figure, "selected"))
        assert n0 == model.num_local and len(rects(ex.figure, "part")) == 1
        ex.ratio_slider.value = 0.5  # the observer redraws
        assert ex.k == math.floor(0.5 * model.num_patches) and len(rects(ex.figure, "selected")) == ex.k
        assert ex.png != png0
        png1 = ex.png
        ex.image_slider.value = 2
        assert ex.png != png1 and torch.equal(ex.selected, ex.rollouts["DCAL"][2].topk(ex.k).indices)
        ex.mode.value = "SA-only"
        assert torch.equal(ex.selected, ex.rollouts["SA-only"][2].topk(ex.k).indices)
        assert ex.widget.redraw() is ex.figure
        assert ex.output.outputs[0]["data"]["image/png"]
        assert calls == []  # no forward pass after construction
    finally:
        for h in hooks:
            h.remove()
        plt.close("all")


def test_rollout_explorer_draws_the_distractor_boxes(model, images):
    part = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(4, 1)
    nan = float("nan")
    dis = torch.tensor([[[16.0, 16.0, 32.0, 32.0], [0.0, 16.0, 16.0, 32.0]],
                        [[16.0, 16.0, 32.0, 32.0], [nan, nan, nan, nan]]]).repeat(2, 1, 1)  # (4, 2, 4), padding
    ex = rollout_explorer(model, images[:4], part, distractor_boxes=dis)
    try:
        assert len(rects(ex.figure, "distractor")) == 2 and len(rects(ex.figure, "part")) == 1
        ex.image_slider.value = 1  # one real box and one padding row
        assert len(rects(ex.figure, "distractor")) == 1
        assert len(rects(rollout_explorer(model, images[:4], part).figure, "distractor")) == 0
        with pytest.raises(ValueError, match="distractor_boxes must be"):
            rollout_explorer(model, images[:4], part, distractor_boxes=dis[:3])
    finally:
        plt.close("all")


# ----------------------------------------------------------------------------------------- PWCA from the model
def _pwca_mass_by_hand(model, x, pair):
    """The old second copy of DCAL's forward (kept here as the reference the model's answer must match)."""
    from dcal.layers import embed_tokens, pwca_block, qkv, sa_block

    bb = model.backbone
    with dcal.eval_mode(model), torch.no_grad():
        h = embed_tokens(bb, x)  # (B, N, C)
        h_pw, N, out = h, h.shape[1], []
        for blk in bb.blocks:
            h, k, v, _ = sa_block(blk, h, need_weights=False)
            q, k1, _ = qkv(blk.attn, blk.norm1(h_pw))
            a = ((q * blk.attn.scale) @ torch.cat([k1, k[pair]], 2).transpose(-2, -1)).softmax(-1)  # (B, H, N, 2N)
            out.append(a[..., N:].sum(-1).mean(dim=(1, 2)))
            h_pw = pwca_block(blk, h_pw, k[pair], v[pair])
    return torch.stack(out, 1)


def test_pwca_attention_is_a_return_option_of_the_model(model, images):
    B = images.shape[0]
    pair = dcal.derangement(B, torch.Generator().manual_seed(0))
    with dcal.eval_mode(model), torch.no_grad():
        plain = model(images)
        out = model(images, pair, pwca_attention=True)
    assert plain.pwca_attention is None and plain.pwca_logits is None
    assert len(out.pwca_attention) == len(model.backbone.blocks)
    N = model.num_patches + 1
    for w in out.pwca_attention:
        assert w.shape == (B, N, 2 * N) and not w.requires_grad
        torch.testing.assert_close(w.sum(-1), torch.ones(B, N), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sa_logits, plain.sa_logits)  # the option changes no other output
    torch.testing.assert_close(pwca_distractor_mass(model, images, pair)["all"], _pwca_mass_by_hand(model, images, pair),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- any ViT
from diagnostics.capture import AttentionCaptureError, capture_attention, vit_rollout  # noqa: E402


def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, depth=2, embed_dim=48,
                             num_heads=3, num_classes=5).eval()


def hook_total(m: torch.nn.Module) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def _softmax_from_qkv(vit, x):
    """Reference maps, computed from each block's qkv output (timm's arithmetic, written out in the test)."""
    maps = []

    def grab(attn):
        def hook(mod, args, out):
            B, N, _ = out.shape
            q, k, _ = out.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1))  # (B, H, N, N)
        return hook

    hs = [blk.attn.qkv.register_forward_hook(grab(blk.attn)) for blk in vit.blocks]
    with torch.no_grad():
        vit(x)
    for h in hs:
        h.remove()
    return maps


def test_capture_reads_a_fused_timm_vit_and_changes_nothing(images):
    vit = timm_vit()
    assert all(blk.attn.fused_attn for blk in vit.blocks)  # the case vit-explain captures nothing from
    x = images[:4]
    with torch.no_grad():
        fused_out = vit(x)
    with capture_attention(vit, heads="all") as cap, torch.no_grad():
        eager_out = vit(x)
    assert all(blk.attn.fused_attn for blk in vit.blocks) and hook_total(vit) == 0  # restored
    torch.testing.assert_close(eager_out, fused_out, atol=1e-5, rtol=1e-5)
    ref = _softmax_from_qkv(vit, x)
    assert list(cap.maps) == ["blocks.0.attn", "blocks.1.attn"]
    for name, r in zip(cap.maps, ref):
        (a,) = cap.maps[name]
        assert a.shape == (4, 3, 17, 17)
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
    mean = capture_attention(vit)(x)  # callable form: one eval forward, head-mean maps
    torch.testing.assert_close(mean["blocks.1.attn"][0], ref[1].mean(1), atol=1e-6, rtol=1e-5)


def test_capture_is_timms_attention_extract_and_leaves_the_model_as_it_was(model, images):
    """The maps come through timm.utils.AttentionExtract's hooks; it sets eval/train mode when built and never
    removes its hooks: the capture restores both. On DCAL's backbone (the SA branch's timm ViT) the rollout of
    the captured maps is DCAL's own rollout."""
    from timm.models._features import FeatureHooks

    vit = timm_vit().train()
    vit.blocks[1].eval()  # a mixed mode AttentionExtract(mode="train") would overwrite
    with capture_attention(vit) as cap, torch.no_grad():
        assert [type(e.hooks) for e in cap._extracts] == [FeatureHooks]
        assert vit.training and not vit.blocks[1].training and vit.blocks[0].training
        vit(images[:2])
    assert hook_total(vit) == 0 and len(cap.maps) == 2
    with torch.no_grad():
        out = model.eval()(images[:4])
    cap = capture_attention(model.backbone, select=0)
    cap(images[:4])
    torch.testing.assert_close(cap.rollout()[:, model.backbone.num_prefix_tokens:], out.rollout.float(),
                               atol=1e-6, rtol=1e-5)


def test_a_module_called_twice_is_keyed_by_call_order():
    from timm.layers import Attention

    class TwicePerBlock(torch.nn.Module):  # the seed's pattern: one attention module, two calls per forward
        def __init__(self):
            super().__init__()
            self.attn = Attention(48, num_heads=3)

        def forward(self, a, b):
            return self.attn(a) + self.attn(b)

    torch.manual_seed(0)
    net = TwicePerBlock().eval()
    a, b = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    with capture_attention(net) as cap, torch.no_grad():
        net(a, b)
        net(b, a)  # a second forward: call order restarts, maps are concatenated along the batch
    first, second = cap.maps["attn"]
    assert first.shape == second.shape == (4, 5, 5)
    torch.testing.assert_close(first[:2], second[2:])  # call 0 of forward 1 saw a, call 1 of forward 2 saw a
    assert not torch.allclose(first[:2], second[:2])
    only = capture_attention(net, select=1)
    only(a, b)
    torch.testing.assert_close(only.maps["attn"][0], second[:2])
    with pytest.raises(AttentionCaptureError, match=r"one map per module.*'attn': 2.*select="):
        cap.rollout()


def test_capture_fails_loudly_naming_the_module(model, images):
    with pytest.raises(AttentionCaptureError, match=r"recorded nothing from \['backbone.blocks.0.attn'.*DCALOutput.rollout"):
        capture_attention(model)(images[:2])  # DCAL runs attention stage by stage: attn.forward never runs
    vit = timm_vit()
    with pytest.raises(AttentionCaptureError, match="no module name matches 'block.*.attn'"):
        capture_attention(vit, "block.*.attn")
    with pytest.raises(AttentionCaptureError, match=r"blocks.0.mlp \(Mlp\): no attention weights"):
        capture_attention(vit, ["blocks.0.mlp"])

    class Scores(torch.nn.Module):  # passes raw scores, not softmax weights, through attn_drop
        def __init__(self):
            super().__init__()
            self.attn_drop = torch.nn.Dropout(0.0)

        def forward(self, x):
            return self.attn_drop(x @ x.transpose(-2, -1))

    class Flat(Scores):  # passes a (B, N, N) map: no heads axis
        def forward(self, x):
            return self.attn_drop((x @ x.transpose(-2, -1)).softmax(-1).mean(1))

    x = torch.randn(2, 3, 5, 4)
    with pytest.raises(AttentionCaptureError, match=r"<model> \(call 0\): map \(2, 3, 5, 5\) is not softmax weights"):
        capture_attention(Scores(), [""])(x)
    with pytest.raises(AttentionCaptureError, match=r"expected softmax weights \(B, H, Nq, Nk\), got \(2, 5, 5\)"):
        capture_attention(Flat(), [""])(x)
    assert hook_total(vit) == 0


def test_vit_rollout_is_the_rollout_of_the_captured_maps(images):
    import diagnostics

    vit = timm_vit()
    r = vit_rollout(vit, images[:4])  # (B, P): CLS row, prefix dropped
    ref = dcal.attention_rollout([m.mean(1) for m in _softmax_from_qkv(vit, images[:4])])
    assert r.shape == (4, 16)
    torch.testing.assert_close(r, ref[:, 1:], atol=1e-6, rtol=1e-5)
    assert diagnostics.attention_rollout is dcal.attention_rollout  # exported, not written twice


def test_rollout_callback_and_explorer_take_a_rollout_fn(images, tmp_path):
    vit = timm_vit()
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(4, 1)
    tr = SimpleNamespace(model=vit, eval_outputs={}, eval_record={"kind": "eval"}, out_dir=tmp_path, step=3,
                         log=lambda msg: None)
    RolloutCallback(probe_batch={"image": images[:4], "part_box": boxes}, rollout_fn=vit_rollout,
                    ratio=0.25).after_eval(tr)
    index = vit_rollout(vit, images[:4]).topk(4, dim=1).indices  # k = floor(0.25 · 16)
    expect = selection_stats(index, 16, patches_in_boxes(boxes, (4, 4), (8, 8)))
    assert tr.eval_record["part_hit"] == pytest.approx(expect["part_hit"])
    assert tr.eval_record["selection_jaccard"] == pytest.approx(expect["selection_jaccard"])
    assert (tmp_path / "figures" / "rollout_step000003.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(TypeError, match="pass rollout_fn=diagnostics.vit_rollout"):
        RolloutCallback(probe_batch={"image": images[:4]}).after_eval(tr)  # the DCAL default on a timm ViT
    with pytest.raises(ValueError, match=r"rollout of shape \(4, 17\); expected \(4, 16\)"):
        RolloutCallback(probe_batch={"image": images[:4]}, rollout_fn=lambda m, x: torch.rand(4, 17)).after_eval(tr)

    other = timm_vit()
    torch.nn.init.normal_(other.blocks[0].attn.qkv.weight)
    ex = rollout_explorer(vit, images[:4], boxes, baseline_model=other, rollout_fn=vit_rollout,
                          labels=("ViT", "ViT, noisy qkv"), mean=MEAN, std=STD)
    try:
        assert ex.k == math.floor(0.1 * 16) and set(ex.rollouts) == {"ViT", "ViT, noisy qkv"}
        ex.mode.value = "ViT, noisy qkv"
        assert torch.equal(ex.selected, ex.rollouts["ViT, noisy qkv"][0].topk(ex.k).indices)
        assert ex.png[:4] == b"\x89PNG"
    finally:
        plt.close("all")
