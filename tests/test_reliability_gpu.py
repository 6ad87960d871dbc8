"""Reliability on the GPU: long decode runs, a real out-of-memory error, KV-cache sizing, the fp16 range at
Persimmon-8B widths, and 8B-shaped logits against fp32. Each test skips without a GPU and the extension."""

import gc
import re
import tracemalloc

import pytest
import torch
import torch.nn.functional as F

import persimmon_rt as prt
from persimmon_rt import PersimmonConfig, ops, reference
from persimmon_rt.demo import demo_model_path
from persimmon_rt.cache import StaticKVCache
from persimmon_rt.engine import Engine

from op_utils import HAVE_CUDA_KERNELS, SKIP_REASON, check_against_fp32, poisoned_like

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA_KERNELS, reason=SKIP_REASON)]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(demo_model_path(), dtype=torch.float16, device="cuda", max_batch_size=4,
                                  max_seq_len=1024)


def test_ten_thousand_decode_steps_keep_memory_flat_and_outputs_identical(engine):
    prompts = [engine.tokenizer.encode(p) for p in ("BRUTUS:\n", "PORTIA:\nO", "CASSIUS:\nWhy")]
    kwargs = dict(max_new_tokens=101, temperature=0.8, top_p=0.95, seed=5, stop_token_ids=[])
    first = engine.generate(prompts, **kwargs).token_ids
    gc.collect()
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    tracemalloc.start()
    steps = 0
    for i in range(100):
        assert engine.generate(prompts, **kwargs).token_ids == first, f"call {i} differs"
        steps += engine.last_stats["decode_steps"]
        if i == 9:
            gc.collect()
            host_warm, _ = tracemalloc.get_traced_memory()
    gc.collect()
    host_end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    torch.cuda.synchronize()
    assert steps == 10_000
    assert torch.cuda.memory_allocated() == allocated and torch.cuda.memory_reserved() == reserved
    assert host_end - host_warm < 256 * 1024, f"host memory grew by {(host_end - host_warm) / 1024:.0f} KiB"


def test_out_of_memory_during_prefill_leaves_the_engine_working(engine):
    """A real allocator failure: the process is capped just above what it holds, so the prefill's first
    new activation buffer fails; after the cap is lifted the same request succeeds and matches."""
    prompt = torch.randint(0, engine.config.vocab_size, (900,)).tolist()
    batch = [prompt] * 4
    engine.capture([4])
    before = engine.generate(batch, max_new_tokens=8, stop_token_ids=[]).token_ids
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**20) / total)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            engine.generate(batch, max_new_tokens=8, stop_token_ids=[])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert engine.generate(batch, max_new_tokens=8, stop_token_ids=[]).token_ids == before


def test_a_cache_that_does_not_fit_names_the_largest_that_does(engine):
    config, seq = engine.config, 1024
    free, _ = torch.cuda.mem_get_info()
    per_row = StaticKVCache.nbytes(config, 1, seq, torch.float16)
    too_many = free // per_row + 64
    with pytest.raises(MemoryError, match="KV cache for max_batch_size") as info:
        Engine(None, config, max_batch_size=too_many, max_seq_len=seq, weights=engine.weights)
    largest = int(re.search(r"or max_batch_size=(\d+) at this length", str(info.value)).group(1))
    assert 0 < largest < too_many
    fits = Engine(None, config, max_batch_size=largest, max_seq_len=seq, weights=engine.weights)   # and it does fit
    assert fits.cache.k[0].shape[0] == largest
    del fits
    gc.collect()
    torch.cuda.empty_cache()


# ---- fp16 range at Persimmon-8B widths ----------------------------------------------------------------
# Residual streams of large LMs carry outlier channels in the thousands to tens of thousands, and relu^2
# squares MLP pre-activations: in fp16 anything above 255.9 squared overflows. The kernels accumulate and
# apply their epilogues in fp32 and round once, so values near the fp16 limit must come out finite and as
# accurate as plain PyTorch doing the same in fp32 and rounding.

