"""Decode GEMV (torch.ops.persimmon_rt.decode_linear) against cuBLAS on the Persimmon-8B decode shapes.

Each row times, in the same process on the same card:
  ours      decode_linear with its fused epilogue
  cublas    F.linear alone (with bias where the layer has one): the GEMV cuBLAS picks
  cublas+e  the whole op unfused: F.linear, then the epilogue as the fastest separate ops there are
            (residual add; bias_relu2 of this package for MLP-up; the fp32 cast for lm_head)
Bytes = weight + x + bias + residual + out, so TB/s compares with the device-to-device copy (bytes read
plus written; eager `copy_` of 1 GiB, median of 20, as in bench_ops.py) measured in the same run.
Weights rotate over enough buffers (>= 256 MB together) that the 50 MB L2 cannot hold them.
Main timing ("graph"): a CUDA graph of `--launches` back-to-back calls, each on the next buffer (as in the
decode graph), replayed with CUDA events around it; median replay / launches. "1 call": one call alone
between two events, queued behind a GPU sleep so that host-side launch cost is excluded (launch latency,
ramp-up and tail of a lone kernel included); median.

    python benchmarks/bench_decode_linear.py [--rows 1 8] [--dtype float16]

Sweep mode (`--sweep`): the shapes as the engine's decode step uses them (with `--prologue`: QKV, MLP-up
and lm_head with the LayerNorm prologue, dense and MLP-down with the residual epilogue), every compiled tile configuration
(_C.DECODE_LINEAR_CONFIGS) that takes M rows, each checked against the fp32 reference and then timed in
the same graph method; beside them the per-shape default (config -1), cuBLAS F.linear alone and the copy
bandwidth. One compact table: pick the fastest config per shape and M into kShapeRules
(csrc/decode_linear.cu). Run it twice, with PERSIMMON_RT_PDL=0 and without, to see what the
programmatic dependent launch is worth.

    python benchmarks/bench_decode_linear.py --sweep [--rows 1 8 16] [--tp 2] [--fold | --prologue]

With --fold the sweep takes QKV, MLP-up and lm_head with their LayerNorm folded in
(decode_linear_folded_ln, as the engine's one-GPU decode calls them).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from persimmon_rt import ops, reference  # ops imports the extension (registers torch.ops.persimmon_rt)
from persimmon_rt.folded_layernorm import fold_layernorm
from timing import median_ms

# name: (N, K, bias, residual, relu2, fp32 out)
SHAPES = {
    "qkv 12288x4096": (12288, 4096, True, False, False, False),
    "dense 4096x4096": (4096, 4096, True, True, False, False),
    "mlp_up 16384x4096": (16384, 4096, True, False, True, False),
    "mlp_down 4096x16384": (4096, 16384, True, True, False, False),
    "lm_head 262144x4096": (262144, 4096, False, False, False, True),
}
ROTATE_BYTES = 256 << 20


def time_graph(fn, launches: int, reps: int) -> float:
    """Median seconds per call of fn(i), from replays of a graph of `launches` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):  # warm-up (cuBLAS handles, workspaces) outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return statistics.median(times)


