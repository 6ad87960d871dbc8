"""bias_relu2: out = relu(x + bias)^2 in fp32, rounded once (the prefill MLP epilogue).

CPU tests check the fp32 reference (through ops.py) against the plain formula. CUDA tests check the
kernel against the reference in fp32 with the error bound derived from the same formula in the low
precision; outputs start as NaN so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from persimmon_rt import ops, reference

from op_utils import check_against_fp32, capture_graph, poisoned_like, requires_cuda


def make_inputs(shape, dtype, device):
    x = (torch.randn(shape, device=device) * 4).to(dtype)
    bias = torch.randn(shape[-1], device=device).to(dtype)
    return x, bias


def expected(x, bias):
    ref = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    reference.bias_relu2(x.float(), bias.float(), ref)
    return ref, torch.relu(x + bias).square()   # fp32 reference, plain low-precision formula


# ---- CPU: the reference against the plain formula -------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 16), (2, 5, 24)])
def test_reference_matches_formula(shape):
    x, bias = make_inputs(shape, torch.float32, "cpu")
    out = torch.empty_like(x)
    ops.bias_relu2(x, bias, out)
    y = x + bias
    torch.testing.assert_close(out, torch.where(y > 0, y * y, torch.zeros_like(y)), rtol=0, atol=0)


def test_reference_overflows_fp16_to_inf_and_keeps_nan():
    x = torch.tensor([[300.0, -300.0, float("nan"), 1.0]], dtype=torch.float16)
    out = torch.empty_like(x)
    ops.bias_relu2(x, torch.zeros(4, dtype=torch.float16), out)
    assert out[0, 0] == float("inf") and out[0, 1] == 0 and out[0, 2].isnan() and out[0, 3] == 1


# ---- CUDA ---------------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16]
# Persimmon's MLP width 16384 at prefill token counts, then widths that end mid-block (8, 520, 1032).
SHAPES = [(1, 16384), (7, 16384), (83, 16384), (4096, 16384), (2, 3, 16384), (83, 8), (7, 520), (4099, 1032)]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype):
    x, bias = make_inputs(shape, dtype, "cuda")
    out = poisoned_like(x)
    torch.ops.persimmon_rt.bias_relu2(x, bias, out)
    check_against_fp32(out, *expected(x, bias))


@requires_cuda
def test_many_rows_exceed_grid_y():
    """More than 65535 * 4 rows: the row loop must cover what gridDim.y cannot."""
    x, bias = make_inputs((65535 * 4 + 77, 8), torch.float16, "cuda")
    out = poisoned_like(x)
    torch.ops.persimmon_rt.bias_relu2(x, bias, out)
    check_against_fp32(out, *expected(x, bias))


@requires_cuda
def test_special_values_match_reference():
    """fp16 overflow saturates to inf and a NaN input stays NaN, exactly as the reference."""
    x = torch.tensor([[300.0, -300.0, float("nan"), 1.0, 255.9, -0.0, 65504.0, 2.0]], dtype=torch.float16,
                     device="cuda")
    bias = torch.zeros(8, dtype=torch.float16, device="cuda")
    out = poisoned_like(x)
    torch.ops.persimmon_rt.bias_relu2(x, bias, out)
    ref = torch.empty_like(x)
    reference.bias_relu2(x, bias, ref)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place(dtype):
    x, bias = make_inputs((83, 16384), dtype, "cuda")
    ref, lowp = expected(x, bias)
    torch.ops.persimmon_rt.bias_relu2(x, bias, x)
    check_against_fp32(x, ref, lowp)


@requires_cuda
def test_cuda_graph_replay_follows_inputs():
    x, bias = make_inputs((7, 16384), torch.float16, "cuda")
    out = poisoned_like(x)
    graph = capture_graph(lambda: torch.ops.persimmon_rt.bias_relu2(x, bias, out))
    for _ in range(2):
        x.copy_(make_inputs((7, 16384), torch.float16, "cuda")[0])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_against_fp32(out, *expected(x, bias), what="out after replay")


@requires_cuda
def test_opcheck():
    x, bias = make_inputs((5, 64), torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.persimmon_rt.bias_relu2.default, (x, bias, torch.empty_like(x)))


@requires_cuda
def test_rejects_unsupported_shapes_before_launch():
    x, bias = make_inputs((3, 20), torch.float16, "cuda")
    out = poisoned_like(x)
    with pytest.raises(RuntimeError, match="features F must be a positive multiple of 8"):
        torch.ops.persimmon_rt.bias_relu2(x, bias, out)
    x, bias = make_inputs((3, 64), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match=r"bias must have shape \[F\]"):
        torch.ops.persimmon_rt.bias_relu2(x, bias[:8], out)
    assert out.isnan().all()
