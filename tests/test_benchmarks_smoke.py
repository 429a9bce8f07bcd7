"""The benchmark harness runs end to end on a tiny configuration (the benchmark itself is not a test)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
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
    assert result["machine"]["clock"] == "process CPU time" and result["machine"]["malloc"]  # said, not silent
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("train/tiny", "infer/tiny", "rollout/tiny", "rollout-share/tiny", "memory/tiny/dcal_vs_sa"):
        r = rows[name]
        assert r["ratio"]["q1"] <= r["ratio"]["median"] <= r["ratio"]["q3"], name
        assert r["a"]["median"] > 0 and r["b"]["median"] > 0, name
    for part in ("weights", "rollout", "glca"):  # the inference breakdown, stage by stage
        assert rows[f"infer-parts/tiny/{part}"]["b"]["median"] > 0
    assert "page faults" in rows["train/tiny"]["note"] or "warm-up" in rows["train/tiny"]["note"]
    assert rows["train/tiny"]["flop_ratio"] > 1.5  # DCAL ≈ 2× SA in FLOPs
    assert rows["rollout/tiny"]["flop_ratio"] < 1  # the chain is cheaper than the full product
    assert "TorchDispatchMode" in rows["memory/tiny/dcal_vs_sa"]["note"]
    watch = rows["watch/tiny"]  # diagnostics.watch on a hand-written loop, side by side with the plain loop
    assert watch["pairs"] >= 40 and watch["a"]["median"] > 0 and "watched steps" in watch["note"]
    assert rows["watch-amortised/tiny"]["target"] == 1.03
    table = capsys.readouterr().out
    assert "| measurement | A | B | B/A (median) |" in table and "train/tiny" in table


def test_only_runs_the_named_sections(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        assert main(["--preset", "tiny", "--only", "watch", "--out", str(out)]) == 0
        with pytest.raises(SystemExit):
            main(["--preset", "tiny", "--only", "trian"])
    finally:
        torch.set_num_threads(threads)
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["watch/tiny", "watch-amortised/tiny"]
    assert "unknown section(s) ['trian']" in capsys.readouterr().err


def test_inference_stages_run_what_predict_runs():
    """The breakdown's stages compute DCAL's SA logits, and the last stage is `DCAL.predict` itself."""
    from benchmarks.cases import CASES, inference_stages

    model = CASES["tiny"].build(torch.device("cpu")).eval()
    x, _ = CASES["tiny"].batch_on(torch.device("cpu"))
    stages = inference_stages(model, x)
    with torch.no_grad():
        ref = model(x)
        for name in ("weights", "rollout"):
            torch.testing.assert_close(stages[name](), ref.sa_logits)
        torch.testing.assert_close(stages["predict"](), model.predict(x))
        torch.testing.assert_close(stages["timm"](), ref.sa_logits, atol=1e-5, rtol=1e-4)