def time_single(fn, reps: int) -> float:
    """Median seconds of one call fn(i) alone, queued behind a GPU sleep (no host overhead inside)."""
    fn(0)
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(200_000)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(reps: int) -> tuple[float, float]:
    """(eager, graph-captured) device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    eager = median_ms(lambda: dst.copy_(src), reps=20, warmup=1) / 1e3
    graph = time_graph(lambda i: dst.copy_(src), 8, reps)
    return 2 * src.numel() / eager, 2 * src.numel() / graph


def bench_shape(name, M, dtype, launches, reps):
    N, K, has_bias, has_res, relu2, fp32_out = SHAPES[name]
    dev = "cuda"
    w_bytes = N * K * dtype.itemsize
    nbuf = max(2, -(-ROTATE_BYTES // w_bytes))
    weights = [torch.randn(N, K, device=dev, dtype=dtype).mul_(K ** -0.5) for _ in range(nbuf)]
    x = torch.randn(M, K, device=dev, dtype=dtype)
    bias = torch.randn(N, device=dev, dtype=dtype) if has_bias else None
    residual = torch.randn(M, N, device=dev, dtype=dtype) if has_res else None
    out_dtype = torch.float32 if fp32_out else dtype
    out = torch.empty(M, N, device=dev, dtype=out_dtype)
    op = torch.ops.persimmon_rt

    def ours(i):
        op.decode_linear(x, weights[i % nbuf], bias, residual, out, relu2)

    def cublas(i):
        return F.linear(x, weights[i % nbuf], bias)

    def cublas_epilogue(i):
        w = weights[i % nbuf]
        if relu2:  # cuBLAS without bias, then the fused bias + relu^2 kernel
            op.bias_relu2(F.linear(x, w), bias, out)
        elif has_res:
            torch.add(F.linear(x, w, bias), residual, out=out)
        elif fp32_out:
            out.copy_(F.linear(x, w, bias))
        else:  # QKV: bias only, nothing to add to cuBLAS
            F.linear(x, w, bias)

    # Correctness before timing: ours against the unfused composition in fp32.
    ours(0)
    y = F.linear(x.float(), weights[0].float(), None if bias is None else bias.float())
    if relu2:
        y = torch.relu(y).square()
    if residual is not None:
        y = y + residual.float()
    err = ((out.float() - y).norm() / y.norm()).item()
    assert err < 1e-2, f"{name} M={M}: relative error {err:.2e}"

    n_launch = max(launches, nbuf)
    t_ours = time_graph(ours, n_launch, reps)
    t_cublas = time_graph(cublas, n_launch, reps)
    t_cublas_e = time_graph(cublas_epilogue, n_launch, reps)
    t_ours_1 = time_single(ours, reps)
    t_cublas_1 = time_single(cublas, reps)
    nbytes = (w_bytes + x.numel() * dtype.itemsize + (N * dtype.itemsize if has_bias else 0)
              + (M * N * dtype.itemsize if has_res else 0) + M * N * out_dtype.itemsize)
    weights.clear()
    return nbytes, t_ours, t_cublas, t_cublas_e, t_ours_1, t_cublas_1


# name: (N, K, bias, residual, relu2, fp32 out, LN prologue): the decode step's calls as the engine makes
# them, and (--prologue) as a step with the LayerNorms and residual adds folded into the GEMVs would.
SWEEP_SHAPES = {
    "qkv": (12288, 4096, True, False, False, False, False),
    "dense": (4096, 4096, True, False, False, False, False),
    "up+relu2": (16384, 4096, True, False, True, False, False),
    "down": (4096, 16384, True, False, False, False, False),
    "lm_head": (262144, 4096, False, False, False, True, False),
}
PROLOGUE_SHAPES = {
    "qkv+LN": (12288, 4096, True, False, False, False, True),
    "dense+res": (4096, 4096, True, True, False, False, False),
    "up+LN+relu2": (16384, 4096, True, False, True, False, True),
    "down+res": (4096, 16384, True, True, False, False, False),
    "lm_head+LN": (262144, 4096, False, False, False, True, True),
}


# The projections after a LayerNorm with it folded in (decode_linear_folded_ln, the engine's one-GPU decode).
FOLD_SHAPES = {
    "qkv+fold": (12288, 4096, True, False, False, False, True),
    "up+fold+relu2": (16384, 4096, True, False, True, False, True),
    "lm_head+fold": (262144, 4096, False, False, False, True, True),
}


# Which dim of each shape a tensor-parallel rank holds 1/tp of (sharding.py): column-parallel N, row-parallel K.
TP_SPLIT = {"qkv": "N", "dense": "K", "up+relu2": "N", "down": "K", "lm_head": "N", "qkv+LN": "N",
            "dense+res": "K", "up+LN+relu2": "N", "down+res": "K", "lm_head+LN": "N", "qkv+fold": "N",
            "up+fold+relu2": "N", "lm_head+fold": "N"}


def sweep_shape(name, M, dtype, launches, reps, tp=1):
    """{config: seconds per call} for config -1 (default) and every config taking M rows, plus cuBLAS; the
    shape one rank of a `tp`-way tensor-parallel group runs."""
    N, K, has_bias, has_res, relu2, fp32_out, ln = {**SWEEP_SHAPES, **PROLOGUE_SHAPES, **FOLD_SHAPES}[name]
    fold = name in FOLD_SHAPES
    N, K = (N // tp, K) if TP_SPLIT[name] == "N" else (N, K // tp)
    dev = "cuda"
    w_bytes = N * K * dtype.itemsize
    nbuf = max(2, -(-ROTATE_BYTES // w_bytes))
    weights = [torch.randn(N, K, device=dev, dtype=dtype).mul_(K ** -0.5) for _ in range(nbuf)]
    x = torch.randn(M, K, device=dev, dtype=dtype).mul_(2).add_(0.5)
    bias = torch.randn(N, device=dev, dtype=dtype) if has_bias else None
    residual = torch.randn(M, N, device=dev, dtype=dtype) if has_res else None
    ln_w = (1 + 0.2 * torch.randn(K, device=dev)).to(dtype) if ln else None
    ln_b = (0.2 * torch.randn(K, device=dev)).to(dtype) if ln else None
    out = torch.empty(M, N, device=dev, dtype=torch.float32 if fp32_out else dtype)
    op = torch.ops.persimmon_rt

    want = torch.empty(M, N, device=dev, dtype=torch.float32)
    reference.decode_linear(x.float(), weights[0].float(), None if bias is None else bias.float(),
                            None if residual is None else residual.float(), want, relu2,
                            None if ln_w is None else ln_w.float(), None if ln_b is None else ln_b.float(), 1e-5)
    configs = [-1] + [i for i, n in enumerate(ops.DECODE_LINEAR_CONFIGS) if int(n.split()[0][1:]) >= M]
    times = {}
    n_launch = max(launches, nbuf)
    # Every rotated weight stands for the first here: the fold's constants are those of weights[0] (the time
    # does not depend on their values).
    f = fold_layernorm(weights[0], ln_w, ln_b, bias) if fold else None
    for config in configs:
        def call(i, config=config):
            if fold:
                op.decode_linear_folded_ln(x, weights[i % nbuf], f.ln_weight, f.scale, f.shift, residual, out, relu2,
                                           1e-5, f.unscale, config)
            else:
                op.decode_linear(x, weights[i % nbuf], bias, residual, out, relu2, ln_w, ln_b, 1e-5, config)
        call(0)
        err = ((out.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{name} M={M} config {config}: relative error {err:.2e}"
        times[config] = time_graph(call, n_launch, reps)
    times["cublas"] = time_graph(lambda i: F.linear(x, weights[i % nbuf], bias), n_launch, reps)
    weights.clear()
    return w_bytes, times


def run_sweep(args, dtype):
    copy_bps, _ = copy_bandwidth(args.reps)
    gpu = torch.cuda.get_device_name()
    names = ops.DECODE_LINEAR_CONFIGS
    print(f"{gpu}, torch {torch.__version__}, {args.dtype}, one rank of TP={args.tp}; copy {copy_bps / 1e12:.3f} TB/s; "
          f"configs: " + "; ".join(f"{i}: {n}" for i, n in enumerate(names)))
    header = ("| shape | M | best | best us | best % copy | default us | default % copy | cuBLAS us | "
              + " | ".join(f"c{i} us" for i in range(len(names))) + " |")
    lines = []
    for M in args.rows:
        for name in PROLOGUE_SHAPES if args.prologue else FOLD_SHAPES if args.fold else SWEEP_SHAPES:
            w_bytes, t = sweep_shape(name, M, dtype, args.launches, args.reps, args.tp)
            ours = {k: v for k, v in t.items() if isinstance(k, int) and k >= 0}
            best = min(ours, key=ours.get)
            pct = lambda s: 100 * w_bytes / s / copy_bps  # noqa: E731  (weight bytes only)
            cols = " | ".join(f"{ours[i] * 1e6:.1f}" if i in ours else "-" for i in range(len(names)))
            lines.append(f"| {name} | {M} | c{best} | {ours[best] * 1e6:.1f} | {pct(ours[best]):.1f} | "
                         f"{t[-1] * 1e6:.1f} | {pct(t[-1]):.1f} | {t['cublas'] * 1e6:.1f} | {cols} |")
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    print()
    print(f"{gpu}, PERSIMMON_RT_PDL={os.environ.get('PERSIMMON_RT_PDL', '1 (default)')}; "
          "% copy = weight bytes / time against the copy above")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for line in lines:
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="decode batch sizes M")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--launches", type=int, default=16, help="calls per captured graph")
    parser.add_argument("--reps", type=int, default=30, help="graph replays (median taken)")
    parser.add_argument("--sweep", action="store_true", help="time every tile configuration per shape")
    parser.add_argument("--tp", type=int, default=1, help="sweep the shapes of one rank of TP=N (default 1)")
    parser.add_argument("--prologue", action="store_true",
                        help="sweep the shapes with the LayerNorm prologue / residual epilogue (not the engine's)")
    parser.add_argument("--fold", action="store_true",
                        help="sweep QKV, MLP-up and lm_head with the LayerNorm folded in (the engine's decode)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.sweep:
        run_sweep(args, dtype)
        return

    copy_bps, copy_graph_bps = copy_bandwidth(args.reps)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, {args.dtype}; device-to-device copy {copy_bps / 1e12:.3f} TB/s "
          f"(eager copy_; inside a CUDA graph the same copy runs at {copy_graph_bps / 1e12:.3f} TB/s)")
    header = ("| GPU | shape | M | ours us | ours TB/s | % copy | cuBLAS us | cuBLAS TB/s | cuBLAS+epi us "
              "| x vs cuBLAS | x vs cuBLAS+epi | ours 1 call us | cuBLAS 1 call us | x (1 call) |")
    rows = []
    for M in args.rows:
        for name in SHAPES:
            nbytes, t_o, t_c, t_ce, t_o1, t_c1 = bench_shape(name, M, dtype, args.launches, args.reps)
            rows.append(f"| {gpu} | {name} | {M} | {t_o * 1e6:.1f} | {nbytes / t_o / 1e12:.3f} | "
                        f"{100 * nbytes / t_o / copy_bps:.1f} | {t_c * 1e6:.1f} | {nbytes / t_c / 1e12:.3f} | "
                        f"{t_ce * 1e6:.1f} | {t_c / t_o:.2f} | {t_ce / t_o:.2f} | {t_o1 * 1e6:.1f} | "
                        f"{t_c1 * 1e6:.1f} | {t_c1 / t_o1:.2f} |")
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    print()
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
