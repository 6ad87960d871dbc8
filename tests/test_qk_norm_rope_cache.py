"""qk_norm_rope_cache: QK-LayerNorm + NeoX partial rotary + KV-cache write from the head-major QKV.

CPU tests check the fp32 reference (through ops.py) against an independent transformers-style
formulation. CUDA tests check the kernel against the reference in fp32, with the error bound derived
from plain PyTorch doing the same in the low precision; outputs and caches start as NaN so an unwritten
element fails, and cache slots outside slot_mapping must stay NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from persimmon_rt import ops, reference

from op_utils import capture_graph, check_against_fp32, qk_layernorm_params, requires_cuda

EPS = 1e-5          # Persimmon's layer_norm_eps
THETA = 25000.0     # Persimmon's rope_theta
BATCH = 3           # cache rows; slots are spread over all of them


class Case:
    """Fresh random inputs for one call. The qkv is a [T, H, 3, D] view of a [T, H*3*D (+pad)] projection."""

    def __init__(self, T, H, D, R, dtype, device, *, strided=True, index_dtype=torch.int64, layernorm=True,
                 with_bias=True, max_position=16384):
        width = H * 3 * D
        pad = 8 if strided else 0   # a padded projection row gives qkv a token stride != H*3*D
        proj = (torch.randn(T, width + pad, device=device) * 2 + 0.5).to(dtype)
        self.qkv = proj[:, :width].view(T, H, 3, D)
        self.positions = torch.randint(0, max_position, (T,), device=device, dtype=index_dtype)
        self.inv_freq = reference.rope_inv_freq(R, THETA, device=device)
        self.q_weight, self.k_weight, self.q_bias, self.k_bias = qk_layernorm_params(D, dtype, device, layernorm,
                                                                                     with_bias)
        self.S = math.ceil(T / BATCH) + 5
        self.slots = torch.randperm(BATCH * self.S, device=device)[:T].to(index_dtype)
        self.shape = (T, H, D)

    def weights(self, cast=lambda t: t):
        return [None if w is None else cast(w) for w in (self.q_weight, self.q_bias, self.k_weight, self.k_bias)]

    def outputs(self, dtype):
        """NaN-poisoned q_out, k_cache, v_cache."""
        T, H, D = self.shape
        return (torch.full((T, H, D), float("nan"), dtype=dtype, device=self.qkv.device),
                torch.full((BATCH, self.S, H, D), float("nan"), dtype=dtype, device=self.qkv.device),
                torch.full((BATCH, self.S, H, D), float("nan"), dtype=dtype, device=self.qkv.device))

    def run(self, fn, dtype, qkv=None):
        q_out, k_cache, v_cache = self.outputs(dtype)
        qkv = self.qkv if qkv is None else qkv
        weights = self.weights(lambda w: w.to(dtype))
        fn(qkv, self.positions, self.inv_freq, *weights, k_cache, v_cache, self.slots, q_out, EPS)
        return q_out, k_cache, v_cache

    def fp32_reference(self):
        return self.run(reference.qk_norm_rope_cache, torch.float32, self.qkv.float())

    def lowp_reference(self):
        """The same computation in plain PyTorch in the inputs' dtype: the error baseline."""
        q, k = self.qkv[:, :, 0], self.qkv[:, :, 1]
        D, R = self.shape[2], 2 * self.inv_freq.numel()
        if self.q_weight is not None:
            q = F.layer_norm(q, (D,), self.q_weight, self.q_bias, EPS)
            k = F.layer_norm(k, (D,), self.k_weight, self.k_bias, EPS)
        angles = self.positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos().to(q.dtype)[:, None, :], angles.sin().to(q.dtype)[:, None, :]

        def rope(x):
            x1, x2, rest = x[..., :R // 2], x[..., R // 2:R], x[..., R:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

        return rope(q), rope(k)


def hf_style(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, eps):
    """Independent formulation in transformers' style: LayerNorm module math, cos/sin of the duplicated
    frequencies, rotate_half on the rotary slice, pass-through of the rest."""
    T, H, _, D = qkv.shape
    R = 2 * inv_freq.numel()
    q, k = qkv[:, :, 0].float(), qkv[:, :, 1].float()
    if q_weight is not None:
        q = F.layer_norm(q, (D,), q_weight.float(), None if q_bias is None else q_bias.float(), eps)
        k = F.layer_norm(k, (D,), k_weight.float(), None if k_bias is None else k_bias.float(), eps)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)     # [T, 1, R]

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def apply(x):
        x_rot, x_pass = x[..., :R], x[..., R:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)

    return apply(q), apply(k), qkv[:, :, 2].float()


# ---- CPU: the reference against the independent formulation ------------------------------------------

@pytest.mark.parametrize("T,H,D,R,layernorm", [(5, 4, 64, 32, True), (3, 2, 80, 16, True), (4, 3, 32, 32, False),
                                               (2, 2, 24, 0, True), (6, 1, 48, 24, True)])
def test_reference_matches_transformers_style(T, H, D, R, layernorm):
    case = Case(T, H, D, R, torch.float32, "cpu", layernorm=layernorm)
    q_out, k_cache, v_cache = case.run(ops.qk_norm_rope_cache, torch.float32)
    q_hf, k_hf, v_hf = hf_style(case.qkv, case.positions, case.inv_freq, *case.weights(), EPS)
    slots = case.slots.long()
    torch.testing.assert_close(q_out, q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache.view(-1, H, D)[slots], k_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache.view(-1, H, D)[slots], v_hf, rtol=0, atol=0)


