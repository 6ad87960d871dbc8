"""decode_linear: out = act(x W^T + bias) + residual for decode batches (M <= 16 rows).

CPU tests check the fp32 reference against an F.linear composition. CUDA tests check the GEMV against
the reference in fp32 (error at most twice that of plain PyTorch in the same low precision, plus a tiny
floor) on awkward and real Persimmon shapes, every epilogue, fp16 / bf16, fp32 output, a NaN-poisoned
output, residual aliasing out, opcheck, and CUDA-graph capture + replay.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from persimmon_rt import ops, reference

from op_utils import capture_graph, check_against_fp32, requires_cuda

DTYPES = [torch.float16, torch.bfloat16]
# (bias, residual, relu2): every epilogue the op allows.
EPILOGUES = list(itertools.product([False, True], repeat=3))
EPILOGUE_IDS = [f"bias{int(b)}-res{int(r)}-relu2{int(a)}" for b, r, a in EPILOGUES]


def make_case(M, N, K, dtype, device, bias=True, residual=False):
    """Random x, W scaled so that x W^T is of order 1 (relu^2 stays finite in fp16), bias, residual."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype).mul_(K ** -0.5)
    b = torch.randn(N, device=device, dtype=dtype).mul_(0.5) if bias else None
    r = torch.randn(M, N, device=device, dtype=dtype) if residual else None
    return x, w, b, r


def composition(x, w, b, r, relu2, out_dtype):
    """The same op as plain PyTorch ops in the inputs' precision (the error baseline)."""
    y = F.linear(x, w, b)
    if relu2:
        y = torch.relu(y).square()
    if r is not None:
        y = y + r
    return y.to(out_dtype)


def fp32_reference(x, w, b, r, relu2):
    ref = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    reference.decode_linear(x.float(), w.float(), None if b is None else b.float(),
                            None if r is None else r.float(), ref, relu2)
    return ref


def run_and_check(M, N, K, dtype, bias, residual, relu2, out_dtype=None):
    out_dtype = out_dtype or dtype
    x, w, b, r = make_case(M, N, K, dtype, "cuda", bias, residual)
    out = torch.full((M, N), float("nan"), dtype=out_dtype, device="cuda")
    torch.ops.persimmon_rt.decode_linear(x, w, b, r, out, relu2)
    check_against_fp32(out, fp32_reference(x, w, b, r, relu2), composition(x, w, b, r, relu2, out_dtype))


# ---- CPU: the reference against F.linear ------------------------------------------------------------

@pytest.mark.parametrize("bias,residual,relu2", EPILOGUES, ids=EPILOGUE_IDS)
def test_reference_matches_f_linear(bias, residual, relu2):
    x, w, b, r = make_case(5, 40, 24, torch.float32, "cpu", bias, residual)
    out = torch.full((5, 40), float("nan"))
    reference.decode_linear(x, w, b, r, out, relu2)
    torch.testing.assert_close(out, composition(x, w, b, r, relu2, torch.float32), rtol=1e-5, atol=1e-5)


def test_reference_rounds_once_and_allows_aliasing():
    """Low-precision inputs: the reference rounds the fp32 result once; residual may be out itself."""
    x, w, b, r = make_case(3, 24, 16, torch.bfloat16, "cpu", True, True)
    want = composition(x.float(), w.float(), b.float(), r.float(), True, torch.float32).to(torch.bfloat16)
    out = r.clone()
    reference.decode_linear(x, w, b, out, out, True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# ---- CUDA kernel ------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,residual,relu2", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("M", [1, 3, 8, 16])
def test_awkward_shape_every_epilogue(M, bias, residual, relu2, dtype):
    """N = 83 (a partial 16-row tile), K = 264 (a partial 32-wide chunk; 9 chunks over 8 warps)."""
    run_and_check(M, 83, 264, dtype, bias, residual, relu2)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("N,K", [(1, 8), (17, 8), (16, 40), (200, 1032), (4104, 4096), (33, 16392)])
def test_awkward_shapes(N, K, M, dtype):
    run_and_check(M, N, K, dtype, bias=True, residual=True, relu2=False)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("relu2", [False, True])
def test_fp32_out(relu2, M, dtype):
    run_and_check(M, 83, 264, dtype, bias=True, residual=True, relu2=relu2, out_dtype=torch.float32)


# name: (N, K, bias, residual, relu2, fp32 out)
PERSIMMON_SHAPES = {
    "qkv": (12288, 4096, True, False, False, False),
    "dense": (4096, 4096, True, True, False, False),
    "mlp_up": (16384, 4096, True, False, True, False),
    "mlp_down": (4096, 16384, True, True, False, False),
    "lm_head": (262144, 4096, False, False, False, True),
}


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("shape", list(PERSIMMON_SHAPES))
def test_persimmon_shapes(shape, M, dtype):
    N, K, bias, residual, relu2, fp32_out = PERSIMMON_SHAPES[shape]
    run_and_check(M, N, K, dtype, bias, residual, relu2, torch.float32 if fp32_out else None)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8, 16])
