"""Weight-only int8 on the GPU: the int8 decode GEMV and the dequantization kernel against their fp32
references (awkward and Persimmon-8B shapes, every epilogue, fp16 / bf16, fp32 output, poisoned outputs,
residual aliasing, every tile configuration eagerly and in a graph, writes of the previous kernel, the
per-shape choice and its environment override, argument errors, opcheck, CUDA-graph replay), and the int8
engine against the fp16 one (greedy on the demo model; logits on 8B shapes with random weights over 512
teacher-forced decode steps). Skipped without a GPU.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from op_utils import capture_graph, check_against_fp32, requires_cuda

from persimmon_rt import ops, reference
from persimmon_rt.quantization import quantize_int8

DTYPES = [torch.float16, torch.bfloat16]
EPILOGUES = list(itertools.product([False, True], repeat=3))     # (bias, residual, relu2)


def make_case(M, N, K, dtype, bias=True, residual=False):
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    q, s = quantize_int8(torch.randn(N, K, device="cuda").mul_(K ** -0.5))
    b = torch.randn(N, device="cuda", dtype=dtype).mul_(0.5) if bias else None
    r = torch.randn(M, N, device="cuda", dtype=dtype) if residual else None
    return x, q, s, b, r


def fp32_reference(x, q, s, b, r, relu2):
    ref = torch.empty(x.shape[0], q.shape[0], device="cuda")
    reference.decode_linear_int8(x.float(), q, s, None if b is None else b.float(),
                                 None if r is None else r.float(), ref, relu2)
    return ref


def lowp_composition(x, q, s, b, r, relu2, out_dtype):
    """The same op in the activation precision: dequantize to x's dtype, F.linear (the error baseline)."""
    y = torch.nn.functional.linear(x, (q.float() * s[:, None]).to(x.dtype), b)
    if relu2:
        y = torch.relu(y).square()
    if r is not None:
        y = y + r
    return y.to(out_dtype)


