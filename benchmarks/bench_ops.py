"""The fused elementwise/normalisation ops against the best PyTorch alternatives, in the same process on
the same card: layernorm (F.layer_norm, torch.compile of the reference), qk_norm_rope_cache (the
transformers-style eager composition, torch.compile of the reference), bias_relu2 (eager, compiled).

Each candidate runs as a CUDA graph of back-to-back calls (the launch gaps of a captured step, no Python
overhead), rotating through enough input sets that L2 (50 MB on an H100) cannot serve a set again; the
time is the median of the graph replays divided by the calls. TB/s counts the fewest bytes the op must
move (inputs read once, outputs written once), beside a device-to-device copy measured in the same run
(bytes read + written). Inputs are random, never zeros. Before timing, our op is checked against the
fp32 reference.

    python benchmarks/bench_ops.py [--dtype float16|bfloat16] [--only layernorm,qk_norm_rope_cache,bias_relu2]
                                   [--no-compile]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from timing import copy_tbps, graph_ms_per_call

from persimmon_rt import ops, reference

EPS = 1e-5
L2_BYTES = 50 * 2**20
HEADS, HEAD_DIM, ROTARY_DIM, THETA = 64, 64, 32, 25000.0   # Persimmon-8B attention
HIDDEN, FFN = 4096, 16384


def graph_us_per_call(calls, reps: int = 30) -> float:
    """Median time of one call, in µs, in a captured graph that runs `calls` back to back."""
    return 1e3 * graph_ms_per_call(calls, reps)

def rotation(bytes_per_set: int, min_calls: int = 16) -> tuple[int, int]:
    """(input sets, calls per graph): sets covering 4x L2 (at most 64), calls a multiple of the sets."""
    n_sets = max(1, min(64, math.ceil(4 * L2_BYTES / bytes_per_set)))
    return n_sets, math.ceil(min_calls / n_sets) * n_sets


class Table:
    def __init__(self, title: str, gpu: str, copy: float):
        self.rows = []
        print(f"\n## {title} — {gpu}; device copy {copy:.2f} TB/s\n")
        print("| case | implementation | us / call | TB/s | % of copy | ours is x faster |")
        print("|---|---|---|---|---|---|")
        self.copy = copy

    def report(self, case: str, nbytes: int, times: dict[str, float]) -> None:
        ours = times["persimmon_rt"]
        for name, us in times.items():
            tbps = nbytes / us / 1e6
            ratio = "—" if name == "persimmon_rt" else f"{us / ours:.2f}"
            print(f"| {case} | {name} | {us:.2f} | {tbps:.2f} | {100 * tbps / self.copy:.0f} | {ratio} |")


def time_candidates(candidates: dict, sets: list, calls: int) -> dict[str, float]:
    """candidates: name -> (set -> closure). A candidate that fails (e.g. no Triton) is reported as NaN."""
    times = {}
    for name, make in candidates.items():
        try:
            times[name] = graph_us_per_call([make(sets[i % len(sets)]) for i in range(calls)])
        except Exception as err:  # noqa: BLE001 -- any compile/backend failure: report it, keep going
            print(f"<!-- {name} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} -->")
            times[name] = float("nan")
    return times


def check_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    tol = 2e-2 if out.dtype == torch.float16 else 8e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# ---- layernorm ----------------------------------------------------------------------------------------

def bench_layernorm(dtype, table: Table, compile_ref: bool) -> None:
    compiled = torch.compile(reference.layernorm, dynamic=False) if compile_ref else None
    w = (torch.randn(HIDDEN, device="cuda") * 0.2 + 1).to(dtype)
    b = (torch.randn(HIDDEN, device="cuda") * 0.1).to(dtype)
    for rows, residual in ((1, False), (1, True), (4096, False), (4096, True), (16384, False), (16384, True)):
        shape = (rows, HIDDEN)
        n_tensors = 4 if residual else 2
        nbytes = n_tensors * rows * HIDDEN * dtype.itemsize
        n_sets, calls = rotation(nbytes)
        sets = [[torch.randn(shape, device="cuda").to(dtype) for _ in range(n_tensors)] for _ in range(n_sets)]

        x, out, *rest = sets[0]
        ops.layernorm(x, w, b, out, EPS, *([rest[0], rest[1]] if residual else []))
        ref = torch.empty(shape, device="cuda")
        reference.layernorm((x.float() + rest[0].float()).to(dtype) if residual else x, w, b, ref, EPS)
        check_close(out, ref, f"layernorm {shape}" + (" + residual" if residual else ""))

        def ours(s):
            x, out, *rest = s
            return lambda: ops.layernorm(x, w, b, out, EPS, *rest)

        def eager(s):
            x, out, *rest = s
            if residual:
                return lambda: F.layer_norm(torch.add(x, rest[0], out=rest[1]), (HIDDEN,), w, b, EPS)
            return lambda: F.layer_norm(x, (HIDDEN,), w, b, EPS)

        def compiled_ref(s):
            x, out, *rest = s
            return lambda: compiled(x, w, b, out, EPS, *rest)

        candidates = {"persimmon_rt": ours, "F.layer_norm (eager)" + (" after x + residual" if residual else ""): eager}
        if compiled is not None:
            candidates["torch.compile(reference)"] = compiled_ref
        case = f"{rows} x {HIDDEN}" + (" + residual" if residual else "")
        table.report(case, nbytes, time_candidates(candidates, sets, calls))
        del sets


# ---- qk_norm_rope_cache -------------------------------------------------------------------------------

def eager_qk(qkv, positions, inv_freq, qw, qb, kw, kb, k_cache, v_cache, slots, q_out, eps):
    """What a transformers-style eager model does in the activation dtype: two LayerNorms, rotate-half
    on the rotary slice with cos/sin from the positions, and cache writes by index."""
    T, H, _, D = qkv.shape
    R = 2 * inv_freq.numel()
    q = F.layer_norm(qkv[:, :, 0], (D,), qw, qb, eps)
    k = F.layer_norm(qkv[:, :, 1], (D,), kw, kb, eps)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(qkv.dtype)[:, None], emb.sin().to(qkv.dtype)[:, None]

    def rope(x):
        x_rot = x[..., :R]
        rotated = torch.cat((-x_rot[..., R // 2:], x_rot[..., :R // 2]), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x[..., R:]), dim=-1)

    q_out.copy_(rope(q))
    k_cache.view(-1, H, D).index_copy_(0, slots, rope(k))
    v_cache.view(-1, H, D).index_copy_(0, slots, qkv[:, :, 2])


def bench_qk_norm_rope_cache(dtype, table: Table, compile_ref: bool) -> None:
    compiled = torch.compile(reference.qk_norm_rope_cache, dynamic=False) if compile_ref else None
    inv_freq = reference.rope_inv_freq(ROTARY_DIM, THETA, device="cuda")
    affine = [(torch.randn(HEAD_DIM, device="cuda") * 0.2 + m).to(dtype) for m in (1, 0, 1, 0)]
    for T in (1, 4096, 16384):
        unit = T * HEADS * HEAD_DIM * dtype.itemsize
        nbytes = 6 * unit   # q, k, v read; q_out, k, v written
        n_sets, calls = rotation(nbytes)
        cache_len = 16384   # one sequence; each set writes T slots of it
        k_cache = torch.randn(1, cache_len, HEADS, HEAD_DIM, device="cuda").to(dtype)
        v_cache = torch.randn_like(k_cache)
        sets = []
        for _ in range(n_sets):
            qkv = (torch.randn(T, HEADS * 3 * HEAD_DIM, device="cuda") * 2).to(dtype).view(T, HEADS, 3, HEAD_DIM)
            start = int(torch.randint(0, cache_len - T + 1, ()))
            positions = torch.arange(start, start + T, device="cuda")
            sets.append((qkv, positions, positions.clone(), torch.empty(T, HEADS, HEAD_DIM, device="cuda", dtype=dtype)))

        qkv, positions, slots, q_out = sets[0]
        ops.qk_norm_rope_cache(qkv, positions, inv_freq, *affine, k_cache, v_cache, slots, q_out, EPS)
        q_ref = torch.empty(q_out.shape, device="cuda")
        reference.qk_norm_rope_cache(qkv.float(), positions, inv_freq, *[a.float() for a in affine],
                                     torch.empty(k_cache.shape, device="cuda"), torch.empty(v_cache.shape, device="cuda"),
                                     slots, q_ref, EPS)
        check_close(q_out, q_ref, f"qk_norm_rope_cache T={T}")

        def make(fn):
            def closure(s):
                qkv, positions, slots, q_out = s
                return lambda: fn(qkv, positions, inv_freq, *affine, k_cache, v_cache, slots, q_out, EPS)
            return closure

        candidates = {"persimmon_rt": make(ops.qk_norm_rope_cache), "eager composition": make(eager_qk)}
        if compiled is not None:
            candidates["torch.compile(reference)"] = make(compiled)
        case = f"{T} tok x {HEADS} h x {HEAD_DIM} (rot {ROTARY_DIM})"
        table.report(case, nbytes, time_candidates(candidates, sets, calls))
        del sets


# ---- bias_relu2 ---------------------------------------------------------------------------------------

def bench_bias_relu2(dtype, table: Table, compile_ref: bool) -> None:
    compiled = torch.compile(reference.bias_relu2, dynamic=False) if compile_ref else None
    bias = torch.randn(FFN, device="cuda").to(dtype)
    for rows in (512, 4096):
        nbytes = 2 * rows * FFN * dtype.itemsize
        n_sets, calls = rotation(nbytes)
        sets = [((torch.randn(rows, FFN, device="cuda") * 4).to(dtype), torch.empty(rows, FFN, device="cuda", dtype=dtype))
                for _ in range(n_sets)]
        x, out = sets[0]
        ops.bias_relu2(x, bias, out)
        ref = torch.empty(x.shape, device="cuda")
        reference.bias_relu2(x, bias, ref)
        check_close(out, ref, f"bias_relu2 {rows} x {FFN}")

        candidates = {
            "persimmon_rt": lambda s: (lambda: ops.bias_relu2(s[0], bias, s[1])),
            "eager relu(x + b).square()": lambda s: (lambda: torch.relu(s[0] + bias).square()),
        }
        if compiled is not None:
            candidates["torch.compile(reference)"] = lambda s: (lambda: compiled(s[0], bias, s[1]))
        table.report(f"{rows} x {FFN}", nbytes, time_candidates(candidates, sets, calls))
        del sets


SECTIONS = {"layernorm": ("LayerNorm, hidden 4096", bench_layernorm),
            "qk_norm_rope_cache": ("QK-LayerNorm + rotary + KV-cache write", bench_qk_norm_rope_cache),
            "bias_relu2": ("bias + relu^2, 16384 features", bench_bias_relu2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile alternatives")
    args = parser.parse_args()
    if not ops.HAVE_CUDA_EXT or not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU and the built persimmon_rt._C")
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    copy = copy_tbps()
    print(f"# op benchmarks — {gpu}, torch {torch.__version__}, {args.dtype}")
    for key in args.only.split(","):
        title, bench = SECTIONS[key]
        bench(dtype, Table(f"{title}, {args.dtype}", gpu, copy), not args.no_compile)


if __name__ == "__main__":
    main()
