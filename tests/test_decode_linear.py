"""decode_linear: out = act(LN(x) W^T + bias) + residual for decode batches (M <= 16 rows), the
LayerNorm prologue optional.

CPU tests check the fp32 reference against an F.linear composition, and the LN prologue against
reference.layernorm followed by reference.decode_linear. CUDA tests check the GEMV against the reference
in fp32 (error at most twice that of plain PyTorch in the same low precision, plus a tiny floor) on
awkward and real Persimmon shapes, every epilogue, with and without the LN prologue (with and without LN
bias), fp16 / bf16, fp32 output, a NaN-poisoned output, residual aliasing out, every compiled tile
configuration, opcheck, CUDA-graph capture + replay, and a decode-layer chain of GEMVs (programmatic
dependent launches) inside one graph.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from persimmon_rt import ops, reference

from op_utils import capture_graph, check_against_fp32, max_abs_err, requires_cuda

DTYPES = [torch.float16, torch.bfloat16]
EPS = 1e-5
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


def make_ln(K, dtype, device, ln_bias=True):
    """LayerNorm weight around 1 and bias around 0, as trained models have them."""
    lw = (1 + 0.2 * torch.randn(K, device=device)).to(dtype)
    lb = (0.2 * torch.randn(K, device=device)).to(dtype) if ln_bias else None
    return lw, lb


def composition(x, w, b, r, relu2, out_dtype, lw=None, lb=None, eps=EPS):
    """The same op as plain PyTorch ops in the inputs' precision (the error baseline)."""
    if lw is not None:
        x = F.layer_norm(x, (x.shape[-1],), lw, lb, eps)
    y = F.linear(x, w, b)
    if relu2:
        y = torch.relu(y).square()
    if r is not None:
        y = y + r
    return y.to(out_dtype)


def _f32(t):
    return None if t is None else t.float()


def fp32_reference(x, w, b, r, relu2, lw=None, lb=None, eps=EPS):
    ref = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    reference.decode_linear(x.float(), w.float(), _f32(b), _f32(r), ref, relu2, _f32(lw), _f32(lb), eps)
    return ref


def run_and_check(M, N, K, dtype, bias, residual, relu2, out_dtype=None, ln=False, ln_bias=True, config=-1,
                  x_scale=1.0):
    out_dtype = out_dtype or dtype
    x, w, b, r = make_case(M, N, K, dtype, "cuda", bias, residual)
    x.mul_(x_scale)
    lw, lb = make_ln(K, dtype, "cuda", ln_bias) if ln else (None, None)
    out = torch.full((M, N), float("nan"), dtype=out_dtype, device="cuda")
    torch.ops.persimmon_rt.decode_linear(x, w, b, r, out, relu2, lw, lb, EPS, config)
    check_against_fp32(out, fp32_reference(x, w, b, r, relu2, lw, lb),
                       composition(x, w, b, r, relu2, out_dtype, lw, lb))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ln_bias", [False, True])
@pytest.mark.parametrize("relu2,residual", [(False, False), (True, False), (False, True)])
def test_reference_ln_prologue_is_layernorm_then_linear(ln_bias, relu2, residual, dtype):
    """The fused reference equals reference.layernorm (output rounded to x's dtype) and then
    reference.decode_linear, bit for bit."""
    M, N, K = 3, 40, 24
    x, w, b, r = make_case(M, N, K, dtype, "cpu", True, residual)
    x = x.mul(3).add(1)  # a mean far from 0, as the residual stream has
    lw, lb = make_ln(K, dtype, "cpu", ln_bias)
    fused = torch.full((M, N), float("nan"), dtype=dtype)
    reference.decode_linear(x, w, b, r, fused, relu2, lw, lb, EPS)
    normed = torch.empty_like(x)
    reference.layernorm(x, lw, lb, normed, EPS)
    unfused = torch.full((M, N), float("nan"), dtype=dtype)
    reference.decode_linear(normed, w, b, r, unfused, relu2)
    assert torch.equal(fused, unfused)


