"""attention_decode: one query per sequence over its first seq_lens[b] cached keys (0 = idle row).

CPU tests check the fp32 reference against SDPA. CUDA tests check the split-KV kernel against the
reference in fp32 (error at most twice plain PyTorch's in the low precision, plus a tiny floor), and
that a captured CUDA graph replays correctly after the lengths in the device tensor change.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from persimmon_rt import reference

from op_utils import capture_graph, check_against_fp32, poisoned_like, requires_cuda


def make_case(lens: list[int], cache_len: int, heads: int, head_dim: int, dtype, device):
    """Random q and caches; positions at or beyond seq_lens[b] hold NaN so a stray read shows."""
    batch = len(lens)
    q = torch.randn(batch, heads, head_dim, device=device).to(dtype)
    k_cache = torch.randn(batch, cache_len, heads, head_dim, device=device).to(dtype)
    v_cache = torch.randn(batch, cache_len, heads, head_dim, device=device).to(dtype)
    poison_beyond(k_cache, v_cache, lens)
    return q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device=device)


def poison_beyond(k_cache, v_cache, lens):
    for b, L in enumerate(lens):
        k_cache[b, L:] = float("nan")
        v_cache[b, L:] = float("nan")


def lowp_attention(q, k_cache, v_cache, seq_lens):
    """The same attention in plain PyTorch in the inputs' precision (the error baseline)."""
    out = torch.zeros_like(q)
    scale = reference.default_scale(q.shape[-1])
    for b, L in enumerate(seq_lens.tolist()):
        if L:
            kb, vb = k_cache[b, :L].transpose(0, 1), v_cache[b, :L].transpose(0, 1)   # [H, L, D]
            probs = torch.softmax(torch.matmul(q[b][:, None, :], kb.transpose(1, 2)) * scale, dim=-1)
            out[b] = torch.matmul(probs, vb)[:, 0]
    return out


def fp32_reference(q, k_cache, v_cache, seq_lens):
    ref = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    reference.attention_decode(q.float(), k_cache.float(), v_cache.float(), seq_lens, ref,
                               reference.default_scale(q.shape[-1]))
    return ref


def run_and_check(lens, cache_len, heads, head_dim, dtype):
    q, k_cache, v_cache, seq_lens = make_case(lens, cache_len, heads, head_dim, dtype, "cuda")
    out = poisoned_like(q)
    torch.ops.persimmon_rt.attention_decode(q, k_cache, v_cache, seq_lens, out, reference.default_scale(head_dim))
    check_against_fp32(out, fp32_reference(q, k_cache, v_cache, seq_lens),
                       lowp_attention(q, k_cache, v_cache, seq_lens))


# ---- CPU: the reference against SDPA ----------------------------------------------------------------

def test_reference_matches_sdpa():
    heads, head_dim, lens = 3, 16, [5, 0, 1, 12]
    q, k_cache, v_cache, seq_lens = make_case(lens, 12, heads, head_dim, torch.float32, "cpu")
    out = poisoned_like(q)
    reference.attention_decode(q, k_cache, v_cache, seq_lens, out, 0.7)
    for b, L in enumerate(lens):
        if L == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        want = F.scaled_dot_product_attention(q[b][:, None, :], k_cache[b, :L].transpose(0, 1),
                                              v_cache[b, :L].transpose(0, 1), scale=0.7)
        torch.testing.assert_close(out[b], want[:, 0], rtol=1e-5, atol=1e-5)


# ---- CUDA kernel ------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_lengths(head_dim, dtype):
    """Idle rows, 1 and 2 keys, odd lengths, and the full cache in one batch."""
    cache_len = 1031
    run_and_check([0, 1, 2, 7, 83, 0, 1000, cache_len], cache_len, 4, head_dim, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 83, 2048, 4097, 16384])
def test_persimmon_shape_batch1(length, dtype):
    """64 heads x 64 at batch 1: the split-KV path (many splits over one sequence)."""
    run_and_check([length], 16384, 64, 64, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_persimmon_shape_batch8(dtype):
    run_and_check([2048, 1, 0, 777, 2048, 5, 1500, 2047], 2048, 64, 64, dtype)


@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_many_rows_single_split(head_dim):
    """Enough (sequence, head) rows that each row gets one split and the kernel writes the output itself."""
    run_and_check([0, 1, 300, 64, 65, 129, 1000, 999] * 8, 1000, 64, head_dim, torch.float16)


@requires_cuda
def test_rejects_unsupported_head_dim():
    q, k_cache, v_cache, seq_lens = make_case([3], 4, 2, 96, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.persimmon_rt.attention_decode(q, k_cache, v_cache, seq_lens, torch.empty_like(q), 0.1)


@requires_cuda
def test_opcheck():
    q, k_cache, v_cache, seq_lens = make_case([0, 5, 300], 300, 2, 64, torch.float16, "cuda")
    torch.library.opcheck(torch.ops.persimmon_rt.attention_decode,
                          (q, k_cache, v_cache, seq_lens, torch.empty_like(q), 0.125))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_replay_with_new_lengths(dtype):
    """Capture once (split and combine kernels), then change the lengths and the data in place and
    replay: the launch must not depend on the lengths it was captured with."""
    heads, head_dim, cache_len = 64, 64, 4096
    q, k_cache, v_cache, seq_lens = make_case([1, 4096], cache_len, heads, head_dim, dtype, "cuda")
    out = poisoned_like(q)
    scale = reference.default_scale(head_dim)
    graph = capture_graph(lambda: torch.ops.persimmon_rt.attention_decode(q, k_cache, v_cache, seq_lens, out, scale))
    for lens in ([1, 4096], [4096, 0], [0, 0], [2048, 4095], [17, 2], [333, 1]):
        q.copy_(torch.randn_like(q))
        k_cache.copy_(torch.randn_like(k_cache))
        v_cache.copy_(torch.randn_like(v_cache))
        poison_beyond(k_cache, v_cache, lens)
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_against_fp32(out, fp32_reference(q, k_cache, v_cache, seq_lens),
                           lowp_attention(q, k_cache, v_cache, seq_lens))
