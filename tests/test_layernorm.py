"""layernorm: out = LN(x), or with a residual r = round(x + residual), residual_out = r, out = LN(r).

CPU tests check the fp32 reference (through ops.py) against torch.nn.functional.layer_norm. CUDA tests
check the kernel against the reference in fp32 with the error bound derived from F.layer_norm in the
low precision; outputs start as NaN so an unwritten element fails; the rounded residual sum must match
bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from persimmon_rt import ops, reference

from op_utils import check_against_fp32, capture_graph, poisoned_like, requires_cuda

EPS = 1e-5


def make_inputs(shape, dtype, device, residual):
    C = shape[-1]
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)   # a non-zero mean exercises the centring
    res = (torch.randn(shape, device=device) * 3).to(dtype) if residual else None
    weight = (torch.randn(C, device=device) * 0.2 + 1).to(dtype)
    bias = (torch.randn(C, device=device) * 0.1).to(dtype)
    return x, res, weight, bias


def expected(x, res, weight, bias):
    """(fp32 reference out, plain low-precision out, rounded residual sum or None)."""
    summed = None if res is None else (x.float() + res.float()).to(x.dtype)
    normed = x if summed is None else summed
    ref = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    reference.layernorm(normed.float(), weight.float(), bias.float(), ref, EPS)
    lowp = F.layer_norm(normed, (x.shape[-1],), weight, bias, EPS)
    return ref, lowp, summed


def run_kernel(x, res, weight, bias):
    out = poisoned_like(x)
    res_out = None if res is None else poisoned_like(res)
    torch.ops.persimmon_rt.layernorm(x, weight, bias, out, EPS, res, res_out)
    return out, res_out


# ---- CPU: the reference against F.layer_norm -----------------------------------------------------------

@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 40)])
def test_reference_matches_functional(shape, residual):
    x, res, weight, bias = make_inputs(shape, torch.float32, "cpu", residual)
    out = torch.empty_like(x)
    res_out = None if res is None else torch.empty_like(x)
    ops.layernorm(x, weight, bias, out, EPS, res, res_out)
    summed = x if res is None else x + res
    torch.testing.assert_close(out, F.layer_norm(summed, (shape[-1],), weight, bias, EPS), rtol=1e-5, atol=1e-5)
    if res is not None:
        torch.testing.assert_close(res_out, summed, rtol=0, atol=0)


def test_reference_rounds_the_sum_to_the_activation_dtype():
    x, res, weight, bias = make_inputs((4, 32), torch.bfloat16, "cpu", True)
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    ops.layernorm(x, weight, bias, out, EPS, res, res_out)
    summed = (x.float() + res.float()).to(torch.bfloat16)
    assert torch.equal(res_out, summed)
    torch.testing.assert_close(out, F.layer_norm(summed.float(), (32,), weight.float(), bias.float(), EPS).to(
        torch.bfloat16))


# ---- CUDA ---------------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16]
# Persimmon's hidden size 4096 at decode (1 row) and prefill token counts, then other widths up to the
# 16384 limit, including ones that leave chunks of a block idle (8, 1032, 5120, 12288).
SHAPES = [(1, 4096), (7, 4096), (83, 4096), (4096, 4096), (2, 3, 4096), (83, 8), (83, 64), (7, 1032), (83, 2048),
          (83, 5120), (7, 12288), (83, 16384), (1, 16384), (4096, 1024)]


@requires_cuda
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype, residual):
    x, res, weight, bias = make_inputs(shape, dtype, "cuda", residual)
    out, res_out = run_kernel(x, res, weight, bias)
    ref, lowp, summed = expected(x, res, weight, bias)
    check_against_fp32(out, ref, lowp)
    if residual:
        assert torch.equal(res_out, summed), "residual_out must be round(x + residual) exactly"


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place(dtype):
    """out may alias x and residual_out may alias residual (the decoder's residual stream)."""
    x, res, weight, bias = make_inputs((83, 4096), dtype, "cuda", True)
    ref, lowp, summed = expected(x, res, weight, bias)
    torch.ops.persimmon_rt.layernorm(x, weight, bias, x, EPS, res, res)
    check_against_fp32(x, ref, lowp)
    assert torch.equal(res, summed)


@requires_cuda
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cuda_graph_replay_follows_inputs(residual):
    x, res, weight, bias = make_inputs((7, 4096), torch.bfloat16, "cuda", residual)
    out = poisoned_like(x)
    res_out = None if res is None else poisoned_like(x)
    graph = capture_graph(lambda: torch.ops.persimmon_rt.layernorm(x, weight, bias, out, EPS, res, res_out))
    for _ in range(2):
        fresh = make_inputs((7, 4096), torch.bfloat16, "cuda", residual)
        x.copy_(fresh[0])
        if residual:
            res.copy_(fresh[1])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, lowp, summed = expected(x, res, weight, bias)
        check_against_fp32(out, ref, lowp, what="out after replay")
        if residual:
            assert torch.equal(res_out, summed)


@requires_cuda
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_opcheck(residual):
    x, res, weight, bias = make_inputs((5, 256), torch.float16, "cuda", residual)
    res_out = None if res is None else torch.empty_like(x)
    torch.library.opcheck(torch.ops.persimmon_rt.layernorm.default,
                          (x, weight, bias, torch.empty_like(x), EPS, res, res_out))


@requires_cuda
def test_rejects_unsupported_shapes_before_launch():
    op = torch.ops.persimmon_rt.layernorm
    for C in (4100, 16392):
        x, _, weight, bias = make_inputs((2, C), torch.float16, "cuda", False)
        out = poisoned_like(x)
        with pytest.raises(RuntimeError, match="hidden size C must be a multiple of 8"):
            op(x, weight, bias, out, EPS)
        assert out.isnan().all()
    x, res, weight, bias = make_inputs((2, 64), torch.float16, "cuda", True)
    with pytest.raises(RuntimeError, match="residual and residual_out must be given together"):
        op(x, weight, bias, torch.empty_like(x), EPS, res, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[C\]"):
        op(x, weight[:32], bias, torch.empty_like(x), EPS)
