"""The int8 decode GEMV (torch.ops.persimmon_rt.decode_linear_int8) against the fp16 GEMV
(decode_linear) and cuBLAS on the Persimmon-8B decode shapes, and the prefill dequantization, all in one
process on one card, beside the device-to-device copy bandwidth measured in the same run.

Per shape and row count: microseconds per call (a CUDA graph of back-to-back calls, each on the next of
several weight buffers that together exceed the L2, so weights stream from HBM as in decode), the
int8 kernel's GB/s over its bytes (int8 weight + scales + x + bias + out) and that as a % of the copy,
and the speed-up over the fp16 GEMV. The last lines time dequantize_int8 (prefill's scratch copy).

`--fold` sweeps only the folded-LayerNorm op (decode_linear_int8_folded_ln) on QKV, MLP-up and lm_head.
`--sweep` times every compiled int8 configuration (_C.DECODE_LINEAR_INT8_CONFIGS) on every shape and row
count too, each checked against the fp32 reference first (one line per configuration: us, GB/s, % of
copy), then prints the best per shape: the kShapeRules table of csrc/int8_linear.cu to paste, and the same
picks as a PERSIMMON_RT_INT8_RULES value. `--end-to-end` then times the engine's decode (fp16 and int8
engines on the same random 8B weights, benchmarks/bench_generate.py) with the compiled table and, after
a sweep whose picks differ from it, again in a fresh process with the picks.

    python benchmarks/bench_int8.py [--rows 1 8] [--dtype float16] [--sweep | --fold] [--end-to-end]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from persimmon_rt import ops, reference
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
BENCH_GENERATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_generate.py")
END_TO_END = ["--quantize", "int8", "--batch", "1,8", "--context", "128", "--prefill", "", "--new-tokens", "64",
              "--transformers", ""]


def config_rows(name: str) -> int:
    """Most rows a configuration takes: its name starts with "m<rows> "."""
    return int(name.split()[0][1:])


def row_class(M: int) -> int:
    """Which column of a kShapeRules entry serves M rows: 0 (one row), 1 (2..8), 2 (9..16)."""
    return 0 if M == 1 else 1 if M <= 8 else 2


def buffers(N: int, K: int, dtype) -> tuple[list, list]:
    """(fp16 weights, (int8, scale) pairs): enough copies to exceed ROTATE_BYTES of int8 each."""
    count = max(1, -(-ROTATE_BYTES // (N * K)))
    w16 = [torch.randn(N, K, device="cuda", dtype=dtype).mul_(K ** -0.5) for _ in range(min(count, 4))]
    w8 = [quantize_int8(w16[i % len(w16)]) for i in range(count)]
    if N * K * 2 * len(w16) < ROTATE_BYTES:      # fp16 needs as many as int8 to leave the L2 as well
        w16 = [w16[i % len(w16)].clone() for i in range(count)]
    return w16, w8


def reference_and_error(x, q, s, b, relu2: bool, out_dtype) -> tuple[torch.Tensor, float]:
    """The fp32 reference, and the error of dequantize + F.linear in x's precision against it (the bound's
    base, as in tests/test_int8_cuda.py)."""
    ref = torch.empty(x.shape[0], q.shape[0], device="cuda")
    reference.decode_linear_int8(x.float(), q, s, None if b is None else b.float(), None, ref, relu2)
    y = F.linear(x, (q.float() * s[:, None]).to(x.dtype), b)
    lowp = (torch.relu(y).square() if relu2 else y).to(out_dtype)
    return ref, (lowp.double() - ref.double()).abs().max().item()


def check_config(x, q, s, b, out, relu2: bool, config: int, ref: torch.Tensor, base: float) -> None:
    """The configuration's output within twice the low-precision error of the fp32 reference: a wrong
    variant is never timed."""
    out.fill_(float("nan"))
    torch.ops.persimmon_rt.decode_linear_int8(x, q, s, b, None, out, relu2, config)
    err = (out.double() - ref.double()).abs().max().item()
    if not err <= 2 * base + 1e-5:
        raise AssertionError(f"config {config} ({ops.DECODE_LINEAR_INT8_CONFIGS[config]}): max error {err:.3g} "
                             f"> 2 x {base:.3g}")


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
           "int8": graph_ms_per_call(int8_calls()), "configs": {},
           "default": ops.decode_linear_int8_config(M, N, K)}
    if sweep:
        ref, base = reference_and_error(x, *w8[0], b, relu2, out.dtype)
    for c, cname in enumerate(ops.DECODE_LINEAR_INT8_CONFIGS if sweep else ()):
        if M <= config_rows(cname):
            check_config(x, *w8[0], b, out, relu2, c, ref, base)
            row["configs"][c] = graph_ms_per_call(int8_calls(c))
    if sweep:
        del ref
    row["bytes"] = N * K + 4 * N + x.nbytes + (b.nbytes if bias else 0) + out.nbytes
    return row


FOLDED = ("qkv 12288x4096", "mlp_up 16384x4096", "lm_head 262144x4096")   # the projections after a LayerNorm


def time_folded_shape(name: str, M: int, dtype) -> dict:
    """Every configuration of decode_linear_int8_folded_ln (the engine's decode passes with the LayerNorm folded
    in) on one shape, each checked against the fp32 reference first: {config: ms}, and the compiled choice."""
    N, K, _, relu2, fp32_out = SHAPES[name]
    _, w8 = buffers(N, K, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    ln_w = (torch.rand(K, device="cuda") + 0.5).to(dtype)
    fold_scale = torch.randn(N, device="cuda") * 0.1
    fold_shift = torch.randn(N, device="cuda") * 0.1
    out = torch.empty(M, N, device="cuda", dtype=torch.float32 if fp32_out else dtype)
    eps = 1e-5

    def calls(config):
        return [lambda q=q, s=s: torch.ops.persimmon_rt.decode_linear_int8_folded_ln(
            x, q, s, ln_w, fold_scale, fold_shift, None, out, relu2, eps, 1.0, config) for q, s in w8]

    ref = torch.empty(M, N, device="cuda")
    reference.decode_linear_int8_folded_ln(x, *w8[0], ln_w, fold_scale, fold_shift, None, ref, relu2, eps, 1.0)

    def error(config: int) -> float:
        out.fill_(float("nan"))
        calls(config)[0]()
        return (out.double() - ref.double()).abs().max().item()

    base = error(-1)
    row = {"configs": {}, "default": ops.decode_linear_int8_config(M, N, K, folded=True)}
    for c, cname in enumerate(ops.DECODE_LINEAR_INT8_CONFIGS):
        if M <= config_rows(cname):
            err = error(c)
            if not err <= 2 * base + 1e-5:
                raise AssertionError(f"folded config {c} ({cname}): max error {err:.3g} > 2 x {base:.3g}")
            row["configs"][c] = graph_ms_per_call(calls(c))
    return row


def print_folded_sweep(results: dict) -> None:
    names = ops.DECODE_LINEAR_INT8_CONFIGS
    print(f"\nint8 configurations with the folded LayerNorm, {torch.cuda.get_device_name()}: us per call")
    for (name, M), r in results.items():
        ranked = sorted(r["configs"].items(), key=lambda kv: kv[1])
        line = "  ".join(f"c{c} {1e3 * ms:.1f}{'*' if c == r['default'] else ''}" for c, ms in ranked)
        print(f"{name:22s} {M:2d}  {line}")
    print("(* the compiled choice; " + "; ".join(f"c{i}: {n}" for i, n in enumerate(names)) + ")")


def time_dequantize(name: str, dtype) -> float:
    N, K = SHAPES[name][:2]
    _, w8 = buffers(N, K, dtype)
    out = torch.empty(N, K, device="cuda", dtype=dtype)
    ms = graph_ms_per_call([lambda q=q, s=s: ops.dequantize_int8(q, s, out) for q, s in w8[:4]])
    return 3 * N * K / ms / 1e9


def print_sweep(results: dict, copy: float) -> dict:
    """Every configuration's line per (shape, M), then the best; returns {(N, K): [c1, c8, c16]} picks, starting
    from the compiled choices (row classes the sweep did not time keep theirs)."""
    gpu = torch.cuda.get_device_name()
    names = ops.DECODE_LINEAR_INT8_CONFIGS
    print(f"\nint8 configurations, {gpu}: us per call, GB/s, % of copy ({copy:.2f} TB/s)")
    print(f"{'shape':22s} {'M':>2s} {'config':34s} {'us':>8s} {'GB/s':>7s} {'%copy':>6s}")
    picks = {}
    summary = []
    for (name, M), r in results.items():
        N, K = SHAPES[name][:2]
        rule = picks.setdefault((N, K), [ops.decode_linear_int8_config(m, N, K) for m in (1, 8, 16)])
        for c, ms in sorted(r["configs"].items(), key=lambda kv: kv[1]):
            mark = " *" if c == r["default"] else ""
            gbs = r["bytes"] / ms / 1e6
            print(f"{name:22s} {M:2d} {f'c{c} {names[c]}':34s} {1e3 * ms:8.2f} {gbs:7.0f} {gbs / 1e3 / copy:6.1%}{mark}")
        best = min(r["configs"], key=r["configs"].get)
        rule[row_class(M)] = best
        gbs = r["bytes"] / r["configs"][best] / 1e6
        summary.append(f"{name:22s} {M:2d}  default c{r['default']} {1e3 * r['int8']:7.2f} us   best c{best} "
                       f"{1e3 * r['configs'][best]:7.2f} us ({gbs / 1e3 / copy:.1%} of copy)")
    print("\nbest per shape (* above: the compiled choice):")
    print("\n".join(summary))
    print("\nkShapeRules for csrc/int8_linear.cu ({n, k, config1, config8, config16}):")
    for (N, K), (c1, c8, c16) in picks.items():
        print(f"    {{{N}, {K}, {c1}, {c8}, {c16}}},")
    return picks


def rules_value(picks: dict) -> str:
    return ",".join(f"{N}:{K}:{c1}:{c8}:{c16}" for (N, K), (c1, c8, c16) in picks.items())


def end_to_end(picks: dict | None) -> None:
    """The engine's decode, fp16 and int8 on the same random 8B weights (bench_generate.py), with the compiled
    table; then, when the sweep's picks differ from it, in a fresh process that takes them."""
    sys.path.insert(0, os.path.dirname(BENCH_GENERATE))
    from generation import main as generation_main

    print("\nend to end, the compiled table:", flush=True)
    generation_main(END_TO_END)
    if not picks or all(rule == [ops.decode_linear_int8_config(m, N, K) for m in (1, 8, 16)]
                        for (N, K), rule in picks.items()):
        return
    gc.collect()
    torch.cuda.empty_cache()
    value = rules_value(picks)
    print(f"\nend to end, PERSIMMON_RT_INT8_RULES={value}:", flush=True)
    subprocess.run([sys.executable, BENCH_GENERATE, *END_TO_END], env={**os.environ, "PERSIMMON_RT_INT8_RULES": value},
                   check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--sweep", action="store_true", help="time every int8 configuration too; print the best")
    parser.add_argument("--fold", action="store_true",
                        help="only sweep the configurations with the folded LayerNorm (QKV, MLP-up, lm_head)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="then time the engine's decode (b=1, 8; ctx 128) with the compiled table and the picks")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    copy = copy_tbps()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, copy {copy:.2f} TB/s; us per call (graph of calls, "
          "weights rotated past L2)")
    print(f"{'shape':22s} {'M':>2s} {'cublas':>8s} {'fp16':>8s} {'int8':>8s} {'config':>6s} {'GB/s':>6s} {'%copy':>6s} "
          f"{'x fp16':>7s}")
    if args.fold:
        folded = {}
        for name in FOLDED:
            for M in args.rows:
                folded[name, M] = time_folded_shape(name, M, dtype)
                torch.cuda.empty_cache()
        print_folded_sweep(folded)
        return
    results = {}
    for name in SHAPES:
        for M in args.rows:
            r = results[name, M] = time_shape(name, M, dtype, args.sweep)
            gbs = r["bytes"] / r["int8"] / 1e6
            print(f"{name:22s} {M:2d} {1e3 * r['cublas']:8.1f} {1e3 * r['fp16']:8.1f} {1e3 * r['int8']:8.1f} "
                  f"{'c' + str(r['default']):>6s} {gbs:6.0f} {gbs / 1e3 / copy:6.1%} {r['fp16'] / r['int8']:6.2f}x",
                  flush=True)
            torch.cuda.empty_cache()
    for name in ("qkv 12288x4096", "mlp_down 4096x16384"):
        print(f"dequantize_int8 {name}: {time_dequantize(name, dtype):.2f} TB/s (1 B read + 2 B written per weight)")
    picks = print_sweep(results, copy) if args.sweep else None
    if picks:
        print(f"\nPERSIMMON_RT_INT8_RULES={rules_value(picks)}", flush=True)
    if args.end_to_end:
        results.clear()
        gc.collect()
        torch.cuda.empty_cache()
        end_to_end(picks)


if __name__ == "__main__":
    main()
