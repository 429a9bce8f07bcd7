"""The benchmark harness runs end to end on a tiny configuration (the benchmark itself is not a test)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder, not an installed package
from benchmarks.run import main  # noqa: E402


def test_benchmark_harness_runs_on_the_tiny_preset(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        assert main(["--preset", "tiny", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["torch"] == torch.__version__
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("train/tiny", "infer/tiny", "rollout/tiny", "rollout-share/tiny", "memory/tiny/dcal_vs_sa"):
        r = rows[name]
        assert r["ratio"]["q1"] <= r["ratio"]["median"] <= r["ratio"]["q3"], name
        assert r["a"]["median"] > 0 and r["b"]["median"] > 0, name
    assert rows["train/tiny"]["flop_ratio"] > 1.5  # DCAL ≈ 2× SA in FLOPs
    assert rows["rollout/tiny"]["flop_ratio"] < 1  # the chain is cheaper than the full product
    assert "TorchDispatchMode" in rows["memory/tiny/dcal_vs_sa"]["note"]
    table = capsys.readouterr().out
    assert "| measurement | A | B | B/A (median) |" in table and "train/tiny" in table
