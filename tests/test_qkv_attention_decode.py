"""qkv_attention_decode: qk_norm_rope_cache of one new token per sequence + attention_decode, in one op.

CPU tests check the reference (that composition) against an independent formulation, its slot rule, and
that the engine's decode through it equals the unfused pair. CUDA tests check the kernel against the
unfused kernels bit for bit and against the fp32 reference (error at most twice plain PyTorch's in the
low precision), over split boundaries, idle rows, head dims, the LayerNorm / rotary variants and CUDA-graph
replay. Cache positions from the new token's on start as NaN: the new key must come from the qkv row, not
from the cache it is being written into.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import persimmon_rt as prt
from persimmon_rt import ops, reference
from persimmon_rt.engine import Engine

from model_utils import random_model, tiny_config
from op_utils import capture_graph, check_against_fp32, qk_layernorm_params, requires_cuda

EPS = 1e-5
THETA = 25000.0


class Case:
    """Fresh random inputs: row b attends to lens[b] keys, the last of them the new token at slot
    b*S + lens[b] - 1; an idle row (0) writes at b*S + S - 1. qkv is a strided view of a padded projection."""

    def __init__(self, lens, S, H, D, R, dtype, device, *, layernorm=True, with_bias=True,
                 index_dtype=torch.int64, positions=None):
        B = len(lens)
        proj = (torch.randn(B, H * 3 * D + 8, device=device) * 2 + 0.5).to(dtype)
        self.qkv = proj[:, :H * 3 * D].view(B, H, 3, D)
        pos = [L - 1 if L else 0 for L in lens] if positions is None else positions
        self.positions = torch.tensor(pos, dtype=index_dtype, device=device)
        self.inv_freq = reference.rope_inv_freq(R, THETA, device=device)
        self.q_weight, self.k_weight, self.q_bias, self.k_bias = qk_layernorm_params(D, dtype, device, layernorm,
                                                                                     with_bias)
        self.slots = torch.tensor([b * S + (L - 1 if L else S - 1) for b, L in enumerate(lens)], dtype=index_dtype,
                                  device=device)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.k_cache = torch.randn(B, S, H, D, device=device).to(dtype)
        self.v_cache = torch.randn(B, S, H, D, device=device).to(dtype)
        for b, L in enumerate(lens):
            self.k_cache[b, max(L - 1, 0):] = float("nan")
            self.v_cache[b, max(L - 1, 0):] = float("nan")
        self.scale = reference.default_scale(D)

    def weights(self, cast=lambda t: t):
        return [None if w is None else cast(w) for w in (self.q_weight, self.q_bias, self.k_weight, self.k_bias)]

    def run(self, fn, dtype=None):
        """fn (the op or its reference) on copies of the caches, in `dtype` (the inputs' if None)."""
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        k_cache, v_cache = cast(self.k_cache).clone(), cast(self.v_cache).clone()
        out = torch.full(self.qkv[:, :, 0].shape, float("nan"), dtype=k_cache.dtype, device=k_cache.device)
        fn(cast(self.qkv), self.positions, self.inv_freq, *self.weights(cast), k_cache, v_cache, self.slots,
           self.seq_lens, out, EPS, self.scale)
        return out, k_cache, v_cache

    def unfused(self, qk_op, attention_op):
        """The pair the op replaces: qk_norm_rope_cache, then attention_decode of its q."""
        def fn(qkv, positions, inv_freq, qw, qb, kw, kb, k_cache, v_cache, slots, seq_lens, out, eps, scale):
            q = torch.empty_like(out)
            qk_op(qkv, positions, inv_freq, qw, qb, kw, kb, k_cache, v_cache, slots, q, eps)
            attention_op(q, k_cache, v_cache, seq_lens, out, scale)
        return self.run(fn)

    def plain(self, dtype):
        """Independent formulation in plain PyTorch in `dtype`: LayerNorm module math, rotate_half on the
        rotary slice, softmax attention over the cache rows followed by the new key. Returns out, new k."""
        q, k, v = (self.qkv[:, :, i].to(dtype) for i in range(3))
        D, R = q.shape[-1], 2 * self.inv_freq.numel()
        if self.q_weight is not None:
            w = [None if t is None else t.to(dtype) for t in self.weights()]
            q = F.layer_norm(q, (D,), w[0], w[1], EPS)
            k = F.layer_norm(k, (D,), w[2], w[3], EPS)
        freqs = torch.outer(self.positions.float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

        def rope(x):
            x_rot, x_pass = x[..., :R], x[..., R:]
            rotated = torch.cat((-x_rot[..., R // 2:], x_rot[..., :R // 2]), dim=-1)
            return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

        q, k = rope(q), rope(k)
        out = torch.zeros_like(q)
        for b, L in enumerate(self.seq_lens.tolist()):
            if L:
                keys = torch.cat((self.k_cache[b, :L - 1].to(dtype), k[b][None])).transpose(0, 1)   # [H, L, D]
                values = torch.cat((self.v_cache[b, :L - 1].to(dtype), v[b][None])).transpose(0, 1)
                out[b] = F.scaled_dot_product_attention(q[b][:, None], keys, values, scale=self.scale)[:, 0]
        return out, k


def written(case: Case, cache: torch.Tensor) -> torch.Tensor:
    B, S, H, D = cache.shape
    return cache.view(B * S, H, D)[case.slots.long()]


# ---- CPU: the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("R,layernorm", [(8, True), (16, True), (0, True), (8, False)])
def test_reference_matches_independent_formulation(R, layernorm):
    case = Case([5, 0, 1, 12], 12, 3, 16, R, torch.float32, "cpu", layernorm=layernorm)
    out, k_cache, v_cache = case.run(ops.qkv_attention_decode)
    want_out, want_k = case.plain(torch.float32)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(written(case, k_cache), want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(written(case, v_cache), case.qkv[:, :, 2]), "v is written as it is"
    assert torch.equal(out[1], torch.zeros_like(out[1])), "an idle row's output is zeros"
    # Only the new tokens' slots were written (the idle row's included): the rest is as it was.
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool)
    untouched.view(-1)[case.slots] = False
    torch.testing.assert_close(k_cache[untouched], case.k_cache[untouched], rtol=0, atol=0, equal_nan=True)


def test_reference_is_the_unfused_pair():
    case = Case([3, 9, 0], 10, 2, 16, 8, torch.bfloat16, "cpu")
    for got, want in zip(case.run(reference.qkv_attention_decode),
                         case.unfused(reference.qk_norm_rope_cache, reference.attention_decode)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("lens,slots", [([4, 2], [3, 5]),      # row 1's slot is not its last key (6)
                                        ([4, 0], [3, 3])])     # idle row 1 writes outside its cache row
def test_reference_rejects_a_slot_that_is_not_the_last_key(lens, slots):
    case = Case(lens, 5, 2, 16, 8, torch.float32, "cpu")
    case.slots.copy_(torch.tensor(slots))
    with pytest.raises(ValueError, match="slot"):
        case.run(ops.qkv_attention_decode)


def test_cpu_engine_decode_through_the_fused_op_equals_the_unfused_pair():
    """Forward.decode takes the fused op only with the CUDA kernels; forced on here, its reference path runs
    the same composition, so the tokens (with idle rows: 3 of a bucket of 4) must be identical."""
    model = random_model(prt.PersimmonForCausalLM, tiny_config(eos_token_id=None, initializer_range=0.25))
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (3, 11, 6)]
    results = []
    for fused in (False, True):
        engine = Engine(model, model.config, max_batch_size=4, max_seq_len=32)
        assert not engine.forward.fuse_decode_attention, "no CUDA kernels here: the unfused pair by default"
        engine.forward.fuse_decode_attention = fused
        results.append(engine.generate(prompts, max_new_tokens=12, stop_token_ids=[]).token_ids)
    assert results[0] == results[1]


# ---- CUDA kernel ------------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16]


def check_kernel(case: Case):
    """Equal to the unfused kernels bit for bit, and within the derived bound of the fp32 reference."""
    out, k_cache, v_cache = case.run(torch.ops.persimmon_rt.qkv_attention_decode)
    pair = case.unfused(torch.ops.persimmon_rt.qk_norm_rope_cache, torch.ops.persimmon_rt.attention_decode)
    for name, got, want in zip(("out", "k_cache", "v_cache"), (out, k_cache, v_cache), pair):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, name=name: f"{name} vs unfused: {m}")
    ref_out, ref_k, _ = case.run(reference.qkv_attention_decode, torch.float32)
    low_out, low_k = case.plain(out.dtype)
    check_against_fp32(out, ref_out, low_out, what="out")
    check_against_fp32(written(case, k_cache), written(case, ref_k), low_k, what="new k")
    assert torch.equal(written(case, v_cache), case.qkv[:, :, 2]), "v must be written as it is"


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 2, 64, 65, 128, 129, 256, 257, 385, 1000, 4095, 4096])
def test_persimmon_shape_batch1(length, dtype):
    """64 heads x 64 at batch 1 (several splits): the new key first, last and alone in its split (65, 129,
    257, 385 start a split of 64, 64, 128, 128 keys where the split count is 4), a single key, a full cache."""
    check_kernel(Case([length], 4096, 64, 64, 32, dtype, "cuda"))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch8_with_idle_rows(dtype):
    """A bucket of 8 with idle rows (seq_lens 0, slot at the end of their own row): one split a row."""
    check_kernel(Case([2048, 1, 0, 777, 2048, 5, 0, 2047], 2048, 64, 64, 32, dtype, "cuda"))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_rows_idle(dtype):
    check_kernel(Case([0, 0, 0], 256, 64, 64, 32, dtype, "cuda"))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens", [[1, 300, 0, 1031], [4096]])
def test_head_dim_128(lens, dtype):
    check_kernel(Case(lens, 4096, 32, 128, 64, dtype, "cuda"))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["no_layernorm", "no_bias", "int32", "no_rotary", "full_rotary",
                                     "far_positions"])
def test_variants(variant, dtype):
    kwargs = {"no_layernorm": dict(layernorm=False), "no_bias": dict(with_bias=False),
              "int32": dict(index_dtype=torch.int32), "no_rotary": dict(R=0), "full_rotary": dict(R=64),
              "far_positions": dict(positions=[16000, 9, 12345])}[variant]
    R = kwargs.pop("R", 32)
    check_kernel(Case([83, 0, 1000], 1024, 64, 64, R, dtype, "cuda", **kwargs))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_graph_replay_follows_device_tensors(dtype):
    """Capture once (split and combine kernels), then change lengths, slots, positions and data in place
    and replay, rows going idle and coming back: the replay equals the unfused kernels run eagerly."""
    S, H, D = 4096, 64, 64
    case = Case([1, 4096], S, H, D, 32, dtype, "cuda")
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    out = torch.empty_like(case.qkv[:, :, 0])
    weights = case.weights()
    graph = capture_graph(lambda: torch.ops.persimmon_rt.qkv_attention_decode(
        case.qkv, case.positions, case.inv_freq, *weights, k_cache, v_cache, case.slots, case.seq_lens, out, EPS,
        case.scale))
    for lens in ([1, 4096], [4096, 0], [0, 0], [257, 4095], [17, 2], [0, 129]):
        fresh = Case(lens, S, H, D, 32, dtype, "cuda")
        for name in ("qkv", "positions", "slots", "seq_lens"):
            getattr(case, name).copy_(getattr(fresh, name))
        case.k_cache.copy_(fresh.k_cache)
        case.v_cache.copy_(fresh.v_cache)
        k_cache.copy_(fresh.k_cache)
        v_cache.copy_(fresh.v_cache)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        pair = case.unfused(torch.ops.persimmon_rt.qk_norm_rope_cache, torch.ops.persimmon_rt.attention_decode)
        for got, want in zip((out, k_cache, v_cache), pair):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, lens=lens: f"lens {lens}: {m}")


