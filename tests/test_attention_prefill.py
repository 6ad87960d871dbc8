"""attention_prefill: causal attention of packed new tokens over each sequence's KV cache.

CPU tests check the fp32 reference against an independent formulation (SDPA with is_causal or an
explicit mask). CUDA tests check the kernel against the reference in fp32: its error must be at most
twice that of the same attention computed by plain PyTorch in the low precision, plus a tiny floor.
Every CUDA case runs once per kernel (PERSIMMON_RT_PREFILL_ATTENTION=wgmma, the Hopper kernel, skipped
where the build or the GPU lacks it; =mma_sync, the portable one) and checks that the asked-for kernel ran.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from persimmon_rt import ops, reference

from op_utils import capture_graph, check_against_fp32, poisoned_like, requires_cuda

KERNEL_ENV = "PERSIMMON_RT_PREFILL_ATTENTION"


def make_case(n_q: list[int], n_kv: list[int], heads: int, head_dim: int, dtype, device, pad: int = 3,
              cache_len: int | None = None):
    """Random inputs for sequences with n_q[b] new tokens and n_kv[b] keys in total (prefix = n_kv - n_q).

    Cache positions at or beyond seq_lens[b] (and `pad` extra rows past the longest sequence, or up to
    `cache_len`) hold NaN, so a kernel that reads a key it must not see produces NaN.
    """
    batch = len(n_q)
    cache_len = max(n_kv) + pad if cache_len is None else cache_len
    q = torch.randn(sum(n_q), heads, head_dim, device=device).to(dtype)
    k_cache = torch.randn(batch, cache_len, heads, head_dim, device=device).to(dtype)
    v_cache = torch.randn(batch, cache_len, heads, head_dim, device=device).to(dtype)
    for b, L in enumerate(n_kv):
        k_cache[b, L:] = float("nan")
        v_cache[b, L:] = float("nan")
    cu = torch.tensor([0] + list(itertools.accumulate(n_q)), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(n_kv, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, cu, seq_lens


def lowp_attention(q, k_cache, v_cache, cu, seq_lens):
    """The same causal attention in plain PyTorch in the inputs' precision (the error baseline)."""
    out = torch.empty_like(q)
    cu_l, lens = cu.tolist(), seq_lens.tolist()
    scale = reference.default_scale(q.shape[-1])
    for b, L in enumerate(lens):
        n = cu_l[b + 1] - cu_l[b]
        if n == 0:
            continue
        qb = q[cu_l[b]:cu_l[b + 1]].transpose(0, 1)               # [H, n, D]
        kb = k_cache[b, :L].transpose(0, 1)
        vb = v_cache[b, :L].transpose(0, 1)
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale
        mask = torch.arange(L, device=q.device)[None, :] > torch.arange(L - n, L, device=q.device)[:, None]
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        out[cu_l[b]:cu_l[b + 1]] = torch.matmul(probs, vb).transpose(0, 1)
    return out


def check_output(out, q, k_cache, v_cache, cu, seq_lens):
    ref = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    reference.attention_prefill(q.float(), k_cache.float(), v_cache.float(), cu, seq_lens, q.shape[0], ref,
                                reference.default_scale(q.shape[-1]))
    check_against_fp32(out, ref, lowp_attention(q, k_cache, v_cache, cu, seq_lens))


def run_and_check(kernel, n_q, n_kv, heads, head_dim, dtype, max_seqlen_q=None, pad=3):
    expect_kernel(kernel, head_dim)
    q, k_cache, v_cache, cu, seq_lens = make_case(n_q, n_kv, heads, head_dim, dtype, "cuda", pad=pad)
    out = poisoned_like(q)
    torch.ops.persimmon_rt.attention_prefill(q, k_cache, v_cache, cu, seq_lens, max_seqlen_q or max(n_q), out,
                                             reference.default_scale(head_dim))
    check_output(out, q, k_cache, v_cache, cu, seq_lens)


