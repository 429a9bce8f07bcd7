"""Memory profiling: exact CPU tensor accounting, the CUDA path (mocked), leaks, the attention estimate, the callback."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

import dcal
import diagnostics.memory.profiler as memory_profiler
from diagnostics.memory import (
    LeakDetector,
    MemoryCallback,
    MemoryProfiler,
    attention_memory,
    count_graph_tensors,
    oom_snapshot,
    record_history,
)

IMG = 32


def tiny_model() -> dcal.DCAL:
    torch.manual_seed(0)
    return dcal.build_model("vit_tiny_patch16_224", num_classes=5, img_size=IMG, patch_size=8, embed_dim=48,
                            depth=2, num_heads=3)


def batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, 5, (n,), generator=g)


def dcal_loss(out, y):
    return sum(F.cross_entropy(z, y) for z in (out.sa_logits, out.glca_logits, out.pwca_logits))


# ----------------------------------------------------------------------------- CPU source
def test_known_allocation_is_measured_exactly():
    with MemoryProfiler("cpu", baseline=None) as prof:
        assert prof.source == "cpu-dispatch"
        with prof.step():
            x = torch.empty(25_000_000)  # 100 MB, never touched: RSS would not see it
            del x
        rec = prof.history[-1]
    assert 100.0 <= rec["mem_peak_mb"] < 101.0
    assert rec["mem_allocated_mb"] < 1.0
    assert rec["mem_reserved_mb"] is None and rec["source"] == "cpu-dispatch"  # no allocator cache: None, not 0
    assert _get_current_dispatch_mode() is None


def test_phases_and_backward_are_seen():
    prof = MemoryProfiler("cpu", baseline=None)
    with prof, prof.step():
        a = torch.randn(1000, 1000, requires_grad=True)  # 4 MB
        with prof.phase("forward"):
            loss = (a * 2).exp().sum()  # a, a·2 (freed once exp has run) and exp(a·2) (kept for backward)
        with prof.phase("backward"):
            loss.backward()  # a, exp's output, then each op's 4 MB gradient; a.grad stays
        del loss
    rec = prof.history[-1]
    assert rec["phase_peaks"]["forward"] == pytest.approx(12.0, abs=0.01)
    assert rec["phase_peaks"]["backward"] == pytest.approx(12.0, abs=0.01)
    assert rec["mem_allocated_mb"] == pytest.approx(8.0, abs=0.01)  # a and a.grad (made in backward)


def test_bigger_batch_bigger_peak_and_numbers_unchanged():
    model = tiny_model()
    pairs = {2: torch.tensor([1, 0]), 8: torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])}

    def run(n):
        x, y = batch(n)
        torch.manual_seed(3)
        out = model(x, pair_index=pairs[n])
        dcal_loss(out, y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out.glca_logits, grads

    peaks = {}
    with MemoryProfiler("cpu", baseline=[model]) as prof:
        for n in (2, 8):
            with prof.step():
                traced = run(n)
            peaks[n] = prof.history[-1]["mem_peak_mb"]
    assert peaks[8] > peaks[2] > 0
    plain = run(8)
    assert torch.equal(plain[0], traced[0]) and all(torch.equal(a, b) for a, b in zip(plain[1], traced[1]))


def test_no_gpu_never_reports_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert MemoryProfiler().source == "cpu-dispatch"
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        MemoryProfiler("cpu", source="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        with record_history("x.pickle"):
            pass
    with pytest.raises(RuntimeError, match="CUDA"):
        with oom_snapshot("x.pickle"):
            pass
    prof = MemoryProfiler(source="rss")
    with prof.step():
        torch.ones(1000)
    assert prof.history[-1]["source"] == "rss" and prof.history[-1]["mem_peak_mb"] > 0


# ----------------------------------------------------------------------------- CUDA source (mocked: no GPU here)
class FakeAllocator:
    def __init__(self):
        self.alloc = self.peak = self.reserved = 0

    def malloc(self, mb):
        self.alloc += int(mb * 1e6)
        self.peak = max(self.peak, self.alloc)
        self.reserved = max(self.reserved, self.alloc)

    def free(self, mb):
        self.alloc -= int(mb * 1e6)

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.alloc)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.alloc))


def test_cuda_path_phase_and_step_peaks(monkeypatch):
    fake = FakeAllocator()
    fake.install(monkeypatch)
    prof = MemoryProfiler("cuda")
    assert prof.source == "cuda"
    fake.malloc(500)  # weights, before the step
    prof.step_begin()
    fake.malloc(100)  # the batch, outside any phase
    with prof.phase("forward"):
        fake.malloc(300)
        fake.free(100)
    with prof.phase("backward"):
        fake.malloc(50)
        fake.free(250)
    rec = prof.step_end()
    assert rec == {"mem_allocated_mb": 600.0, "mem_reserved_mb": 900.0, "mem_peak_mb": 900.0,
                   "phase_peaks": {"forward": 900.0, "backward": 850.0}, "source": "cuda"}
    prof.step_begin()  # peaks reset per step
    with prof.phase("forward"):
        fake.malloc(10)
        fake.free(10)
    assert prof.step_end()["mem_peak_mb"] == 610.0


def test_record_history_dumps_also_on_error(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("record", enabled, kw.get("max_entries"))))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: calls.append(("dump", path)))
    path = str(tmp_path / "snap.pickle")
    with pytest.raises(MemoryError):
        with record_history(path, max_entries=1000):
            raise MemoryError("simulated OOM")
    assert calls == [("record", "all", 1000), ("dump", path), ("record", None, None)]


def test_oom_observer_dumps_while_armed(monkeypatch, tmp_path):
    observers, dumps = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", observers.append, raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dumps.append)
    monkeypatch.setattr(memory_profiler, "_OOM_ATTACHED", False)
    monkeypatch.setattr(memory_profiler, "_OOM_PATHS", [])
    path = str(tmp_path / "oom.pickle")
    with oom_snapshot(path):
        with oom_snapshot(path + "2"):
            pass
        assert len(observers) == 1  # attached once per process
        with pytest.warns(RuntimeWarning, match="memory snapshot written"):
            observers[0](0, 2e9, 70e9, 1e6)
    assert dumps == [path]
    observers[0](0, 2e9, 70e9, 1e6)  # disarmed: no dump
    assert dumps == [path]


# ----------------------------------------------------------------------------- leaks
def _loop(leak: bool, steps: int = 9):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(32, 64)
    det = LeakDetector(warmup=2, window=20)
    losses = []
    with MemoryProfiler("cpu", baseline=[net]) as prof:
        for step in range(steps):
            with prof.step():
                out = net(x)
                loss = out.pow(2).mean()
                loss.backward()
            if leak:
                losses.append(loss)  # the classic: the tensor, with its graph, kept for logging
            else:
                losses.append(loss.item())
            det.update(step, mem_mb=prof.history[-1]["mem_allocated_mb"], graph_tensors=count_graph_tensors())
    return det.report()


def test_leaking_loop_is_flagged_and_the_list_named():
    rep = _loop(leak=True)
    assert rep is not None and "graph_tensors" in rep["flagged"]
    fit = rep["series"]["graph_tensors"]
    assert fit["slope"] == pytest.approx(1.0, abs=0.05) and fit["unit"] == "tensors/step"
    top = rep["holders"][0]
    assert top["type"] == "list" and top["graph_tensors"] >= 9 and top["name"].startswith("losses (local variable in _loop")


def test_clean_loop_is_not_flagged():
    assert _loop(leak=False) is None


def test_leak_detector_on_memory_series():
    det = LeakDetector(warmup=3, window=10)
    for s in range(20):
        det.update(s, mem_mb=100.0 + 2.0 * s + (0.5 if s % 2 else 0.0))
    rep = det.report()
    assert rep["flagged"] == ["mem_mb"] and rep["series"]["mem_mb"]["slope"] == pytest.approx(2.0, abs=0.1)
    flat = LeakDetector(warmup=3, window=10)
    for s in range(20):
        flat.update(s, mem_mb=100.0 + (0.5 if s % 2 else 0.0))  # oscillates, does not grow
    assert flat.report() is None
    with pytest.raises(ValueError):
        flat.update(21)


# ----------------------------------------------------------------------------- attention estimate
def test_attention_memory_at_448px():
    df = attention_memory("deit_tiny_patch16_224", 448, 4)
    B, H, L, N = 4, 3, 12, 785  # 28·28 patches + CLS
    assert (df.attrs["N"], df.attrs["H"], df.attrs["L"], df.attrs["k"]) == (N, H, L, 78)
    sa = B * H * N * N * 4 * L / 1e6
    assert df.loc["sa", "mb"] == pytest.approx(sa) and round(sa) == 355  # 354.9 MB of SA maps
    assert df.loc["glca", "mb"] == pytest.approx(B * H * 79 * N * 4 / 1e6)
    assert df.loc["pwca", "mb"] == pytest.approx(2 * sa)
    rollout = L * B * N * N * 4 / 1e6
    assert df.loc["rollout_maps", "mb"] == pytest.approx(rollout)
    assert df.loc["total_dcal", "mb"] == pytest.approx(3 * sa + df.loc["glca", "mb"] + rollout)
    assert df.loc["total_predecessor", "mb"] == pytest.approx(4 * sa + df.loc["glca", "mb"] + 2 * B * N * N * 4 / 1e6)
    explicit = attention_memory({"num_heads": 3, "depth": 12, "patch_size": 16}, 448, 4, dtype_bytes=2)
    assert explicit.loc["sa", "mb"] == pytest.approx(sa / 2)
    assert explicit.loc["rollout_maps", "mb"] == pytest.approx(rollout)  # fp32 regardless of dtype
    with pytest.raises(ValueError, match="missing dims"):
        attention_memory({"num_heads": 3}, 448, 4)


# ----------------------------------------------------------------------------- callback
class FakeTrainer:
    """The `dcal.callbacks` contract, in the order dcal.train.Trainer announces events."""

    def __init__(self, callbacks, accum=2):
        self.model, self.loss_fn = tiny_model(), dcal.UncertaintyLoss(3)
        self.optimizer = torch.optim.AdamW(dcal.param_groups(self.model, self.loss_fn), lr=1e-3)
        self.callbacks, self.accum, self.device = callbacks, accum, torch.device("cpu")
        self.step, self.history, self.logs, self.record, self.skip_step = 0, [], [], {}, False

    def emit(self, event):
        for cb in self.callbacks:
            getattr(cb, event)(self)

    def log(self, message):
        self.logs.append(message)

    def fit(self, steps):
        self.emit("before_fit")
        for _ in range(steps):
            for i in range(self.accum):
                x, y = batch(4, self.step * 10 + i)
                self.micro_step, self.batch = i, {"image": x, "label": y}
                self.emit("before_batch")
                out = self.model(x)
                self.branch_losses = {k: F.cross_entropy(getattr(out, f"{k}_logits"), y) for k in ("sa", "glca", "pwca")}
                self.loss = self.loss_fn(list(self.branch_losses.values()))
                self.emit("after_forward")
                self.emit("after_loss")
                (self.loss / self.accum).backward()
                self.emit("after_backward")
            self.emit("before_step")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.record = {"kind": "step", "step": self.step}
            self.emit("after_step")
            self.history.append(self.record)
        self.emit("after_fit")


def test_callback_writes_the_fields_every_step():
    cb = MemoryCallback(max_overhead=None)
    tr = FakeTrainer([cb])
    tr.fit(3)
    for r in tr.history:
        assert r["mem_source"] == "cpu-dispatch"
        assert r["mem_peak_mb"] >= r["mem_allocated_mb"] > 0
        assert r["mem_peak_forward_mb"] > 0 and r["mem_peak_backward_mb"] > 0 and r["mem_peak_optimizer_mb"] > 0
        assert "mem_reserved_mb" not in r  # no caching allocator on CPU: left out, not 0
    # parameters + AdamW state (2 moments) are counted from step 1 on
    n_params = sum(p.numel() for p in list(tr.model.parameters()) + list(tr.loss_fn.parameters()))
    assert tr.history[-1]["mem_allocated_mb"] >= 3 * n_params * 4 / 1e6
    assert _get_current_dispatch_mode() is None


def test_callback_samples_steps_on_cpu():
    cb = MemoryCallback()  # max_overhead=0.02: plain steps are timed, then one probe
    tr = FakeTrainer([cb], accum=1)
    tr.fit(6)
    measured = [r["step"] for r in tr.history if "mem_peak_mb" in r]
    assert measured == cb.measured_steps == [5]  # steps 2-4 timed (1 is warm-up), 5 probes, 6 follows a probe
    assert any("sampled" in m for m in tr.logs)
    assert _get_current_dispatch_mode() is None