@requires_cuda
def test_opcheck():
    case = Case([0, 5, 300], 300, 2, 64, 32, torch.float16, "cuda")
    out = torch.empty_like(case.qkv[:, :, 0])
    torch.library.opcheck(torch.ops.persimmon_rt.qkv_attention_decode.default,
                          (case.qkv, case.positions, case.inv_freq, *case.weights(), case.k_cache, case.v_cache,
                           case.slots, case.seq_lens, out, EPS, case.scale))


@requires_cuda
def test_rejects_bad_arguments_before_launch():
    case = Case([3, 1], 8, 2, 64, 32, torch.float16, "cuda")
    op = torch.ops.persimmon_rt.qkv_attention_decode
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    out = torch.empty_like(case.qkv[:, :, 0])
    args = lambda **kw: {**dict(qkv=case.qkv, positions=case.positions, inv_freq=case.inv_freq,  # noqa: E731
                                q_weight=case.q_weight, q_bias=case.q_bias, k_weight=case.k_weight,
                                k_bias=case.k_bias, k_cache=k_cache, v_cache=v_cache, slot_mapping=case.slots,
                                seq_lens=case.seq_lens, out=out, eps=EPS, scale=case.scale), **kw}
    odd = Case([3, 1], 8, 2, 96, 32, torch.float16, "cuda")
    cases = [
        (dict(qkv=odd.qkv, k_cache=odd.k_cache, v_cache=odd.v_cache, out=torch.empty_like(odd.qkv[:, :, 0]),
              q_weight=None, q_bias=None, k_weight=None, k_bias=None), "head_dim"),
        (dict(seq_lens=case.seq_lens.long()), "seq_lens must be Int"),
        (dict(out=out.bfloat16()), "out must be Half"),
        (dict(k_cache=k_cache[:1]), r"k_cache must have shape \[B, S, H, D\]"),
        (dict(slot_mapping=case.slots[:1]), r"slot_mapping must have shape \[B\]"),
        (dict(positions=case.positions.float()), "positions must be int32 or int64"),
        (dict(out=case.qkv.as_strided(out.shape, (out.shape[1] * out.shape[2], out.shape[2], 1))),
         "out must not overlap qkv"),
    ]
    for kw, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(**args(**kw))
    torch.cuda.synchronize()
    torch.testing.assert_close(k_cache, case.k_cache, rtol=0, atol=0, equal_nan=True, msg="a rejected call launched")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_engine_fused_equals_unfused(dtype):
    """The engine's captured decode step with the fused op and with the unfused pair: the same tokens, with
    an idle row in the bucket (3 rows of 4) and a row joining after others finished."""
    config = tiny_config(eos_token_id=None, initializer_range=0.25, max_position_embeddings=128, hidden_size=256,
                         num_attention_heads=4)   # head_dim 64
    model = random_model(prt.PersimmonForCausalLM, config).to(dtype).to("cuda")
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (5, 17, 9)]
    results = []
    for fused in (False, True):
        engine = Engine(model, config, max_batch_size=4, max_seq_len=128)
        assert engine.forward.fuse_decode_attention
        engine.forward.fuse_decode_attention = fused
        first = engine.generate(prompts, max_new_tokens=48, stop_token_ids=[]).token_ids
        later = engine.generate([prompts[1]], max_new_tokens=20, stop_token_ids=[]).token_ids
        results.append((first, later))
    assert results[0] == results[1]