@pytest.fixture(params=["wgmma", "mma_sync"])
def kernel(request, monkeypatch):
    """The prefill kernel a test asks for through the environment (read by the launcher at every call)."""
    monkeypatch.setenv(KERNEL_ENV, request.param)
    return request.param


def expect_kernel(kernel: str, head_dim: int) -> None:
    """Skips where the asked-for kernel does not exist (wgmma off Hopper); otherwise
    asserts it is the one the op will run, so no case silently tests the other kernel twice."""
    got = ops.attention_prefill_kernel_name(head_dim)
    if kernel == "wgmma" and got != "wgmma":
        pytest.skip(f"no wgmma prefill kernel for head_dim {head_dim} here (needs an sm_90a build on a 9.0 GPU)")
    assert got == kernel


# ---- CPU: the reference against independent formulations ------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 83])
def test_reference_matches_sdpa_causal(n):
    heads, head_dim = 3, 16
    q, k_cache, v_cache, cu, seq_lens = make_case([n], [n], heads, head_dim, torch.float32, "cpu")
    out = torch.empty_like(q)
    reference.attention_prefill(q, k_cache, v_cache, cu, seq_lens, n, out, 0.3)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k_cache[0, :n].transpose(0, 1),
                                          v_cache[0, :n].transpose(0, 1), is_causal=True, scale=0.3)
    torch.testing.assert_close(out, want.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_reference_matches_sdpa_masked_chunks():
    """Packed sequences with cached prefixes (and one with no new tokens) against explicit masks."""
    heads, head_dim = 2, 8
    n_q, n_kv = [5, 0, 1, 9], [12, 4, 7, 9]
    q, k_cache, v_cache, cu, seq_lens = make_case(n_q, n_kv, heads, head_dim, torch.float32, "cpu")
    out = poisoned_like(q)
    reference.attention_prefill(q, k_cache, v_cache, cu, seq_lens, max(n_q), out, 0.5)
    for b, (n, L) in enumerate(zip(n_q, n_kv)):
        if n == 0:
            continue
        allowed = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]   # key j visible to query i
        want = F.scaled_dot_product_attention(q[cu[b]:cu[b + 1]].transpose(0, 1), k_cache[b, :L].transpose(0, 1),
                                              v_cache[b, :L].transpose(0, 1), attn_mask=allowed, scale=0.5)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], want.transpose(0, 1), rtol=1e-5, atol=1e-5)


# ---- CUDA kernels ---------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128], ids=["hd64", "hd128"])
@pytest.mark.parametrize("n", [1, 7, 83, 128, 129, 1029, 4096])
def test_single_sequence(n, head_dim, dtype, kernel):
    run_and_check(kernel, [n], [n], 4, head_dim, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128], ids=["hd64", "hd128"])
@pytest.mark.parametrize("n", [8192, 16384])
def test_long_sequence(n, head_dim, dtype, kernel):
    """Prompts as long as the engine's: 16K tokens, all of it in one chunk."""
    run_and_check(kernel, [n], [n], 2, head_dim, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128], ids=["hd64", "hd128"])
def test_packed_sequences(head_dim, dtype, kernel):
    n = [83, 1, 1029, 7, 300, 128]
    run_and_check(kernel, n, n, 4, head_dim, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128], ids=["hd64", "hd128"])
def test_chunked_prefill_with_cached_prefix(head_dim, dtype, kernel):
    """New chunks after cached prefixes, one sequence idle (no new tokens) and one decode-like row; the
    grid bound is the loose one a caller has without reading cu_seqlens_q (all tokens)."""
    n_q = [7, 83, 1, 0, 200, 129]
    n_kv = [100, 583, 4096, 50, 1200, 4100]
    run_and_check(kernel, n_q, n_kv, 4, head_dim, dtype, max_seqlen_q=sum(n_q))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128], ids=["hd64", "hd128"])
def test_long_chunk_after_long_prefix(head_dim, dtype, kernel):
    """The second chunk of a 16K prompt (12000 tokens cached) packed with a shorter chunk."""
    run_and_check(kernel, [4384, 1000], [16384, 9001], 2, head_dim, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128], ids=["hd64", "hd128"])