def _outlier_rows(rows, width, scale, outlier):
    x = torch.randn(rows, width, device="cuda") * scale
    x[:, ::97] = outlier * torch.sign(torch.randn(rows, (width + 96) // 97, device="cuda"))
    return x.half()


def test_layernorm_with_residual_near_the_fp16_limit():
    x = _outlier_rows(64, 4096, 800.0, 1.2e4)
    res = _outlier_rows(64, 4096, 2000.0, 3.0e4)
    weight = (torch.randn(4096, device="cuda") * 0.2 + 1).half()
    bias = (torch.randn(4096, device="cuda") * 0.1).half()
    out, res_out = poisoned_like(x), poisoned_like(x)
    ops.layernorm(x, weight, bias, out, 1e-5, res, res_out)
    summed = (x.float() + res.float()).half()
    assert torch.equal(res_out, summed) and torch.isfinite(summed).all()
    ref = torch.empty(x.shape, device="cuda")
    reference.layernorm(summed.float(), weight.float(), bias.float(), ref, 1e-5)
    check_against_fp32(out, ref, F.layer_norm(summed.float(), (4096,), weight.float(), bias.float(), 1e-5).half())


def test_relu2_epilogues_up_to_the_fp16_limit():
    """MLP-up pre-activations up to ~250 (relu^2 ~ 62,500 < 65,504), prefill and decode paths."""
    pre = (torch.rand(64, 16384, device="cuda") * 500 - 250).half()
    bias = torch.randn(16384, device="cuda").half().clamp(-4, 4)
    out = poisoned_like(pre)
    ops.bias_relu2((pre.float() - 4).half(), bias, out)       # |x + bias| <= 254
    ref = torch.empty(pre.shape, device="cuda")
    reference.bias_relu2((pre.float() - 4).half().float(), bias.float(), ref)
    check_against_fp32(out, ref, ref.half())

    x = torch.randn(4, 4096, device="cuda").half()
    w = torch.randn(16384, 4096, device="cuda") * (120 / 4096 ** 0.5)          # |x W^T| up to ~600
    w *= (240 / (x.float() @ w.t()).abs().amax(0)).clamp(max=1.0)[:, None]       # every output <= ~240
    w = w.half()
    b = torch.zeros(16384, device="cuda").half()
    out = torch.empty(4, 16384, device="cuda").half()
    ops.decode_linear(x, w, b, None, out, True)
    ref = torch.empty(4, 16384, device="cuda")
    reference.decode_linear(x.float(), w.float(), b.float(), None, ref, True)
    assert ref.max() > 3e4                                    # the case reaches the top of the fp16 range
    check_against_fp32(out, ref, ref.half(), floor=ref.abs().max().item() * 2 ** -10)


def test_qk_layernorm_on_huge_projections():
    """q and k of magnitude ~1e4 (sum of squares ~1e10, far past fp16) normalise to the reference."""
    T, H, D = 16, 64, 64
    qkv = (torch.randn(T, H, 3, D, device="cuda") * 1e4).half()
    positions = torch.arange(T, device="cuda")
    inv_freq = reference.rope_inv_freq(32, 25000.0, "default", 1.0, 16384, None, device="cuda")
    lnw = [(torch.randn(D, device="cuda") * 0.2 + 1).half() for _ in range(2)]
    lnb = [(torch.randn(D, device="cuda") * 0.1).half() for _ in range(2)]
    caches = [torch.zeros(1, T, H, D, device="cuda").half() for _ in range(2)]
    q = torch.full((T, H, D), float("nan"), device="cuda").half()
    ops.qk_norm_rope_cache(qkv, positions, inv_freq, lnw[0], lnb[0], lnw[1], lnb[1], *caches, positions, q, 1e-5)
    ref_q = torch.empty(T, H, D, device="cuda")
    ref_caches = [torch.zeros(1, T, H, D, device="cuda") for _ in range(2)]
    reference.qk_norm_rope_cache(qkv.float(), positions, inv_freq, lnw[0].float(), lnb[0].float(), lnw[1].float(),
                                 lnb[1].float(), *ref_caches, positions, ref_q, 1e-5)
    for got, want in [(q, ref_q), (caches[0], ref_caches[0])]:
        check_against_fp32(got, want, want.half(), floor=2e-3)


# ---- 8B shapes against fp32 ----------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 70 * 2**30,
                    reason="needs a GPU with 70 GiB (the 8B model in fp32 and fp16 at once)")
def test_8b_shapes_first_logits_within_1e2_of_fp32():
    """Random weights of the Persimmon-8B shapes: the engine's fp16 logits after a 48-token prefill (cuBLAS
    path) and after one decode step (GEMV path, split-KV attention) within 1e-2 relative of fp32."""
    config = PersimmonConfig.preset("persimmon-8b")
    ref = prt.PersimmonForCausalLM.from_config(config, dtype=torch.float32, device="cuda").eval()
    model = prt.PersimmonForCausalLM.from_config(config, dtype=torch.float16, device="cuda").eval()
    with torch.no_grad():
        for p16, p32 in zip(model.parameters(), ref.parameters()):
            p16.copy_(p32)
    engine = Engine(model, config, max_batch_size=1, max_seq_len=64)
    engine.capture([1])                           # as generate does: capture before the prefill
    prompt = torch.randint(0, config.vocab_size, (48,))
    with torch.no_grad():
        prefill = engine.forward.prefill([(0, prompt, 0, 48)])[0]
        token = prefill.argmax().view(1)
        ids = torch.cat([prompt.cuda(), token])[None]
        want = ref(ids).logits[0, -2:].float()
        seq_lens = torch.tensor([49], dtype=torch.int32, device="cuda")

        def attend(q, layer):
            out = torch.empty_like(q)
            ops.attention_decode(q, engine.cache.k[layer], engine.cache.v[layer], seq_lens, out, engine.forward.scale)
            return out

        step = engine.forward.logits(token, torch.tensor([48], device="cuda"), torch.tensor([48], device="cuda"), attend)[0]
    for got, expected in [(prefill, want[0]), (step, want[1])]:
        assert got.dtype == torch.float32
        assert ((got - expected).norm() / expected.norm()).item() < 1e-2