def test_reference_leaves_other_slots_alone():
    case = Case(4, 2, 16, 8, torch.float32, "cpu")
    _, k_cache, v_cache = case.run(ops.qk_norm_rope_cache, torch.float32)
    untouched = torch.ones(BATCH * case.S, dtype=torch.bool)
    untouched[case.slots.long()] = False
    assert k_cache.view(BATCH * case.S, -1)[untouched].isnan().all()
    assert v_cache.view(BATCH * case.S, -1)[untouched].isnan().all()


# ---- CUDA: the kernel against the fp32 reference --------------------------------------------------------

def check_kernel(case: Case, dtype):
    q_out, k_cache, v_cache = case.run(torch.ops.persimmon_rt.qk_norm_rope_cache, dtype)
    q_ref, k_ref, _ = case.fp32_reference()
    q_low, k_low = case.lowp_reference()
    T, H, D = case.shape
    slots = case.slots.long()
    flat = lambda c: c.view(BATCH * case.S, H, D)  # noqa: E731
    check_against_fp32(q_out, q_ref, q_low, what="q_out")
    check_against_fp32(flat(k_cache)[slots], flat(k_ref)[slots], k_low, what="k_cache")
    assert torch.equal(flat(v_cache)[slots], case.qkv[:, :, 2]), "v_cache must be an exact copy of v"
    untouched = torch.ones(BATCH * case.S, dtype=torch.bool, device=slots.device)
    untouched[slots] = False
    assert flat(k_cache)[untouched].isnan().all() and flat(v_cache)[untouched].isnan().all(), \
        "cache slots outside slot_mapping were written"


DTYPES = [torch.float16, torch.bfloat16]

# (T, H, D, R): Persimmon-8B (64/32) at the token counts that matter, then other head/rotary dims,
# including R/2 not a multiple of 8 (96/24), full rotary (256/256), the smallest head (8/2), no rotary.
SHAPES = [(1, 64, 64, 32), (7, 64, 64, 32), (83, 64, 64, 32), (4096, 64, 64, 32), (7, 32, 128, 64),
          (83, 32, 128, 64), (4099, 8, 128, 64), (83, 8, 80, 16), (7, 4, 256, 256), (83, 5, 256, 256),
          (83, 5, 96, 24), (7, 3, 8, 2), (83, 16, 64, 0), (7, 2, 40, 40)]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H,D,R", SHAPES)
def test_kernel_matches_reference(T, H, D, R, dtype):
    index_dtype = torch.int32 if (T + D) % 2 else torch.int64
    check_kernel(Case(T, H, D, R, dtype, "cuda", index_dtype=index_dtype), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["contiguous", "no_layernorm", "no_bias", "int32", "small_positions"])
def test_kernel_variants(variant, dtype):
    kwargs = {"contiguous": dict(strided=False), "no_layernorm": dict(layernorm=False),
              "no_bias": dict(with_bias=False), "int32": dict(index_dtype=torch.int32),
              "small_positions": dict(max_position=64)}[variant]
    check_kernel(Case(83, 64, 64, 32, dtype, "cuda", **kwargs), dtype)


@requires_cuda
def test_cuda_graph_replay_follows_device_tensors():
    dtype = torch.float16
    case = Case(7, 64, 64, 32, dtype, "cuda")
    q_out, k_cache, v_cache = case.outputs(dtype)
    weights = case.weights()
    op = lambda: torch.ops.persimmon_rt.qk_norm_rope_cache(  # noqa: E731
        case.qkv, case.positions, case.inv_freq, *weights, k_cache, v_cache, case.slots, q_out, EPS)
    graph = capture_graph(op)
    for _ in range(2):
        # New positions, slots and activations in the same device tensors; the replay must use them.
        fresh = Case(7, 64, 64, 32, dtype, "cuda")
        case.positions.copy_(fresh.positions)
        case.slots.copy_(fresh.slots)
        case.qkv.copy_(fresh.qkv)
        for c in (q_out, k_cache, v_cache):
            c.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        q_ref, k_ref, _ = case.fp32_reference()
        check_against_fp32(q_out, q_ref, case.lowp_reference()[0], what="q_out after replay")
        slots = case.slots.long()
        check_against_fp32(k_cache.view(-1, 64, 64)[slots], k_ref.view(-1, 64, 64)[slots],
                           case.lowp_reference()[1], what="k_cache after replay")


@requires_cuda
def test_opcheck():
    case = Case(5, 4, 64, 32, torch.bfloat16, "cuda")
    q_out, k_cache, v_cache = case.outputs(torch.bfloat16)
    args = (case.qkv, case.positions, case.inv_freq, *case.weights(), k_cache, v_cache, case.slots, q_out, EPS)
    torch.library.opcheck(torch.ops.persimmon_rt.qk_norm_rope_cache.default, args)


@requires_cuda
def test_rejects_unsupported_shapes_before_launch():
    case = Case(3, 2, 64, 32, torch.float16, "cuda")
    q_out, k_cache, v_cache = case.outputs(torch.float16)
    op = torch.ops.persimmon_rt.qk_norm_rope_cache
    odd = torch.randn(3, 2, 3, 68, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim D must be a multiple of 8"):
        op(odd, case.positions, case.inv_freq, None, None, None, None, k_cache, v_cache, case.slots, q_out, EPS)
    with pytest.raises(RuntimeError, match=r"k_cache must have shape \[B, S, H, D\]"):
        op(case.qkv, case.positions, case.inv_freq, *case.weights(), k_cache[..., :32], v_cache, case.slots,
           q_out, EPS)
    with pytest.raises(RuntimeError, match="q_out must be"):
        op(case.qkv, case.positions, case.inv_freq, *case.weights(), k_cache, v_cache, case.slots,
           q_out.float(), EPS)
    assert k_cache.isnan().all() and v_cache.isnan().all(), "a rejected call must not launch"