def run_and_check(M, N, K, dtype, bias, residual, relu2, out_dtype=None, config=-1):
    out_dtype = out_dtype or dtype
    x, q, s, b, r = make_case(M, N, K, dtype, bias, residual)
    out = torch.full((M, N), float("nan"), dtype=out_dtype, device="cuda")
    torch.ops.persimmon_rt.decode_linear_int8(x, q, s, b, r, out, relu2, config)
    check_against_fp32(out, fp32_reference(x, q, s, b, r, relu2), lowp_composition(x, q, s, b, r, relu2, out_dtype),
                       floor=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,residual,relu2", EPILOGUES)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
def test_awkward_shape_every_epilogue(M, bias, residual, relu2, dtype):
    """N = 83 (a partial 16-row tile), K = 272 (a partial 64-wide chunk)."""
    run_and_check(M, 83, 272, dtype, bias, residual, relu2)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("N,K", [(1, 16), (17, 48), (200, 1040), (4104, 4096), (33, 16400)])
def test_awkward_shapes_fp32_out(N, K, M, dtype):
    run_and_check(M, N, K, dtype, bias=True, residual=True, relu2=False, out_dtype=torch.float32)


PERSIMMON_SHAPES = {"qkv": (12288, 4096, False), "dense": (4096, 4096, False), "mlp_up": (16384, 4096, True),
                    "mlp_down": (4096, 16384, False), "lm_head": (262144, 4096, False)}


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("shape", list(PERSIMMON_SHAPES))
def test_persimmon_shapes(shape, M, dtype):
    N, K, relu2 = PERSIMMON_SHAPES[shape]
    run_and_check(M, N, K, dtype, shape != "lm_head", False, relu2, torch.float32 if shape == "lm_head" else None)


def config_rows(name: str) -> int:
    """Most rows a configuration takes: its name starts with "m<rows> "."""
    return int(name.split()[0][1:])


CONFIGS = range(len(ops.DECODE_LINEAR_INT8_CONFIGS) or 1)
# A partial 16-row tile with a partial 64-wide chunk; Persimmon's K with a partial last tile; more tiles
# (1201) than any persistent grid holds (at most 4 blocks x 132 SMs), so persistent blocks walk several,
# an uneven number each.
CONFIG_SHAPES = [(83, 272), (4104, 4112), (19207, 1040)]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config(config, dtype):
    """Every compiled configuration (the sweep's candidates) at its row limits, every epilogue at once
    and none (fp32 out)."""
    rows = config_rows(ops.DECODE_LINEAR_INT8_CONFIGS[config])
    for M in sorted({1, 7, rows}):
        for N, K in CONFIG_SHAPES:
            run_and_check(M, N, K, dtype, True, True, True, config=config)
            run_and_check(M, N, K, dtype, False, False, False, out_dtype=torch.float32, config=config)


@requires_cuda
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_in_a_graph_sees_each_replays_inputs(config):
    """Two dependent launches (programmatic dependent launch) of one configuration per graph replay."""
    check_chain_in_graph(config_rows(ops.DECODE_LINEAR_INT8_CONFIGS[config]), config, replays=2)


def check_chain_in_graph(rows: int, config: int, replays: int) -> None:
    """Two dependent GEMVs (programmatic dependent launches) captured once, replayed on fresh inputs."""
    x, q, s, b, _ = make_case(rows, 4096, 4096, torch.float16)
    out = torch.empty(rows, 4096, device="cuda", dtype=torch.float16)
    mid = torch.empty_like(out)

    def chain():
        torch.ops.persimmon_rt.decode_linear_int8(x, q, s, b, None, mid, True, config)
        torch.ops.persimmon_rt.decode_linear_int8(mid, q, s, None, None, out, False, config)

    graph = capture_graph(chain)
    for _ in range(replays):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        first = fp32_reference(x, q, s, b, None, True).half()
        check_against_fp32(out, fp32_reference(first, q, s, None, None, False),
                           lowp_composition(first, q, s, None, None, False, torch.float16), floor=1e-4)


@requires_cuda
@pytest.mark.parametrize("in_graph", [False, True])
def test_sees_writes_of_the_previous_kernel(in_graph):
    """Kernels that rewrite the weight, scale, bias, x and residual just before the op (eagerly, and as
    neighbouring nodes of one graph) must be seen: weights, scale and bias are read before the kernel's
    programmatic-dependent-launch wait, which is safe only after kernels that do not release it early."""
    M, N, K = 8, 4096, 4096
    x, q, s, b, r = make_case(M, N, K, torch.float16, True, True)
    out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")

    def step():
        q.neg_()
        s.mul_(1.5)
        b.add_(0.25)
        x.mul_(-0.5)
        r.add_(1.0)
        torch.ops.persimmon_rt.decode_linear_int8(x, q, s, b, r, out, False)

    run = capture_graph(step).replay if in_graph else step
    for _ in range(3):
        q_before = q.clone()
        out.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        assert torch.equal(q, -q_before)  # the writes happened; the op must have used them
        check_against_fp32(out, fp32_reference(x, q, s, b, r, False),
                           lowp_composition(x, q, s, b, r, False, torch.float16), floor=1e-5)


@requires_cuda
@pytest.mark.parametrize("shape", list(PERSIMMON_SHAPES) + ["other"])
def test_config_choice_takes_the_rows(shape):
    """The per-shape tables (plain and folded LayerNorm; the default for other shapes) name a configuration
    that takes the rows."""
    N, K = PERSIMMON_SHAPES[shape][:2] if shape != "other" else (1000, 2048)
    for M in (1, 2, 8, 9, 16):
        for folded in (False, True):
            config = ops.decode_linear_int8_config(M, N, K, folded)
            assert 0 <= config < len(ops.DECODE_LINEAR_INT8_CONFIGS)
            assert config_rows(ops.DECODE_LINEAR_INT8_CONFIGS[config]) >= M


RULES_SCRIPT = """
import torch
from persimmon_rt import ops
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
q = torch.randint(-127, 128, (4096, 4096), device="cuda", dtype=torch.int8)
out = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
torch.ops.persimmon_rt.decode_linear_int8(x, q, torch.ones(4096, device="cuda"), None, None, out, False)
torch.cuda.synchronize()
print([ops.decode_linear_int8_config(m, 4096, 4096) for m in (1, 8, 16)])
print([ops.decode_linear_int8_config(m, 4096, 4096, True) for m in (1, 8, 16)])
"""


def run_rules_script(rules: str):
    env = {**os.environ, "PERSIMMON_RT_INT8_RULES": rules}
    return subprocess.run([sys.executable, "-c", RULES_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@requires_cuda
def test_rules_from_the_environment_come_first():
    """PERSIMMON_RT_INT8_RULES (a sweep's picks, timed without a rebuild) overrides the compiled table;
    a malformed value is an error that names it, at the first launch."""
    names = ops.DECODE_LINEAR_INT8_CONFIGS
    m8 = [c for c, name in enumerate(names) if config_rows(name) == 8]
    m16 = [c for c, name in enumerate(names) if config_rows(name) == 16]
    want = [m8[-1], m8[-2], m16[-1]]
    done = run_rules_script(f"1:16:0:0:{m16[0]},4096:4096:{want[0]}:{want[1]}:{want[2]}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == [str(want)] * 2     # the folded instance follows them too
    for bad in ("4096:4096:0:0", f"4096:4096:0:0:{m8[0]}", "4096:4096:0:0:999", "4096x4096:0:0:9"):
        done = run_rules_script(bad)
        assert done.returncode != 0 and "PERSIMMON_RT_INT8_RULES" in done.stderr, (bad, done.stderr[-2000:])


@requires_cuda
def test_residual_aliases_out_and_x_with_row_stride():
    x, q, s, b, r = make_case(4, 512, 256, torch.bfloat16, True, True)
    wide = torch.randn(4, 320, device="cuda", dtype=torch.bfloat16)
    wide[:, :256] = x
    out = r.clone()
    torch.ops.persimmon_rt.decode_linear_int8(wide[:, :256], q, s, b, out, out, False)
    check_against_fp32(out, fp32_reference(x, q, s, b, r, False),
                       lowp_composition(x, q, s, b, r, False, torch.bfloat16), floor=1e-5)


@requires_cuda
@pytest.mark.parametrize("args,message", [
    (lambda x, q, s: (x[:, :40], q[:, :40].contiguous(), s), "multiple of 16"),
    (lambda x, q, s: (x, q.float(), s), "weight must be Char"),
    (lambda x, q, s: (x, q, s[:-1]), r"scale must have shape \[N\]"),
    (lambda x, q, s: (x, q, s.half()), "scale must be Float"),
    (lambda x, q, s: (torch.cat([x] * 5), q, s), "1 to 16 rows"),
])
def test_argument_errors_name_the_problem(args, message):
    x, q, s, _, _ = make_case(4, 64, 48, torch.float16)
    x, q, s = args(x, q, s)
    out = torch.empty(x.shape[0], q.shape[0], device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.persimmon_rt.decode_linear_int8(x, q, s, None, None, out, False)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K", [(3, 16), (83, 272), (16384, 4096)])
def test_dequantize_kernel_equals_reference_bitwise(N, K, dtype):
    q, s = quantize_int8(torch.randn(N, K, device="cuda"))
    out = torch.full((N, K), float("nan"), device="cuda", dtype=dtype)
    torch.ops.persimmon_rt.dequantize_int8(q, s, out)
    want = torch.empty_like(out)
    reference.dequantize_int8(q, s, want)
    assert torch.equal(out, want)


@requires_cuda
def test_opcheck():
    x, q, s, b, r = make_case(3, 96, 128, torch.float16, True, True)
    out = torch.empty(3, 96, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.persimmon_rt.decode_linear_int8.default, (x, q, s, b, r, out, True))
    torch.library.opcheck(torch.ops.persimmon_rt.dequantize_int8.default,
                          (q, s, torch.empty(96, 128, device="cuda", dtype=torch.float16)))


@requires_cuda
def test_graph_replay_follows_inputs():
    check_chain_in_graph(2, -1, replays=3)                # the per-shape choice


# ---- the engine --------------------------------------------------------------------------------------

@requires_cuda
def test_demo_greedy_int8_equals_fp16_or_near_tie():
    from test_int8 import check_greedy_agreement

    from persimmon_rt.demo import demo_model_path
    from persimmon_rt.engine import Engine

    fp16 = Engine.from_pretrained(demo_model_path(), dtype=torch.float16, max_seq_len=128)
    int8 = Engine.from_pretrained(demo_model_path(), dtype=torch.float16, max_seq_len=128, quantize="int8")
    assert int8.weights.scheme == "int8" and int8.weights.lm_head.qweight.is_cuda
    print("\n".join(check_greedy_agreement(fp16, int8)))


def teacher_forced_logits(engine, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [len(tokens), V] of decode steps (one row, the GEMV path) fed `tokens` after `prompt`."""
    fwd = engine.forward
    out = [fwd.prefill([(0, prompt, 0, len(prompt))])[0]]
    for i, t in enumerate(tokens[:-1].tolist()):
        pos = len(prompt) + i
        lens = torch.tensor([pos + 1], dtype=torch.int32, device="cuda")
        pos_t = torch.tensor([pos], device="cuda")

        def attend(q, layer, lens=lens):
            o = torch.empty_like(q)
            ops.attention_decode(q, fwd.cache.k[layer][:1], fwd.cache.v[layer][:1], lens, o, fwd.scale)
            return o

        out.append(fwd.logits(torch.tensor([t], device="cuda"), pos_t, pos_t, attend)[0])
    return torch.stack(out)


@requires_cuda
def test_8b_shapes_int8_logits_track_fp16():
    """Random weights of the Persimmon-8B shapes, 512 decode steps teacher-forced with fp16's greedy tokens."""
    from persimmon_rt import PersimmonForCausalLM
    from persimmon_rt.config import PersimmonConfig
    from persimmon_rt.engine import Engine
    from persimmon_rt.loading import quantize_weights, weights_from_module

    config = PersimmonConfig.preset("persimmon-8b")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = PersimmonForCausalLM.from_config(config, device="cuda")
    finally:
        torch.set_default_dtype(previous)
    prompt = torch.randint(0, config.vocab_size, (16,))
    fp16 = Engine(model, config, max_seq_len=600)
    tokens = torch.tensor(fp16.generate([prompt.tolist()], max_new_tokens=512, stop_token_ids=[]).token_ids[0],
                          device="cuda")
    ref = teacher_forced_logits(fp16, prompt, tokens)
    del fp16
    int8 = Engine(None, config, max_seq_len=600, weights=quantize_weights(weights_from_module(model, config)))
    got = teacher_forced_logits(int8, prompt, tokens)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"8B shapes, 512 decode steps: max relative logit error {rel:.4f}, top-1 agreement {agree:.4f}")
    # Random weights give near-flat logits, so near ties are common and top-1 agreement is the weaker
    # signal here (measured on an H200: relative error 0.063, agreement 0.867); the demo-model tests check
    # greedy agreement on a trained distribution.
    assert rel < 0.1 and agree >= 0.8, (rel, agree)
