"""benchmarks/bench_serve.py --quick runs (demo model, CPU) and reports every figure the GPU run reports."""

import importlib.util
import json
import os
import sys

import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_serve.py")


def test_bench_serve_quick_smoke(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_serve", bench)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "serve.json"
        assert bench.main(["--quick", "--requests", "8", "--rates", "50,burst", "--prompt-range", "8,64",
                           "--output-range", "4,16", "--stream-tokens", "8", "--prefill-budget", "32,0",
                           "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "static waves of 8" in table and "target continuous_vs_static" in table
    assert result["bare"]["tokens_per_s"] > 0 and result["static"]["output_tokens"] == \
        sum(r["output_tokens"] for r in result["by_budget"][0]["runs"] if r["rate"] == "burst")
    for budget in result["by_budget"]:
        for run in budget["runs"]:
            assert run["output_tokens"] > 0 and run["ttft_p99_ms"] >= run["ttft_p50_ms"] > 0
            assert run["itl_p99_ms"] >= run["itl_p50_ms"] > 0 and run["tokens_per_s"] > 0
            assert "itl_running_prefill_p99_ms" in run
            assert run["itl_running_prefill_p99_ms"] is None or run["itl_running_prefill_p99_ms"] > 0
