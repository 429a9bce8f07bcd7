"""A second opinion: torch's own `MemTracker` (torch.distributed._tools.mem_tracker) on the same training step.

MemTracker runs the real step on CPU tensors (two AdamW steps, the predictor's own `Step`); the prediction
runs it on meta tensors. Their peaks differ by one category only, exactly: Adam's ``step`` counters. torch
makes them with ``torch.tensor(0.0)`` (created outside the dispatcher, then ``lift_fresh``, an alias), so the
live-tensor tracker does not see them as allocations; MemTracker adds every optimiser state tensor after
``step()``. On a CUDA run those counters stay on the CPU (non-capturable, non-fused Adam), so leaving them
out is right for the GPU figure: 4 bytes per parameter tensor is the whole difference, asserted to the byte.
Parameters and the batch ("Other" for MemTracker) agree to the byte as well. The other categories are
attributed differently (MemTracker calls a gradient "Temp" until it lands in ``.grad`` and an activation
anything made in forward; ours is "saved for backward"), so only their sum is compared.
"""
from __future__ import annotations

import pytest
import timm
import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

import dcal
from diagnostics.memory import predict_step_memory
from diagnostics.memory.step import Batch, Step, default_loss, default_optimizer

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=5, **SMALL)


def demo_dcal() -> torch.nn.Module:
    torch.manual_seed(0)
    return dcal.build_model("vit_tiny_patch16_224", num_classes=5, **SMALL)


class _NoPhases:
    """The phase protocol of `Step`, unused: MemTracker measures."""

    def begin_phase(self, name: str) -> None:
        pass

    def end_phase(self) -> tuple[int, list]:
        return 0, []

    def ident(self, t) -> None:
        return None


def mem_tracker_peak(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    opt = default_optimizer(model, default_loss)
    step = Step(model, default_loss, opt, None, 1, "cpu", _NoPhases())
    batch = Batch((x,), {}, (y,))
    mt = MemTracker()
    mt.track_external(model, opt, x, y)
    with mt:
        step.train(batch, first=True)
        mt.reset_mod_stats()  # MemTracker's module stats hold one iteration; its peak spans both
        step.train(batch)
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]


@pytest.mark.parametrize("make", [timm_vit, demo_dcal], ids=["timm_vit", "demo_dcal"])
def test_prediction_agrees_with_torch_mem_tracker(make):
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    pred = predict_step_memory(make(), x, y, target="cpu")
    model = make()
    theirs = mem_tracker_peak(model, x, y)
    ours = pred.train[pred.peak_phase].composition
    step_counters = 4 * sum(1 for p in model.parameters() if p.requires_grad)  # one fp32 scalar per parameter
    assert theirs["Total"] - pred.peak_bytes == step_counters
    assert theirs[_MemRefType.PARAM] == ours["parameters"]
    assert theirs[_MemRefType.OTH] == ours["inputs"] == x.nbytes + y.nbytes
    assert theirs[_MemRefType.OPT] - ours["optimizer_state"] == step_counters
