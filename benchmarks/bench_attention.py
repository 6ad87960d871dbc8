"""Attention kernels against SDPA's flash (FA2) and cuDNN backends, in the same process on the same card.

Prefill: causal, batch 1, 64 heads x 64 (or 32 x 128 with --head-dim 128), fp16; TFLOP/s with
FLOPs = 4 * T^2 * H * D / 2. Both of our
prefill kernels run, each asked for through PERSIMMON_RT_PREFILL_ATTENTION: wgmma (Hopper; shown as n/a
where the build or the GPU lacks it) and mma_sync.
Decode: one query per sequence, 64 heads x 64, fp16; TB/s on the K and V bytes read
(2 * B * L * H * D * 2), beside a device-to-device copy measured in the same run (bytes read + written).
Decode inputs rotate through enough cache copies that L2 (50 MB on an H100) cannot serve them, and each
candidate runs as a CUDA graph of back-to-back calls, so launch gaps are those of a captured decode step.
Times are medians of CUDA-event timings.

    python benchmarks/bench_attention.py [--dtype float16|bfloat16] [--only prefill|decode] [--head-dim 64|128]
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from timing import copy_tbps, graph_ms_per_call, median_ms

from persimmon_rt import ops

HEADS, HEAD_DIM = 64, 64   # --head-dim 128 makes them 32, 128 (the same model width)
SCALE = 1.0 / math.sqrt(HEAD_DIM)


def sdpa(backend, q, k, v, causal):
    """SDPA on [B, H, L, D] views of the [B, L, H, D] tensors the kernels use (same memory, same layout)."""
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, scale=SCALE)


ALTERNATIVES = {"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION}


PREFILL_KERNELS = ("wgmma", "mma_sync")
KERNEL_ENV = "PERSIMMON_RT_PREFILL_ATTENTION"


def prefill_kernel_available(name: str) -> bool:
    os.environ[KERNEL_ENV] = name
    return ops.attention_prefill_kernel_name(HEAD_DIM) == name


def bench_prefill(dtype, gpu: str) -> None:
    previous = os.environ.get(KERNEL_ENV)
    kernels = [k for k in PREFILL_KERNELS if prefill_kernel_available(k)]
    print(f"\n## prefill attention, causal, batch 1, {HEADS} heads x {HEAD_DIM}, {dtype} — {gpu}\n")
    print("TFLOP/s; ratios are ours / SDPA cuDNN; max |ours - SDPA flash| on the same inputs.\n")
    print("| tokens | wgmma ms | wgmma | mma_sync | SDPA flash | SDPA cuDNN | wgmma / cuDNN | mma_sync / cuDNN "
          "| max diff wgmma | max diff mma_sync |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for T in (2048, 4096, 8192, 16384):
        q = torch.randn(T, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        k = torch.randn(1, T, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        v = torch.randn(1, T, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        lens = torch.tensor([T], dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        flops = 4 * T * T * HEADS * HEAD_DIM / 2
        reps = max(10, int(2e13 / flops))

        def ours():
            torch.ops.persimmon_rt.attention_prefill(q, k, v, cu, lens, T, out, SCALE)

        tflops = {name: float("nan") for name in (*PREFILL_KERNELS, *ALTERNATIVES)}
        diffs = {name: float("nan") for name in PREFILL_KERNELS}
        flash = None
        for name, backend in ALTERNATIVES.items():
            try:
                alt = sdpa(backend, q[None], k, v, True)
                if name == "SDPA flash":
                    flash = alt.transpose(1, 2)[0].float()
                tflops[name] = flops / median_ms(lambda: sdpa(backend, q[None], k, v, True), reps) / 1e9
            except RuntimeError as err:   # backend unavailable for this shape / build
                print(f"<!-- {name} failed: {str(err).splitlines()[0]} -->")
        for name in kernels:   # the launcher reads the variable at every call
            os.environ[KERNEL_ENV] = name
            out.fill_(float("nan"))
            ours()
            if flash is not None:
                diffs[name] = (out.float() - flash).abs().max().item()
            tflops[name] = flops / median_ms(ours, reps) / 1e9
        cd = tflops["SDPA cuDNN"]
        print(f"| {T} | {flops / tflops['wgmma'] / 1e9:.3f} | {tflops['wgmma']:.0f} | {tflops['mma_sync']:.0f} "
              f"| {tflops['SDPA flash']:.0f} | {cd:.0f} | {tflops['wgmma'] / cd:.2f} | {tflops['mma_sync'] / cd:.2f} "
              f"| {diffs['wgmma']:.1e} | {diffs['mma_sync']:.1e} |")
    if "wgmma" not in kernels:
        print("\n(wgmma: n/a here; it needs an sm_90a build on a compute capability 9.0 GPU)")
    if previous is None:
        os.environ.pop(KERNEL_ENV, None)
    else:
        os.environ[KERNEL_ENV] = previous


def bench_decode(dtype, gpu: str, copy: float) -> None:
    print(f"\n## decode attention, {HEADS} heads x {HEAD_DIM}, {dtype} — {gpu}; copy {copy:.2f} TB/s\n")
    print("| batch | keys | KV MB | ours us | ours TB/s | % copy | SDPA flash TB/s | SDPA cuDNN TB/s "
          "| ours / flash | ours / cuDNN | max |ours - flash| |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, L in ((1, 2048), (1, 16384), (8, 2048)):
        kv_bytes = 2 * B * L * HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8
        n_sets = max(2, math.ceil(400e6 / kv_bytes))   # > 8x L2 in total
        sets = []
        for _ in range(n_sets):
            sets.append((torch.randn(B, HEADS, HEAD_DIM, device="cuda", dtype=dtype),
                         torch.randn(B, L, HEADS, HEAD_DIM, device="cuda", dtype=dtype),
                         torch.randn(B, L, HEADS, HEAD_DIM, device="cuda", dtype=dtype),
                         torch.empty(B, HEADS, HEAD_DIM, device="cuda", dtype=dtype)))
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        calls_per_graph = math.ceil(48 / n_sets) * n_sets   # amortise the graph launch itself

        def ours_call(s):
            q, k, v, out = s
            return lambda: torch.ops.persimmon_rt.attention_decode(q, k, v, lens, out, SCALE)

        def sdpa_call(backend, s):
            q, k, v, _ = s
            return lambda: sdpa(backend, q[:, None], k, v, False)

        rows = [sets[i % n_sets] for i in range(calls_per_graph)]
        tbps = {"ours": kv_bytes / graph_ms_per_call([ours_call(s) for s in rows]) / 1e9}
        diff = float("nan")
        for name, backend in ALTERNATIVES.items():
            try:
                if name == "SDPA flash":
                    q, k, v, out = sets[0]
                    ours_call(sets[0])()
                    want = sdpa(backend, q[:, None], k, v, False)[:, :, 0]   # [B, H, D]
                    diff = (out.float() - want.float()).abs().max().item()
                tbps[name] = kv_bytes / graph_ms_per_call([sdpa_call(backend, s) for s in rows]) / 1e9
            except RuntimeError as err:
                print(f"<!-- {name} failed: {str(err).splitlines()[0]} -->")
                tbps[name] = float("nan")
        us = kv_bytes / tbps["ours"] / 1e6
        fl, cd = tbps["SDPA flash"], tbps["SDPA cuDNN"]
        print(f"| {B} | {L} | {kv_bytes / 1e6:.1f} | {us:.1f} | {tbps['ours']:.2f} | {100 * tbps['ours'] / copy:.0f} "
              f"| {fl:.2f} | {cd:.2f} | {tbps['ours'] / fl:.2f} | {tbps['ours'] / cd:.2f} | {diff:.1e} |")
        del sets, rows
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--only", choices=["prefill", "decode"], help="run one section")
    parser.add_argument("--head-dim", type=int, default=64, choices=[64, 128],
                        help="head_dim (heads = 4096 / head_dim)")
    args = parser.parse_args()
    global HEADS, HEAD_DIM, SCALE
    HEADS, HEAD_DIM, SCALE = 4096 // args.head_dim, args.head_dim, 1.0 / math.sqrt(args.head_dim)
    if not ops.HAVE_CUDA_EXT or not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU and the built persimmon_rt._C")
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    print(f"# attention benchmarks — {gpu}, torch {torch.__version__}")
    if args.only != "decode":
        bench_prefill(dtype, gpu)
    if args.only != "prefill":
        bench_decode(dtype, gpu, copy_tbps())


if __name__ == "__main__":
    main()