def test_cache_without_padding(head_dim, dtype, kernel):
    """Caches exactly as long as their longest sequence: the last row's last key tile runs past the end
    of the whole cache tensor (and its rows past the end are NaN in every half of the tile)."""
    run_and_check(kernel, [77, 200], [77, 200], 4, head_dim, dtype, pad=0)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_persimmon_shape(dtype, kernel):
    """64 heads x 64, the model's layer shape, on a 2048-token prompt."""
    run_and_check(kernel, [2048], [2048], 64, 64, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128], ids=["hd64", "hd128"])
def test_graph_replay_with_new_inputs(head_dim, dtype, kernel):
    """Captured once, then replayed over new contents of the same buffers: other prompts, lengths and
    prefixes (the same token count), as a captured prefill would be reused."""
    expect_kernel(kernel, head_dim)
    heads, cache_len = 4, 2100
    cases = [([300, 129, 40], [700, 129, 2048]), ([100, 329, 40], [1000, 400, 41]), ([1, 1, 467], [2000, 9, 467])]
    buffers = make_case(*cases[0], heads, head_dim, dtype, "cuda", cache_len=cache_len)
    q, k_cache, v_cache, cu, seq_lens = buffers
    max_q = q.shape[0]   # the bound a captured caller has for any split of its tokens
    out = poisoned_like(q)
    scale = reference.default_scale(head_dim)
    graph = capture_graph(
        lambda: torch.ops.persimmon_rt.attention_prefill(q, k_cache, v_cache, cu, seq_lens, max_q, out, scale))
    for n_q, n_kv in cases:
        for buffer, new in zip(buffers, make_case(n_q, n_kv, heads, head_dim, dtype, "cuda", cache_len=cache_len)):
            buffer.copy_(new)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_output(out, q, k_cache, v_cache, cu, seq_lens)


@requires_cuda
def test_kernel_choice(monkeypatch):
    """The environment picks the kernel where both exist; the wgmma kernel exists on Hopper (an sm_90a
    build on a 9.0 GPU) for head_dim 64 and 128 and is the default there; anything but the two names is an
    error."""
    hopper = torch.cuda.get_device_capability() == (9, 0) and "90a" in ops.CUDA_ARCHS
    for head_dim in (64, 128):
        monkeypatch.setenv(KERNEL_ENV, "wgmma")
        assert ops.attention_prefill_kernel_name(head_dim) == ("wgmma" if hopper else "mma_sync")
        monkeypatch.setenv(KERNEL_ENV, "mma_sync")
        assert ops.attention_prefill_kernel_name(head_dim) == "mma_sync"
        monkeypatch.delenv(KERNEL_ENV)
        assert ops.attention_prefill_kernel_name(head_dim) == ("wgmma" if hopper else "mma_sync")  # the default
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(RuntimeError, match=KERNEL_ENV):
        ops.attention_prefill_kernel_name(64)
    q, k_cache, v_cache, cu, seq_lens = make_case([4], [4], 2, 64, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match=KERNEL_ENV):
        torch.ops.persimmon_rt.attention_prefill(q, k_cache, v_cache, cu, seq_lens, 4, torch.empty_like(q), 0.1)


@requires_cuda
def test_rejects_unsupported_head_dim():
    q, k_cache, v_cache, cu, seq_lens = make_case([4], [4], 2, 96, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.persimmon_rt.attention_prefill(q, k_cache, v_cache, cu, seq_lens, 4, torch.empty_like(q), 0.1)


@requires_cuda
def test_opcheck(kernel):
    expect_kernel(kernel, 64)
    q, k_cache, v_cache, cu, seq_lens = make_case([7, 83], [20, 83], 2, 64, torch.float16, "cuda")
    out = torch.empty_like(q)
    torch.library.opcheck(torch.ops.persimmon_rt.attention_prefill,
                          (q, k_cache, v_cache, cu, seq_lens, 83, out, 0.125))