def test_reference_ln_prologue_matches_f_layer_norm():
    x, w, b, _ = make_case(4, 16, 32, torch.float32, "cpu")
    lw, lb = make_ln(32, torch.float32, "cpu")
    out = torch.empty(4, 16)
    reference.decode_linear(x, w, b, None, out, False, lw, lb, EPS)
    torch.testing.assert_close(out, F.linear(F.layer_norm(x, (32,), lw, lb, EPS), w, b), rtol=1e-5, atol=1e-5)


def test_reference_ln_bias_needs_ln_weight():
    x, w, b, _ = make_case(2, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="ln_bias needs ln_weight"):
        reference.decode_linear(x, w, b, None, torch.empty(2, 8), False, None, torch.zeros(16))


def test_ops_dispatches_ln_prologue_to_reference_on_cpu():
    x, w, b, r = make_case(2, 8, 16, torch.float32, "cpu", True, True)
    lw, lb = make_ln(16, torch.float32, "cpu")
    got, want = torch.empty(2, 8), torch.empty(2, 8)
    ops.decode_linear(x, w, b, r, got, True, lw, lb, 1e-6)
    reference.decode_linear(x, w, b, r, want, True, lw, lb, 1e-6)
    assert torch.equal(got, want)


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


# ---- CUDA: the LayerNorm prologue -------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ln_bias", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 13, 16])
@pytest.mark.parametrize("N,K", [(83, 264), (200, 1032), (83, 4096), (33, 16384), (40, 4104)])
def test_ln_prologue_shapes(N, K, M, ln_bias, dtype):
    """K = 264 / 1032 / 4104: odd multiples of 8 (partial chunks, uneven warp shares of the statistics);
    x with a mean far from zero (the residual stream), so a one-pass variance would lose digits."""
    run_and_check(M, N, K, dtype, bias=True, residual=False, relu2=False, ln=True, ln_bias=ln_bias, x_scale=4.0)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,residual,relu2", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("M", [1, 8, 16])
def test_ln_prologue_every_epilogue(M, bias, residual, relu2, dtype):
    run_and_check(M, 83, 264, dtype, bias, residual, relu2, ln=True)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 16])
def test_ln_prologue_fp32_out(M, dtype):
    """The lm_head use: final-LN prologue, no bias, fp32 logits."""
    run_and_check(M, 520, 4096, dtype, bias=False, residual=False, relu2=False, out_dtype=torch.float32, ln=True)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("shape", ["qkv", "mlp_up", "lm_head"])
def test_ln_prologue_persimmon_shapes(shape, M, dtype):
    N, K, bias, residual, relu2, fp32_out = PERSIMMON_SHAPES[shape]
    run_and_check(M, N, K, dtype, bias, residual, relu2, torch.float32 if fp32_out else None, ln=True)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 16])
def test_ln_prologue_matches_layernorm_op_then_gemv(M, dtype):
    """Fused against the two ops it replaces (layernorm kernel, then decode_linear): the LN output is
    rounded the same way, so they agree within the rounding of one output (statistics may differ in the
    last bit from a different summation order)."""
    N, K = 4096, 4096
    x, w, b, _ = make_case(M, N, K, dtype, "cuda")
    x.mul_(4).add_(1)
    lw, lb = make_ln(K, dtype, "cuda")
    fused = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    torch.ops.persimmon_rt.decode_linear(x, w, b, None, fused, False, lw, lb, EPS)
    normed = torch.empty_like(x)
    torch.ops.persimmon_rt.layernorm(x, lw, lb, normed, EPS)
    unfused = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    torch.ops.persimmon_rt.decode_linear(normed, w, b, None, unfused, False)
    ref = fp32_reference(x, w, b, None, False, lw, lb)
    base = max_abs_err(unfused, ref)
    assert max_abs_err(fused, ref) <= 2 * base + 1e-6
    assert max_abs_err(fused, unfused.float()) <= 2 * base + 1e-6


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8, 16])
def test_ln_prologue_residual_aliases_out(M, dtype):
    x, w, b, r = make_case(M, 4096, 4096, dtype, "cuda", True, True)
    lw, lb = make_ln(4096, dtype, "cuda")
    out = r.clone()
    torch.ops.persimmon_rt.decode_linear(x, w, b, out, out, False, lw, lb, EPS)
    check_against_fp32(out, fp32_reference(x, w, b, r, False, lw, lb),
                       composition(x, w, b, r, False, dtype, lw, lb))


