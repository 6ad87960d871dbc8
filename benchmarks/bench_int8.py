"""The int8 decode GEMV (torch.ops.persimmon_rt.decode_linear_int8) against the fp16 GEMV
(decode_linear) and cuBLAS on the Persimmon-8B decode shapes, and the prefill dequantization, all in one
process on one card, beside the device-to-device copy bandwidth measured in the same run.

Per shape and row count: microseconds per call (a CUDA graph of back-to-back calls, each on the next of
several weight buffers that together exceed the L2, so weights stream from HBM as in decode), the
int8 kernel's TB/s over its bytes (int8 weight + scales + x + bias + out) and that as a % of the copy,
and the speed-up over the fp16 GEMV. `--sweep` adds a column per compiled int8 tile configuration
(_C.DECODE_LINEAR_INT8_CONFIGS; fill kShapeRules in csrc/int8_linear.cu from it). The last lines time
dequantize_int8 (prefill's scratch copy) per shape in TB/s (1 byte read + 2 written per weight).

    python benchmarks/bench_int8.py [--rows 1 8] [--dtype float16] [--sweep]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from persimmon_rt import ops
from persimmon_rt.quantization import quantize_int8

from timing import copy_tbps, graph_ms_per_call

# name: (N, K, bias, relu2, fp32 out)
SHAPES = {
    "qkv 12288x4096": (12288, 4096, True, False, False),
    "dense 4096x4096": (4096, 4096, True, False, False),
    "mlp_up 16384x4096": (16384, 4096, True, True, False),
    "mlp_down 4096x16384": (4096, 16384, True, False, False),
    "lm_head 262144x4096": (262144, 4096, False, False, True),
}
ROTATE_BYTES = 256 << 20


def buffers(N: int, K: int, dtype) -> tuple[list, list]:
    """(fp16 weights, (int8, scale) pairs): enough copies to exceed ROTATE_BYTES of int8 each."""
    count = max(1, -(-ROTATE_BYTES // (N * K)))
    w16 = [torch.randn(N, K, device="cuda", dtype=dtype).mul_(K ** -0.5) for _ in range(min(count, 4))]
    w8 = [quantize_int8(w16[i % len(w16)]) for i in range(count)]
    if N * K * 2 * len(w16) < ROTATE_BYTES:      # fp16 needs as many as int8 to leave the L2 as well
        w16 = [w16[i % len(w16)].clone() for i in range(count)]
    return w16, w8


def time_shape(name: str, M: int, dtype, sweep: bool) -> dict:
    N, K, bias, relu2, fp32_out = SHAPES[name]
    w16, w8 = buffers(N, K, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
    out = torch.empty(M, N, device="cuda", dtype=torch.float32 if fp32_out else dtype)

    def int8_calls(config=-1):
        return [lambda q=q, s=s: torch.ops.persimmon_rt.decode_linear_int8(x, q, s, b, None, out, relu2, config)
                for q, s in w8]

    row = {"fp16": graph_ms_per_call([lambda w=w: ops.decode_linear(x, w, b, None, out, relu2) for w in w16]),
           "cublas": graph_ms_per_call([lambda w=w: F.linear(x, w, b) for w in w16]),
           "int8": graph_ms_per_call(int8_calls())}
    if sweep:
        for c, cname in enumerate(ops.DECODE_LINEAR_INT8_CONFIGS):
            if M <= int(cname.split()[0][1:]):
                row[f"c{c}"] = graph_ms_per_call(int8_calls(c))
    row["bytes"] = N * K + 4 * N + x.nbytes + (b.nbytes if bias else 0) + out.nbytes
    return row


def time_dequantize(name: str, dtype) -> float:
    N, K = SHAPES[name][:2]
    _, w8 = buffers(N, K, dtype)
    out = torch.empty(N, K, device="cuda", dtype=dtype)
    ms = graph_ms_per_call([lambda q=q, s=s: ops.dequantize_int8(q, s, out) for q, s in w8[:4]])
    return 3 * N * K / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--sweep", action="store_true", help="time every int8 tile configuration too")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    copy = copy_tbps()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, copy {copy:.2f} TB/s; us per call (graph of calls, "
          "weights rotated past L2)")
    configs = "".join(f" {'c' + str(c):>7s}" for c in range(len(ops.DECODE_LINEAR_INT8_CONFIGS))) if args.sweep else ""
    print(f"{'shape':22s} {'M':>2s} {'cublas':>8s} {'fp16':>8s} {'int8':>8s} {'TB/s':>6s} {'%copy':>6s} "
          f"{'x fp16':>7s}{configs}")
    for name in SHAPES:
        for M in args.rows:
            r = time_shape(name, M, dtype, args.sweep)
            tbps = r["bytes"] / r["int8"] / 1e9
            extra = "".join(f" {1e3 * r[f'c{c}']:7.1f}" if f"c{c}" in r else f" {'-':>7s}"
                            for c in range(len(ops.DECODE_LINEAR_INT8_CONFIGS))) if args.sweep else ""
            print(f"{name:22s} {M:2d} {1e3 * r['cublas']:8.1f} {1e3 * r['fp16']:8.1f} {1e3 * r['int8']:8.1f} "
                  f"{tbps:6.2f} {100 * tbps / copy:5.1f}% {r['fp16'] / r['int8']:6.2f}x{extra}")
            torch.cuda.empty_cache()
    for name in ("qkv 12288x4096", "mlp_down 4096x16384"):
        print(f"dequantize_int8 {name}: {time_dequantize(name, dtype):.2f} TB/s (1 B read + 2 B written per weight)")


if __name__ == "__main__":
    main()
