"""A decode layer's four GEMVs (QKV, dense, MLP-up + relu^2, MLP-down; one row; fp16 or int8 weights) for L
layers in one persistent kernel (benchmarks/persistent_chain.cuh), against the shipped decode_linear /
decode_linear_int8 launches captured in a CUDA graph (with programmatic dependent launch), on the same random
Persimmon-8B-shaped weights.

Development harness for the decode-step design, not a product path: it answers how fast the weights can
stream when the step has no kernel boundaries, and what the dependencies between ops cost. Each run checks
the chain's outputs against the shipped GEMVs first and says so when they differ. Needs an sm_90 GPU and nvcc
(the chain kernel is a small shared library built on first use, about 10 s).

    python benchmarks/bench_persistent_chain.py                      # variants 0-2, counter wait, 36 layers
    python benchmarks/bench_persistent_chain.py --poll-only --ring   # no completion counters; the ring alone
    python benchmarks/bench_persistent_chain.py --layers 4 --per-layer --trace
    python benchmarks/bench_persistent_chain.py --int8                # int8 weights (variants 3-4)
    python benchmarks/bench_persistent_chain.py --per-op --ring      # one launch per op (PDL), variant 5

A layer holds 402.65 MB of fp16 weights (201.3 MB int8); each result is printed with its rate, beside the
device-to-device copy rate and, with `--ring`, the rate of the weight ring alone.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import struct
import subprocess
import sys
import time

import torch

H, F, QKV = 4096, 16384, 12288
LAYER_BYTES = 2 * (QKV * H + H * H + F * H + H * F)
NAMES = ("qkv", "dense", "up", "down")
RING_ONLY, COUNTER_WAIT, PDL = 1, 2, 4  # persistent_chain.cuh's Flags


class ChainLibrary:
    """benchmarks/persistent_chain.cu as a shared library (ctypes; no torch headers), built with nvcc on first
    use (about 10 s; or build it elsewhere and carry build/dev/libpersistent_chain.so)."""

    def __init__(self):
        here = os.path.dirname(os.path.abspath(__file__))
        root = os.path.normpath(os.path.join(here, ".."))
        path = os.path.join(root, "build", "dev", "libpersistent_chain.so")
        names = ("persistent_chain.cu", "persistent_chain.cuh", "bulk_copy.cuh")
        sources = [os.path.join(here, name) for name in names]
        if not os.path.exists(path) or os.path.getmtime(path) < max(os.path.getmtime(f) for f in sources):
            nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            t0 = time.time()
            subprocess.run([nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                            "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC", "-shared", "-cudart",
                            "shared", f"-I{here}", f"-I{os.path.join(root, 'csrc')}", "-o", path, sources[0]],
                           check=True)
            print(f"chain kernel built in {time.time() - t0:.0f} s", flush=True)
        lib = ctypes.CDLL(path)
        lib.chain_run.restype = ctypes.c_int
        lib.chain_run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_void_p]
        lib.chain_variant.argtypes = [ctypes.c_int] + [ctypes.POINTER(ctypes.c_int)] * 4
        lib.chain_error_string.restype = ctypes.c_char_p
        self.lib = lib
        self.desc_bytes = lib.chain_desc_bytes()
        lib.chain_encode_map.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                                         ctypes.c_int]
        self.variants = []  # (page k, pages a unit, int8 weights, weight layout: 0 packed, 1 tensor maps)
        for v in range(lib.chain_num_variants()):
            fields = [ctypes.c_int() for _ in range(4)]
            lib.chain_variant(v, *(ctypes.byref(f) for f in fields))
            page_k, chunk_pages, int8, layout = (f.value for f in fields)
            self.variants.append((page_k, chunk_pages, bool(int8), layout))

    def tensor_map(self, w: torch.Tensor) -> bytes:
        out = ctypes.create_string_buffer(128)
        err = self.lib.chain_encode_map(out, w.data_ptr(), w.shape[0], w.shape[1], w.element_size())
        if err:
            raise RuntimeError(f"cuTensorMapEncodeTiled: CUresult {err}")
        return out.raw

    def run(self, descs, n_ops, counters, reset, blocks, variant, flags, trace):
        err = self.lib.chain_run(descs.data_ptr(), n_ops, counters.data_ptr(), counters.numel(), reset.data_ptr(),
                                 reset.numel(), blocks, variant, flags, trace.data_ptr() if trace is not None else None,
                                 torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"chain_run: {self.lib.chain_error_string(err).decode()}")


def pack(w: torch.Tensor, page_k: int) -> torch.Tensor:
    """[N, K] -> pages of 16 rows x page_k, each in mma.sync A-fragment order:
    [tile][k page][k step][lane = 4 g + q][kh][rh][e] for row 16 tile + 8 rh + g, k = page + 16 step + 8 kh + 2 q + e."""
    n, k = w.shape
    return w.view(n // 16, 2, 8, k // page_k, page_k // 16, 2, 4, 2).permute(0, 3, 4, 2, 6, 5, 1, 7).contiguous()


def graph_time_us(fn, reps: int = 15) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[reps // 2]


def copy_tb_s() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3)
    return 2 * a.numel() / best / 1e12


def pack_int8(q: torch.Tensor, page_k: int) -> torch.Tensor:
    """int8 [N, K] -> pages of 16 rows x page_k bytes: [tile][k page][k step pair][lane][step][kh][rh][e], so that
    each 4-byte word holds rows g and g + 8 at two consecutive k (one mma A-fragment register pair)."""
    n, k = q.shape
    return (q.view(n // 16, 2, 8, k // page_k, page_k // 32, 2, 2, 4, 2).permute(0, 3, 4, 2, 7, 5, 6, 1, 8)
            .contiguous())


def random_layers(layers: int) -> list[dict]:
    out = []
    for _ in range(layers):
        layer = {}
        for name, n, k in (("qkv", QKV, H), ("dense", H, H), ("up", F, H), ("down", H, F)):
            gain = 0.1 if name in ("dense", "down") else 1.0  # keeps the residual stream bounded over 36 layers
            layer[name] = (torch.randn(n, k, device="cuda", dtype=torch.float16) * (gain * k ** -0.5),
                           torch.randn(n, device="cuda", dtype=torch.float16) * 0.1)
        out.append(layer)
    return out


class Shipped:
    """The same chain on the shipped decode_linear (or decode_linear_int8) op, one launch per GEMV."""

    def __init__(self, layers, h0, int8: bool):
        self.layers, self.int8 = layers, int8
        self.acts = [{key: torch.zeros(1, n, device="cuda", dtype=torch.float16)
                      for key, n in (("h", H), ("qkv", QKV), ("hid1", H), ("mlp", F))} for _ in range(len(layers) + 1)]
        self.acts[0]["h"].copy_(h0)

    def op(self, layer, name, x, residual, out, relu2):
        if self.int8:
            q, scale, bias = layer[name + "_int8"]
            torch.ops.persimmon_rt.decode_linear_int8(x, q, scale, bias, residual, out, relu2)
        else:
            torch.ops.persimmon_rt.decode_linear(x, *layer[name], residual, out, relu2, None, None, 1e-5)

    def __call__(self):
        for layer, a, nxt in zip(self.layers, self.acts, self.acts[1:]):
            self.op(layer, "qkv", a["h"], None, a["qkv"], False)
            self.op(layer, "dense", a["qkv"][:, :H], a["h"], a["hid1"], False)
            self.op(layer, "up", a["hid1"], None, a["mlp"], True)
            self.op(layer, "down", a["mlp"], a["hid1"], nxt["h"], False)


class Chain:
    """One variant of the persistent chain: packed weights, activations (one buffer, reset to the empty mark
    before every launch; the first layer's input apart), op descriptors and counters."""

    def __init__(self, lib: ChainLibrary, variant: int, layers, h0):
        self.lib, self.variant = lib, variant
        page_k, _, int8, layout = lib.variants[variant]
        L = len(layers)
        if layout:  # the weights as the engine keeps them, read through tensor maps
            self.packed = [{name: layer[name + "_int8"][0] if int8 else layer[name][0] for name in NAMES}
                           for layer in layers]
        elif int8:
            self.packed = [{name: pack_int8(layer[name + "_int8"][0], page_k) for name in NAMES} for layer in layers]
        else:
            self.packed = [{name: pack(layer[name][0], page_k) for name in NAMES} for layer in layers]
        sizes = {"qkv": QKV, "hid1": H, "mlp": F, "h": H}  # layer l's outputs; "h" is layer l + 1's input
        self.flat = torch.empty(L * sum(sizes.values()), device="cuda", dtype=torch.float16)
        self.acts = [{"h": h0.clone()}]
        offset = 0
        for _ in range(L):
            for key, n in sizes.items():
                view = self.flat[offset:offset + n].view(1, n)
                offset += n
                if key == "h":
                    self.acts.append({"h": view})
                else:
                    self.acts[-1][key] = view
        ops = []
        for l, layer in enumerate(layers):
            a, nxt = self.acts[l], self.acts[l + 1]
            ops += [("qkv", a["h"], None, a["qkv"]), ("dense", a["qkv"], a["h"], a["hid1"]),
                    ("up", a["hid1"], None, a["mlp"]), ("down", a["mlp"], a["hid1"], nxt["h"])]
        self.n_ops = len(ops)
        tiles = [out.shape[1] // 16 for _, _, _, out in ops]
        self.counters = torch.zeros(2 * self.n_ops + sum(tiles), dtype=torch.int32, device="cuda")
        self.partials = [torch.zeros(t * (F // page_k) * 16, dtype=torch.float32, device="cuda") for t in tiles]
        maps = b"".join(lib.tensor_map(self.packed[i // 4][name]) if layout else bytes(128)
                        for i, (name, _, _, _) in enumerate(ops))
        self.maps = torch.frombuffer(bytearray(maps), dtype=torch.uint8).to("cuda")  # 128 bytes each, aligned
        blob, tile_counter = bytearray(), 2 * self.n_ops
        for i, (name, x, residual, out) in enumerate(ops):
            weight, bias = layers[i // 4][name]
            scale = layers[i // 4][name + "_int8"][1].data_ptr() if int8 else 0
            blob += struct.pack("<QQQQQQQQQiiii", self.packed[i // 4][name].data_ptr(), scale, bias.data_ptr(),
                                x.data_ptr(),
                                residual.data_ptr() if residual is not None else 0, out.data_ptr(),
                                self.partials[i].data_ptr(), self.counters.data_ptr() + 4 * tile_counter,
                                self.maps.data_ptr() + 128 * i if layout else 0,
                                weight.shape[0], weight.shape[1], int(name == "up"),
                                int(name != "down"))  # MLP-down waits per K chunk, the others for all of x
            tile_counter += tiles[i]
        assert len(blob) == self.n_ops * lib.desc_bytes
        self.descs = torch.frombuffer(blob, dtype=torch.uint8).to("cuda")
        self.blocks = torch.cuda.get_device_properties(0).multi_processor_count

    def run(self, flags: int, trace: torch.Tensor | None = None):
        self.lib.run(self.descs, self.n_ops, self.counters, self.flat.view(torch.uint8), self.blocks, self.variant,
                     flags, trace)

    def trace(self, flags: int) -> str:
        if self.n_ops < 8:
            return "    (the trace compares consecutive layers: it needs two or more)"
        trace = torch.zeros(self.n_ops * self.blocks * 2, dtype=torch.int64, device="cuda")
        self.run(flags, trace)
        torch.cuda.synchronize()
        t = trace.view(self.n_ops, self.blocks, 2).cpu().double() / 1e3  # us
        staged, finished = t[:, :, 0], t[:, :, 1]
        op_done = finished.max(dim=1).values
        lines = []
        L = self.n_ops // 4
        for o, name in enumerate(NAMES):
            idx = [4 * l + o for l in range(2, L - 1)] or [4 * l + o for l in range(1, L)]
            span = sum((op_done[i] - op_done[i - 1]).item() for i in idx) / len(idx)
            seen = sum((staged[i][staged[i] > 0] - op_done[i - 1]).median().item() for i in idx) / len(idx)
            lines.append(f"    {name:6s} {span:6.2f} us from the previous op's last tile to its own; x first staged "
                         f"{seen:5.2f} us after the previous op's last tile (median over SMs)")
        return "\n".join(lines)


def compare(shipped: Shipped, chain: Chain, per_layer: bool) -> float:
    worst = 0.0
    L = len(shipped.layers)
    for l in range(L):
        errs = []
        for key, ref, got in (("qkv", shipped.acts[l]["qkv"], chain.acts[l]["qkv"]),
                              ("hid1", shipped.acts[l]["hid1"], chain.acts[l]["hid1"]),
                              ("mlp", shipped.acts[l]["mlp"], chain.acts[l]["mlp"]),
                              ("h", shipped.acts[l + 1]["h"], chain.acts[l + 1]["h"])):
            r, c = ref.float(), got.float()
            err = ((r - c).abs().max() / r.abs().max()).item() if c.isfinite().all() else float("inf")
            errs.append((key, err))
            worst = max(worst, err)
        if per_layer:
            print(f"    layer {l}: " + ", ".join(f"{k} {e:.1e}" for k, e in errs))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--variants", default=None,
                        help="chain configurations (persistent_chain.cu; default 0,1,2, or 3,4 with --int8)")
    parser.add_argument("--int8", action="store_true", help="int8 weights, per-row scales (the shipped scheme)")
    parser.add_argument("--poll-only", action="store_true",
                        help="no completion-counter wait: consumers poll x alone")
    parser.add_argument("--ring", action="store_true", help="also time the weight ring alone (no compute, no waits)")
    parser.add_argument("--per-layer", action="store_true", help="print each layer's errors")
    parser.add_argument("--trace", action="store_true", help="per-op timestamps of one launch")
    parser.add_argument("--per-op", action="store_true",
                        help="one launch per op with programmatic dependent launch (variants 5-6: two blocks an SM)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("needs an sm_90 GPU (the chain kernel uses bulk copies and mbarriers)")
        return 2
    importlib.import_module("persimmon_rt.ops")  # registers torch.ops.persimmon_rt

    lib = ChainLibrary()
    default = ("6" if args.int8 else "5") if args.per_op else ("3,4" if args.int8 else "0,1,2")
    variants = [int(v) for v in (args.variants or default).split(",")]
    if any(not 0 <= v < len(lib.variants) or lib.variants[v][2] != args.int8 for v in variants):
        parser.error(f"variants {[i for i, x in enumerate(lib.variants) if x[2] == args.int8]} run "
                     f"{'with' if args.int8 else 'without'} --int8")
    torch.manual_seed(0)
    layers = random_layers(args.layers)
    if args.int8:
        from persimmon_rt.quantization import quantize_int8

        for layer in layers:
            for name in NAMES:
                layer[name + "_int8"] = (*quantize_int8(layer[name][0]), layer[name][1])
    layer_bytes = LAYER_BYTES // 2 if args.int8 else LAYER_BYTES
    h0 = torch.randn(1, H, device="cuda", dtype=torch.float16)
    shipped = Shipped(layers, h0, args.int8)
    L = args.layers
    copy = copy_tb_s()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.2f} TB/s; {layer_bytes / 1e6:.2f} MB of weights a layer, "
          f"{layer_bytes / copy / 1e6:.2f} us at copy speed; {L} layers")
    t_shipped = graph_time_us(shipped)
    print(f"shipped GEMVs x 4: {t_shipped / L:.2f} us/layer ({layer_bytes / (t_shipped / L) / 1e6:.2f} TB/s)",
          flush=True)
    flags = PDL if args.per_op else 0 if args.poll_only else COUNTER_WAIT
    failed = False
    for v in variants:
        chain = Chain(lib, v, layers, h0)
        page_k, _, _, layout = lib.variants[v]
        kind = ("packed", "row-major, 256-element boxes")[layout]
        print(f"  variant {v}: page k {page_k}, {kind} weights, "
              f"{lib.lib.chain_blocks_per_sm(v)} block(s) an SM")
        if args.ring:
            t = graph_time_us(lambda: chain.run(RING_ONLY | (flags & PDL)))  # noqa: B023
            print(f"  variant {v}, the ring alone: {t / L:.2f} us/layer ({layer_bytes / (t / L) / 1e6:.2f} TB/s)")
        chain.run(flags)
        torch.cuda.synchronize()
        shipped()
        torch.cuda.synchronize()
        err = compare(shipped, chain, args.per_layer)
        ok = err < 1e-2  # fp32 sums in another order over 36 layers: ~3e-3
        failed |= not ok
        t = graph_time_us(lambda: chain.run(flags))  # noqa: B023
        mode = "one launch per op" if args.per_op else "polled x only" if args.poll_only else "counter wait"
        print(f"variant {v} ({mode}): {t / L:.2f} us/layer ({layer_bytes / (t / L) / 1e6:.2f} TB/s), "
              f"{t_shipped / t:.3f}x shipped; max relative error against shipped {err:.2e}"
              f"{'' if ok else '  WRONG RESULTS: the time means nothing'}", flush=True)
        if args.trace and not args.per_op:
            print(chain.trace(flags))
        chain = None  # frees the packed weights before the next variant's
        torch.cuda.empty_cache()
    t_again = graph_time_us(shipped)
    print(f"shipped again: {t_again / L:.2f} us/layer")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
