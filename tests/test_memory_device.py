"""The device-level estimate: the caching-allocator replay follows CUDACachingAllocator.cpp's rules, the terms
add up and name their sources, and `dcal memory --model` answers with them (no GPU: the figures are unmeasured)."""
from __future__ import annotations

import json

import pytest
import torch

import dcal_app.cli
from diagnostics.memory import device_memory, predict_step_memory
from diagnostics.memory.device import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    cublas_workspace_bytes,
    replay_allocator,
)

MiB = 2 ** 20


def test_replay_rounds_requests_into_the_allocators_segments():
    assert replay_allocator([(1, 100)]) == {"reserved_peak": 2 * MiB, "allocated_peak": 512, "segments": 1}
    # 1-10 MiB requests share a 20 MiB segment: the second is served from the first's remainder.
    assert replay_allocator([(1, 3 * MiB), (2, 3 * MiB)])["reserved_peak"] == 20 * MiB
    # Larger requests get a segment rounded up to 2 MiB: the predecessor's failed request, one fp32 PWCA score
    # map of ViT-B/16 at 448 px, batch 4 (B·H·N·2N·4 bytes, N = 785), is the log's "226.00 MiB".
    pwca_map = 4 * 12 * 785 * 2 * 785 * 4
    assert replay_allocator([(1, pwca_map)])["reserved_peak"] == 226 * MiB


def test_replay_reuses_splits_and_merges_freed_blocks():
    # A freed 100 MiB block cannot hold 150 MiB: a new segment (fragmentation), 350 MiB reserved for 250 live.
    r = replay_allocator([(1, 100 * MiB), (2, 100 * MiB), (1, 0), (3, 150 * MiB)])
    assert r["reserved_peak"] == 350 * MiB and r["segments"] == 3
    # Two neighbours freed in one segment merge and hold a request of their joint size.
    assert replay_allocator([(1, 3 * MiB), (2, 3 * MiB), (1, 0), (2, 0), (3, 6 * MiB)])["segments"] == 1
    # The large pool splits only when more than 1 MiB would remain: otherwise the whole block is allocated.
    r = replay_allocator([(1, 12 * MiB), (1, 0), (2, 11 * MiB + 512 * 1024)])
    assert r["allocated_peak"] == 12 * MiB and r["segments"] == 1


def tiny_vit():
    import timm

    with torch.device("meta"):
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                                 num_heads=3, num_classes=5)


def test_device_terms_add_up_and_name_their_sources():
    pred = predict_step_memory(tiny_vit(), (4, 3, 32, 32), amp_dtype=torch.float16)
    dev = device_memory(pred, sm_major=9)
    terms = dev.terms
    assert set(terms) == {"allocated", "workspaces", "segments", "fragmentation", "cuda_context"}
    assert dev.device_bytes == sum(b for b, _ in terms.values()) > pred.peak_bytes + CUDA_CONTEXT_BYTES
    assert terms["allocated"][0] == pred.worst_bytes and terms["cuda_context"][0] == CUDA_CONTEXT_BYTES
    assert terms["workspaces"][0] == 2 * cublas_workspace_bytes(9) == 2 * (8519680 + 32 * MiB)
    # Reserved-but-unallocated is at least the log's share; the replay's segments are part of it.
    assert terms["segments"][0] + terms["fragmentation"][0] >= int(FRAGMENTATION * pred.worst_bytes)
    assert all(source for _, source in terms.values()) and dev.unmodelled
    assert dev.fits(dev.device_bytes) and not dev.fits(dev.device_bytes - 1)
    assert pred.device_memory(sm_major=9).device_bytes == dev.device_bytes
    with pytest.raises(ValueError, match="target='cuda'"):
        device_memory(predict_step_memory(tiny_vit(), (4, 3, 32, 32), target="cpu"))


def _memory_json(capsys, *argv) -> dict:
    assert dcal_app.cli.main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dcal_memory_for_a_timm_model(capsys, monkeypatch):
    import dcal_app.memory

    # On a model this small the allocator's 2 / 20 MiB segments make the device figure a staircase in the
    # batch: allow the search enough predictions to bracket it (ViT-B needs 2).
    monkeypatch.setattr(dcal_app.memory, "_MAX_BATCH_TRIES", 10)
    common = ["--model", "test_vit", "--img-size", "64", "--batch-size", "4", "--num-classes", "10", "--no-dcal"]
    res = _memory_json(capsys, *common, "--precision", "bf16", "--gpu-memory", "0.6")
    assert res["fits"] is True and res["device_bytes"] == res["device"]["device_bytes"] <= res["gpu_memory_bytes"]
    assert res["peak_bytes"] == max(p["peak_bytes"] for p in res["phases"].values())
    assert set(res["phases"]) == {"forward", "backward", "optimizer"} and res["phases"]["forward"]["composition"]
    # max_batch: its device-level figure fits, the next batch's does not (both predicted: exact).
    b = res["max_batch"]
    assert b > 4 and res["max_batch_exact"] is True
    over = _memory_json(capsys, *common[:4], "--batch-size", str(b + 1), *common[6:], "--precision", "bf16",
                        "--gpu-memory", "0.6")
    assert over["fits"] is False
    # Plain timm, SGD (1 state tensor per parameter) vs AdamW (2), checkpointing keeps fewer activations.
    plain = _memory_json(capsys, *common)
    sgd = _memory_json(capsys, *common, "--optimizer", "sgd")
    ckpt = _memory_json(capsys, *common, "--checkpointing")
    params = plain["phases"]["forward"]["composition"]["parameters"]
    assert plain["phases"]["optimizer"]["composition"]["optimizer_state"] == pytest.approx(2 * params, rel=0.01)
    assert sgd["phases"]["optimizer"]["composition"]["optimizer_state"] == pytest.approx(params, rel=0.01)
    assert ckpt["phases"]["forward"]["composition"]["activations"] < plain["phases"]["forward"]["composition"]["activations"]
    assert dcal_app.cli.main(["memory", "--model", "test_vit", "--img-size", "64"]) == 2  # no batch
    assert dcal_app.cli.main(["memory", *common[:6]]) == 2  # DCAL needs a fixed grid; test_vit's is dynamic


def test_dcal_memory_for_a_timm_model_as_dcal(capsys):
    res = _memory_json(capsys, "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
                       "--num-classes", "10", "--precision", "fp16")
    assert res["dcal"] is True and res["device_bytes"] > res["peak_bytes"] and res["fits"] is None
    assert res["phases"]["forward"]["composition"]["parameters"] > 0
    assert dcal_app.cli.main(["memory", "--model", "not_a_model", "--img-size", "64", "--batch-size", "2"]) == 2