def test_residual_aliases_out(M, dtype):
    x, w, b, r = make_case(M, 4096, 4096, dtype, "cuda", True, True)
    out = r.clone()
    torch.ops.persimmon_rt.decode_linear(x, w, b, out, out, False)
    check_against_fp32(out, fp32_reference(x, w, b, r, False), composition(x, w, b, r, False, dtype))


@requires_cuda
@pytest.mark.parametrize("M", [2, 16])
def test_strided_x(M):
    """x as a column slice of a wider buffer (row stride K + 8)."""
    K = 264
    big = torch.randn(M, K + 8, device="cuda", dtype=torch.float16)
    x = big[:, :K]
    _, w, b, r = make_case(M, 83, K, torch.float16, "cuda", True, True)
    out = torch.full((M, 83), float("nan"), dtype=torch.float16, device="cuda")
    torch.ops.persimmon_rt.decode_linear(x, w, b, r, out, True)
    check_against_fp32(out, fp32_reference(x, w, b, r, True), composition(x, w, b, r, True, torch.float16))


@requires_cuda
def test_nan_propagates_through_relu2():
    """relu(NaN) is NaN in torch: a NaN in x must reach every output of its row."""
    x, w, b, _ = make_case(2, 83, 264, torch.float16, "cuda")
    x[1, 5] = float("nan")
    out = torch.zeros(2, 83, dtype=torch.float16, device="cuda")
    torch.ops.persimmon_rt.decode_linear(x, w, b, None, out, True)
    assert out[1].isnan().all() and not out[0].isnan().any()


@requires_cuda
def test_rejects_bad_arguments():
    x, w, b, r = make_case(4, 32, 64, torch.float16, "cuda", True, True)
    out = torch.empty(4, 32, dtype=torch.float16, device="cuda")
    op = torch.ops.persimmon_rt.decode_linear
    too_many = ops.DECODE_LINEAR_MAX_ROWS + 1
    x_big = torch.randn(too_many, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=f"1 to {ops.DECODE_LINEAR_MAX_ROWS} rows"):
        op(x_big, w, b, None, torch.empty(too_many, 32, dtype=torch.float16, device="cuda"), False)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        op(x[:, :60].contiguous(), w[:, :60].contiguous(), b, r, out, False)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        op(x, w.t().contiguous().t(), b, r, out, False)
    with pytest.raises(RuntimeError, match="weight must be"):
        op(x, w.bfloat16(), b, r, out, False)
    with pytest.raises(RuntimeError, match="out must be"):
        op(x, w, b, r, out.bfloat16(), False)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        op(x, w, b, r[:3], out, False)
    buf = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="x must not overlap out"):  # x spans elements [0, 224)
        op(buf[:, :32], w[:, :32].contiguous(), None, None, buf.view(-1)[128:].view(4, 32), False)


@requires_cuda
@pytest.mark.parametrize("bias,residual,out_dtype", [(True, True, torch.float16), (False, False, torch.float32)])
def test_opcheck(bias, residual, out_dtype):
    x, w, b, r = make_case(3, 83, 264, torch.float16, "cuda", bias, residual)
    out = torch.empty(3, 83, dtype=out_dtype, device="cuda")
    torch.library.opcheck(torch.ops.persimmon_rt.decode_linear, (x, w, b, r, out, True))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8, 16])
def test_cuda_graph_replay(M, dtype):
    """Capture once, then change x, W, bias and residual in place and replay: nothing is baked in."""
    N, K = 4096, 4096
    x, w, b, r = make_case(M, N, K, dtype, "cuda", True, True)
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    graph = capture_graph(lambda: torch.ops.persimmon_rt.decode_linear(x, w, b, r, out, True))
    for _ in range(3):
        x2, w2, b2, r2 = make_case(M, N, K, dtype, "cuda", True, True)
        for dst, src in ((x, x2), (w, w2), (b, b2), (r, r2)):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_against_fp32(out, fp32_reference(x, w, b, r, True), composition(x, w, b, r, True, dtype))


@requires_cuda
@pytest.mark.parametrize("in_graph", [False, True])
def test_sees_writes_of_the_previous_kernel(in_graph):
    """Kernels that rewrite W, x and the residual just before the op (eagerly, and as neighbouring nodes
    of one graph) must be seen: guards any future overlap of the weight stream with the previous kernel."""
    M, N, K = 8, 4096, 4096
    x, w, b, r = make_case(M, N, K, torch.float16, "cuda", True, True)
    out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")

    def step():
        w.neg_()
        x.mul_(-0.5)
        r.add_(1.0)
        torch.ops.persimmon_rt.decode_linear(x, w, b, r, out, False)

    run = capture_graph(step).replay if in_graph else step
    for _ in range(3):
        w_before = w.clone()
        out.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        assert torch.equal(w, -w_before)  # the writes happened; the op must have used them
        check_against_fp32(out, fp32_reference(x, w, b, r, False), composition(x, w, b, r, False, torch.float16))