@requires_cuda
@pytest.mark.parametrize("M", [2, 16])
def test_ln_prologue_strided_x(M):
    K = 264
    big = torch.randn(M, K + 8, device="cuda", dtype=torch.float16)
    x = big[:, :K]
    _, w, b, r = make_case(M, 83, K, torch.float16, "cuda", True, True)
    lw, lb = make_ln(K, torch.float16, "cuda")
    out = torch.full((M, 83), float("nan"), dtype=torch.float16, device="cuda")
    torch.ops.persimmon_rt.decode_linear(x, w, b, r, out, True, lw, lb, EPS)
    check_against_fp32(out, fp32_reference(x, w, b, r, True, lw, lb),
                       composition(x, w, b, r, True, torch.float16, lw, lb))


def _config_rows(name: str) -> int:
    """Most rows a configuration takes: its name starts with "m<rows> "."""
    return int(name.split()[0][1:])


@requires_cuda
@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_config(dtype, ln):
    """Every compiled tile configuration (the sweep's candidates) is correct at its row limits."""
    for config, name in enumerate(ops.DECODE_LINEAR_CONFIGS):
        for M in sorted({1, 7, _config_rows(name)}):
            # 8200 rows: more 16-row tiles (513) than a persistent grid has blocks, so each walks several.
            for N, K in [(83, 264), (300, 16392), (8200, 264)]:
                run_and_check(M, N, K, dtype, True, True, True, ln=ln, config=config)
                run_and_check(M, N, K, dtype, False, False, False, out_dtype=torch.float32, ln=ln, config=config)


@requires_cuda
def test_rejects_bad_ln_arguments():
    x, w, b, r = make_case(4, 32, 64, torch.float16, "cuda", True, True)
    lw, lb = make_ln(64, torch.float16, "cuda")
    out = torch.empty(4, 32, dtype=torch.float16, device="cuda")
    op = torch.ops.persimmon_rt.decode_linear
    with pytest.raises(RuntimeError, match="ln_bias needs ln_weight"):
        op(x, w, b, r, out, False, None, lb, EPS)
    with pytest.raises(RuntimeError, match=r"ln_weight must have shape \[K\]"):
        op(x, w, b, r, out, False, lw[:56], lb, EPS)
    with pytest.raises(RuntimeError, match="ln_bias must be"):
        op(x, w, b, r, out, False, lw, lb.bfloat16(), EPS)
    with pytest.raises(RuntimeError, match="config must be"):
        op(x, w, b, r, out, False, lw, lb, EPS, len(ops.DECODE_LINEAR_CONFIGS))
    # An "m8" configuration with 9 rows: the launcher's check (std::invalid_argument).
    with pytest.raises((RuntimeError, ValueError), match="rows"):
        m8 = next(i for i, n in enumerate(ops.DECODE_LINEAR_CONFIGS) if _config_rows(n) == 8)
        x9 = torch.randn(9, 64, device="cuda", dtype=torch.float16)
        op(x9, w, b, None, torch.empty(9, 32, dtype=torch.float16, device="cuda"), False, lw, lb, EPS, m8)


@requires_cuda
@pytest.mark.parametrize("ln_bias", [False, True])
def test_ln_prologue_opcheck(ln_bias):
    x, w, b, r = make_case(3, 83, 264, torch.float16, "cuda", True, True)
    lw, lb = make_ln(264, torch.float16, "cuda", ln_bias)
    out = torch.empty(3, 83, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.persimmon_rt.decode_linear, (x, w, b, r, out, True, lw, lb, EPS, -1))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8, 16])
