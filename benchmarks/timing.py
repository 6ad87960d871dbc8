"""CUDA-event timing shared by the op benchmarks (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import statistics

import torch


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median of `reps` CUDA-event timings of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_tbps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written, in TB/s."""
    src = torch.randn(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / median_ms(lambda: dst.copy_(src), reps=20) / 1e9


def graph_ms_per_call(calls, reps: int = 20) -> float:
    """Median time of one call in a captured graph that runs `calls` (closures) back to back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up: compilation, autotuning, allocator pools
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_ms(graph.replay, reps) / len(calls)
