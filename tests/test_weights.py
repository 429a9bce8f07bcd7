"""diagnostics.weights: the decay-dominated share, Σθ², |θ| quantiles, and the callback in a real run."""
import json
import math

import pytest
import torch
import torch.nn as nn

from diagnostics.weights import (
    DecayDominanceCallback,
    coupled_decay,
    decay_dominated_share,
    magnitude_quantiles,
    share_below,
    weight_sum_sq,
)


def _param(values, grad):
    p = nn.Parameter(torch.tensor(values))
    p.grad = torch.tensor(grad)
    return p


def test_share_counts_decay_above_gradient_and_scales_the_gradient():
    # wd·|θ| = [0.05, 0.005, 0.1] against |g| = [0.01, 1, 0.5]: only the first is decay-dominated
    p = _param([1.0, 0.1, -2.0], [0.01, -1.0, 0.5])
    assert decay_dominated_share([p], 0.05) == pytest.approx(1 / 3)
    # the unclipped gradient is 10x smaller here (grad_scale 0.1): the third one joins
    assert decay_dominated_share([p], 0.05, grad_scale=0.1) == pytest.approx(2 / 3)
    assert decay_dominated_share([p], 0.0) == 0.0


def test_share_reads_the_optimizer_groups_and_skips_parameters_without_grad():
    a, b = _param([1.0, 1.0], [0.0, 0.0]), _param([1.0, 1.0], [0.0, 0.0])
    frozen = nn.Parameter(torch.ones(5))  # no .grad: not counted
    opt = torch.optim.Adam([{"params": [a, frozen], "weight_decay": 0.05}, {"params": [b], "weight_decay": 0.0}])
    assert decay_dominated_share(opt) == pytest.approx(0.5)  # a dominated (g = 0), b has no decay
    assert decay_dominated_share(opt, weight_decay=0.05) == 1.0  # an explicit decay overrides the groups'


def test_share_matches_the_direction_of_a_coupled_adam_step():
    """The definition is what coupled L2 does: Adam's first step moves every decay-dominated weight by lr
    towards zero, and every other weight against its gradient."""
    torch.manual_seed(0)
    theta = torch.randn(2000) * 0.02
    grad = torch.randn(2000) * 1e-3
    p = _param(theta.tolist(), grad.tolist())
    share = decay_dominated_share([p], 0.05)
    opt = torch.optim.Adam([p], lr=1e-3, weight_decay=0.05)
    opt.step()
    moved = p.detach() - theta
    towards_zero = torch.sign(moved) == -torch.sign(theta)
    dominated = 0.05 * theta.abs() > grad.abs()
    assert 0.2 < share < 0.8  # both kinds are present, or the check below says nothing
    assert torch.equal(towards_zero[dominated], torch.ones(int(dominated.sum()), dtype=torch.bool))
    assert (torch.sign(moved[~dominated]) == -torch.sign(grad[~dominated])).all()


def test_share_fails_loudly():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        decay_dominated_share([p], 0.05)
    p.grad = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="group 0, parameter 0 .*non-finite gradient"):
        decay_dominated_share([p], 0.05)
    with pytest.raises(ValueError, match="weight_decay is required"):
        decay_dominated_share([p])
    with pytest.raises(ValueError, match="weight_decay must be"):
        decay_dominated_share([p], -0.1)
    with pytest.raises(ValueError, match="grad_scale"):
        decay_dominated_share([p], 0.05, grad_scale=0.0)


def test_sum_sq_counts_weight_matrices_only():
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.bias.fill_(100.0)
    assert weight_sum_sq(m) == pytest.approx(6 * 4.0)
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        weight_sum_sq([m.bias])


def test_magnitudes_quantiles_and_share_below():
    w = nn.Parameter(torch.arange(-50.0, 51.0).reshape(1, -1))  # |θ| = 0..50, each value twice but 0
    assert magnitude_quantiles([w], (0.0, 0.5, 1.0)) == {0.0: 0.0, 0.5: 25.0, 1.0: 50.0}
    expected = torch.quantile(w.detach().abs().reshape(-1), 0.9).item()
    assert magnitude_quantiles([w], (0.9,))[0.9] == pytest.approx(expected)
    assert share_below([w], 10.0) == pytest.approx(19 / 101)  # |θ| in 0..9
    assert share_below(nn.Linear(2, 2), 0.0) == 0.0
    with pytest.raises(ValueError, match="quantiles"):
        magnitude_quantiles([w], (1.5,))
    with pytest.raises(ValueError, match="value must be"):
        share_below([w], -1.0)


def test_coupled_decay_tells_adam_from_adamw():
    p = [nn.Parameter(torch.ones(2))]
    assert coupled_decay(torch.optim.Adam(p, weight_decay=0.05))
    assert not coupled_decay(torch.optim.Adam(p, weight_decay=0.0))
    assert not coupled_decay(torch.optim.AdamW(p, weight_decay=0.05))
    assert coupled_decay(torch.optim.SGD(p, lr=0.1, weight_decay=0.05))


def _run(tmp_path, name, overrides, cb):
    from dcal.config import apply_overrides, preset
    from dcal.train import build_trainer

    cfg = apply_overrides(preset("demo"), [
        "model.pretrained=false", "model.glca=false", "model.pwca=false",
        "model.timm_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
        "data.img_size=32", "data.resize_size=32", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic={num_classes: 3, train_per_class: 8, test_per_class: 4, part_size: 10, mark_grid: 1, seed: 0}",
        "train.batch_size=8", "train.epochs=1", "train.warmup_epochs=0", "train.progress=false",
        "train.save_best=false", "train.weight_decay=0.05", *overrides])
    tr = build_trainer(cfg, tmp_path / name, callbacks=[cb])
    tr.fit()
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return tr, [r for r in lines if r["kind"] == "step"]


def test_callback_writes_the_share_and_sum_sq_into_every_step(tmp_path):
    """A tight clip makes the clipped share larger than the unclipped one; Σθ² is the model's after the step."""
    cb = DecayDominanceCallback(every=1)
    tr, steps = _run(tmp_path, "clip", ["train.optimizer=adam_l2", "train.clip_grad=1e-4"], cb)
    assert len(steps) == 3
    for r in steps:
        assert 0.0 <= r["decay_dominated_unclipped"] < r["decay_dominated"] <= 1.0
    assert steps[-1]["weight_sum_sq"] == pytest.approx(weight_sum_sq(tr.model), rel=1e-9)
    assert "weight decay is coupled" in (tmp_path / "clip" / "train.log").read_text()


def test_callback_without_clip_and_every(tmp_path):
    cb = DecayDominanceCallback(weight_decay=0.05, every=2)
    _, steps = _run(tmp_path, "noclip", ["train.optimizer=adamw"], cb)
    measured = [r for r in steps if "decay_dominated" in r]
    assert [r["step"] for r in measured] == [1, 3]
    assert all(r["decay_dominated"] == r["decay_dominated_unclipped"] for r in measured)
    assert all(math.isfinite(r["weight_sum_sq"]) for r in measured)
    with pytest.raises(ValueError, match="every"):
        DecayDominanceCallback(every=0)