def test_ln_prologue_cuda_graph_replay(M, dtype):
    """Capture once, then change x, W and the LN weights in place and replay."""
    N, K = 4096, 4096
    x, w, b, r = make_case(M, N, K, dtype, "cuda", True, True)
    lw, lb = make_ln(K, dtype, "cuda")
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    graph = capture_graph(lambda: torch.ops.persimmon_rt.decode_linear(x, w, b, r, out, True, lw, lb, EPS))
    for _ in range(3):
        x2, w2, b2, r2 = make_case(M, N, K, dtype, "cuda", True, True)
        lw2, lb2 = make_ln(K, dtype, "cuda")
        for dst, src in ((x, x2), (w, w2), (b, b2), (r, r2), (lw, lw2), (lb, lb2)):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_against_fp32(out, fp32_reference(x, w, b, r, True, lw, lb),
                           composition(x, w, b, r, True, dtype, lw, lb))


@requires_cuda
@pytest.mark.parametrize("in_graph", [False, True])
@pytest.mark.parametrize("M", [1, 16])
def test_decode_layer_chain(M, in_graph):
    """A decode layer's GEMVs back to back, as the engine runs them (each a programmatic dependent
    launch of the previous): h += attn Wd^T + bd (in place); up = relu2(LN_post(h) Wu^T + bu);
    h += up Wdn^T + bdn (in place); qkv = LN_in(h) Wq^T + bq (the next layer). Every kernel must see the
    previous one's writes, eagerly and inside one CUDA graph, over several replays."""
    dtype, H, F_ = torch.float16, 512, 2048
    g = torch.Generator(device="cuda").manual_seed(1)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    wd, bd = rnd(H, H, scale=H ** -0.5), rnd(H, scale=0.1)
    wu, bu = rnd(F_, H, scale=H ** -0.5), rnd(F_, scale=0.1)
    wdn, bdn = rnd(H, F_, scale=0.3 * F_ ** -0.5), rnd(H, scale=0.1)
    wq, bq = rnd(3 * H, H, scale=H ** -0.5), rnd(3 * H, scale=0.1)
    ln_post = (1 + rnd(H, scale=0.1), rnd(H, scale=0.1))
    ln_in = (1 + rnd(H, scale=0.1), rnd(H, scale=0.1))
    attn, h = rnd(M, H), rnd(M, H, scale=2.0)
    up = torch.empty(M, F_, dtype=dtype, device="cuda")
    qkv = torch.empty(M, 3 * H, dtype=dtype, device="cuda")
    op = torch.ops.persimmon_rt.decode_linear

    def step():
        op(attn, wd, bd, h, h, False)
        op(h, wu, bu, None, up, True, ln_post[0], ln_post[1], EPS)
        op(up, wdn, bdn, h, h, False)
        op(h, wq, bq, None, qkv, False, ln_in[0], ln_in[1], EPS)

    def reference_step(h_ref):
        h_ref = h_ref.clone()
        reference.decode_linear(attn, wd, bd, h_ref, h_ref, False)
        up_ref = torch.empty_like(up)
        reference.decode_linear(h_ref, wu, bu, None, up_ref, True, *ln_post, EPS)
        reference.decode_linear(up_ref, wdn, bdn, h_ref, h_ref, False)
        qkv_ref = torch.empty_like(qkv)
        reference.decode_linear(h_ref, wq, bq, None, qkv_ref, False, *ln_in, EPS)
        return h_ref, qkv_ref

    run = capture_graph(step).replay if in_graph else step
    if in_graph:  # capture_graph ran the step twice (warm-up and capture): start from fresh inputs
        h.copy_(rnd(M, H, scale=2.0))
    for _ in range(3):
        attn.copy_(rnd(M, H))
        h_want, qkv_want = reference_step(h)
        run()
        torch.cuda.synchronize()
        # Each op rounds once, as its reference does; the chain's error stays within a few output ulps.
        torch.testing.assert_close(h, h_want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(qkv, qkv_want, rtol=2e-2, atol=2e-2)
        h.copy_(h_want)  # keep the next step's input exactly the reference's
