"""One function per fused op: the CUDA kernel (torch.ops.persimmon_rt.*) for CUDA tensors when the
extension is built, the fp32 PyTorch reference (reference.py) otherwise. Signatures match reference.py;
callers above this module never know which one ran.

The kernels' limits, read from the built extension (csrc/ states each once), for callers that pick a
path by them instead of restating them:

- ``HAVE_CUDA_EXT``: whether ``persimmon_rt._C`` is built and imported.
- ``CUDA_ARCHS``: tuple of the architectures the extension was built for, e.g. ``("90a",)``.
- ``DECODE_LINEAR_MAX_ROWS``: most rows (decode batch) ``decode_linear`` takes on the GPU; larger
  batches go to cuBLAS.
- ``FOLDED_LN_MAX_STAGE_BYTES``, ``FOLDED_LN_K_MULTIPLE``: ``decode_linear_folded_ln`` takes x of M rows and K
  columns on the GPU when M * (K + 8) * element size fits the first and K is a multiple of the second.
- ``ATTENTION_HEAD_DIMS``: tuple of the head dims the attention kernels are built for, e.g. ``(64, 128)``.
- ``LAYERNORM_MAX_HIDDEN``: widest row ``layernorm`` takes on the GPU.
- ``ALL_REDUCE_MAX_ROWS``, ``ALL_REDUCE_MAX_RANKS``, ``ALL_REDUCE_FLAG_BYTES``, ``ALL_REDUCE_SLOTS``: the
  fused tensor-parallel all-reduce's limits and buffer layout (fast_all_reduce.py).
- ``DECODE_LINEAR_CONFIGS``: names of the GEMV's compiled tile configurations (benchmark sweeps only).
- ``DECODE_LINEAR_INT8_CONFIGS``: the same for the int8 GEMV (``decode_linear_int8``).
- ``decode_linear_int8_config(rows, n, k)``: which of them the int8 GEMV picks for that shape.
- ``kernels_support(head_dim)``: whether the CUDA kernels cover a model of that head dim (the attention
  ops are the only ones with a head-dim list).
- ``attention_prefill_kernel_name(head_dim)``: which kernel ``attention_prefill`` runs for that head dim on
  the current GPU, ``"wgmma"`` (Hopper) or ``"mma_sync"``; ``PERSIMMON_RT_PREFILL_ATTENTION=wgmma|mma_sync``
  asks for one (read at every call).

Without the extension the tuples are empty and the row / width limits 0: no shape goes to a CUDA kernel
(every op then runs its reference, on whatever device its tensors are).
"""

from __future__ import annotations

import torch

from . import reference

try:  # the extension registers torch.ops.persimmon_rt.* on import
    from . import _C  # noqa: F401
except ImportError:  # not built at install: on a GPU machine, compiled now (cached), or a warning says why not
    from ._build import load_on_first_use

    _C = load_on_first_use()
HAVE_CUDA_EXT = _C is not None

_LIMITS = ("CUDA_ARCHS", "DECODE_LINEAR_MAX_ROWS", "FOLDED_LN_MAX_STAGE_BYTES", "FOLDED_LN_K_MULTIPLE",
           "ATTENTION_HEAD_DIMS", "LAYERNORM_MAX_HIDDEN",
           "DECODE_LINEAR_CONFIGS", "DECODE_LINEAR_INT8_CONFIGS", "ALL_REDUCE_MAX_ROWS", "ALL_REDUCE_MAX_RANKS",
           "ALL_REDUCE_FLAG_BYTES", "ALL_REDUCE_SLOTS", "attention_prefill_kernel_name", "decode_linear_int8_config")
if HAVE_CUDA_EXT and not all(hasattr(_C, name) for name in _LIMITS):
    # A build older than its sources: its ops' schemas may differ too, so running it would fail later
    # and less clearly.
    raise ImportError(f"persimmon_rt._C ({_C.__file__}) lacks {', '.join(n for n in _LIMITS if not hasattr(_C, n))}:"
                      " it predates these sources; rebuild it (pip install --no-build-isolation -e .)")

CUDA_ARCHS: tuple[str, ...] = tuple(a for a in _C.CUDA_ARCHS.split(",") if a) if HAVE_CUDA_EXT else ()
# kDecodeLinearMaxRows (csrc/decode_linear.h); cuBLAS is as fast from about 16 rows on
# (benchmarks/RESULTS.md, decode_linear at 32 rows).
DECODE_LINEAR_MAX_ROWS: int = int(_C.DECODE_LINEAR_MAX_ROWS) if HAVE_CUDA_EXT else 0
# kFoldedLnMaxStageBytes, kFoldedLnKMultiple (csrc/decode_linear.h).
FOLDED_LN_MAX_STAGE_BYTES: int = int(_C.FOLDED_LN_MAX_STAGE_BYTES) if HAVE_CUDA_EXT else 0
FOLDED_LN_K_MULTIPLE: int = int(_C.FOLDED_LN_K_MULTIPLE) if HAVE_CUDA_EXT else 0
# kAttentionHeadDims (csrc/attention.h).
ATTENTION_HEAD_DIMS: tuple[int, ...] = tuple(int(d) for d in _C.ATTENTION_HEAD_DIMS) if HAVE_CUDA_EXT else ()
# kLayerNormMaxHidden (csrc/layernorm.h).
LAYERNORM_MAX_HIDDEN: int = int(_C.LAYERNORM_MAX_HIDDEN) if HAVE_CUDA_EXT else 0
# all_reduce_layernorm (csrc/all_reduce.h): most rows and ranks, and the flag block at the start of each
# rank's buffer (its layout: fast_all_reduce.py).
ALL_REDUCE_MAX_ROWS: int = int(_C.ALL_REDUCE_MAX_ROWS) if HAVE_CUDA_EXT else 0
ALL_REDUCE_MAX_RANKS: int = int(_C.ALL_REDUCE_MAX_RANKS) if HAVE_CUDA_EXT else 0
ALL_REDUCE_FLAG_BYTES: int = int(_C.ALL_REDUCE_FLAG_BYTES) if HAVE_CUDA_EXT else 0
ALL_REDUCE_SLOTS: int = int(_C.ALL_REDUCE_SLOTS) if HAVE_CUDA_EXT else 0
# The GEMV's compiled tile configurations, for benchmark sweeps (torch.ops.persimmon_rt.decode_linear's
# `config` argument); the op picks per shape by itself.
DECODE_LINEAR_CONFIGS: tuple[str, ...] = tuple(_C.DECODE_LINEAR_CONFIGS) if HAVE_CUDA_EXT else ()
# The same for the int8 GEMV (decode_linear_int8's `config`).
DECODE_LINEAR_INT8_CONFIGS: tuple[str, ...] = tuple(_C.DECODE_LINEAR_INT8_CONFIGS) if HAVE_CUDA_EXT else ()


def decode_linear_int8_config(rows: int, n: int, k: int, folded: bool = False) -> int:
    """Index into DECODE_LINEAR_INT8_CONFIGS of the configuration decode_linear_int8 (folded:
    decode_linear_int8_folded_ln) runs for `rows` rows of an [n, k] weight: a PERSIMMON_RT_INT8_RULES entry,
    else the compiled per-shape tables (csrc/int8_linear.cu), else the default. Needs the extension."""
    if not HAVE_CUDA_EXT:
        raise RuntimeError("decode_linear_int8_config needs persimmon_rt._C")
    return int(_C.decode_linear_int8_config(rows, n, k, folded))


def kernels_support(head_dim: int) -> bool:
    """True when the extension is built and its attention kernels cover `head_dim` (the only model
    dimension with a fixed list; the other ops take any multiple of 8)."""
    return head_dim in ATTENTION_HEAD_DIMS


def attention_prefill_kernel_name(head_dim: int) -> str | None:
    """The kernel attention_prefill runs for `head_dim` on the current GPU ("wgmma" or "mma_sync"), as
    PERSIMMON_RT_PREFILL_ATTENTION now asks; None without the extension."""
    return _C.attention_prefill_kernel_name(head_dim) if HAVE_CUDA_EXT else None


def use_cuda_kernels(t: torch.Tensor) -> bool:
    """True when `t` lives on a GPU and the extension is built."""
    return HAVE_CUDA_EXT and t.is_cuda


def has_op(name: str) -> bool:
    """Whether the built extension registers torch.ops.persimmon_rt.<name>."""
    return HAVE_CUDA_EXT and hasattr(torch.ops.persimmon_rt, name)


def qk_norm_rope_cache(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, k_cache, v_cache,
                       slot_mapping, q_out, eps):
    if use_cuda_kernels(qkv):
        torch.ops.persimmon_rt.qk_norm_rope_cache(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias,
                                                  k_cache, v_cache, slot_mapping, q_out, eps)
    else:
        reference.qk_norm_rope_cache(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, k_cache,
                                     v_cache, slot_mapping, q_out, eps)


def layernorm(x, weight, bias, out, eps, residual=None, residual_out=None):
    if use_cuda_kernels(x):
        torch.ops.persimmon_rt.layernorm(x, weight, bias, out, eps, residual, residual_out)
    else:
        reference.layernorm(x, weight, bias, out, eps, residual, residual_out)


def all_reduce_layernorm(partial, buffers, epochs, rank, weight, bias, out, eps, residual, residual_out,
                         timeout_s, lamport=False):
    """GPU only (a collective over peer-mapped buffers: fast_all_reduce.py); its semantics over every rank's
    partial are reference.all_reduce_layernorm."""
    torch.ops.persimmon_rt.all_reduce_layernorm(partial, buffers, epochs, rank, weight, bias, out, eps, residual,
                                                residual_out, timeout_s, lamport)


def bias_relu2(x, bias, out):
    if use_cuda_kernels(x):
        torch.ops.persimmon_rt.bias_relu2(x, bias, out)
    else:
        reference.bias_relu2(x, bias, out)


def attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, max_seqlen_q, out, scale):
    if use_cuda_kernels(q):
        torch.ops.persimmon_rt.attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, max_seqlen_q, out,
                                                 scale)
    else:
        reference.attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, max_seqlen_q, out, scale)


def attention_decode(q, k_cache, v_cache, seq_lens, out, scale):
    if use_cuda_kernels(q):
        torch.ops.persimmon_rt.attention_decode(q, k_cache, v_cache, seq_lens, out, scale)
    else:
        reference.attention_decode(q, k_cache, v_cache, seq_lens, out, scale)


def qkv_attention_decode(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, k_cache, v_cache, slot_mapping,
                         seq_lens, out, eps, scale):
    """qk_norm_rope_cache + attention_decode of one new token per sequence in one op
    (reference.qkv_attention_decode, which is that composition); slot_mapping[b] must be
    b*S + seq_lens[b] - 1 for active rows and inside row b for idle ones. On the GPU: head_dim in
    ATTENTION_HEAD_DIMS, and one kernel launch (plus attention_decode's combine) instead of two or three."""
    if use_cuda_kernels(qkv):
        torch.ops.persimmon_rt.qkv_attention_decode(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias,
                                                    k_cache, v_cache, slot_mapping, seq_lens, out, eps, scale)
    else:
        reference.qkv_attention_decode(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, k_cache, v_cache,
                                       slot_mapping, seq_lens, out, eps, scale)


def decode_linear(x, weight, bias, residual, out, relu2=False, ln_weight=None, ln_bias=None, eps=1e-5):
    """out = act(LN(x) W^T + bias) + residual (reference.decode_linear); the LayerNorm prologue runs when
    ln_weight is given. On the GPU: at most DECODE_LINEAR_MAX_ROWS rows of x."""
    if use_cuda_kernels(x):
        torch.ops.persimmon_rt.decode_linear(x, weight, bias, residual, out, relu2, ln_weight, ln_bias, eps)
    else:
        reference.decode_linear(x, weight, bias, residual, out, relu2, ln_weight, ln_bias, eps)


def decode_linear_folded_ln(x, weight, ln_weight, fold_scale, fold_shift, residual, out, relu2=False, eps=1e-5,
                            unscale=1.0):
    """decode_linear with the LayerNorm of x folded into fp32 per-output constants
    (reference.decode_linear_folded_ln; folded_layernorm.fold_layernorm makes them). On the GPU: at most
    DECODE_LINEAR_MAX_ROWS rows of x, within the FOLDED_LN_* limits."""
    if use_cuda_kernels(x):
        torch.ops.persimmon_rt.decode_linear_folded_ln(x, weight, ln_weight, fold_scale, fold_shift, residual, out,
                                                       relu2, eps, unscale)
    else:
        reference.decode_linear_folded_ln(x, weight, ln_weight, fold_scale, fold_shift, residual, out, relu2, eps,
                                          unscale)


def decode_linear_int8(x, weight, scale, bias, residual, out, relu2=False):
    """out = act(scale * (x Wq^T) + bias) + residual over int8 weights with fp32 per-row scales
    (reference.decode_linear_int8). On the GPU: at most DECODE_LINEAR_MAX_ROWS rows, K a multiple of 16."""
    if use_cuda_kernels(x):
        torch.ops.persimmon_rt.decode_linear_int8(x, weight, scale, bias, residual, out, relu2)
    else:
        reference.decode_linear_int8(x, weight, scale, bias, residual, out, relu2)


def decode_linear_int8_folded_ln(x, weight, scale, ln_weight, fold_scale, fold_shift, residual, out, relu2=False,
                                 eps=1e-5, unscale=1.0):
    """decode_linear_folded_ln over int8 weights with fp32 per-row scales
    (reference.decode_linear_int8_folded_ln). On the GPU: at most DECODE_LINEAR_MAX_ROWS rows of x, within the
    FOLDED_LN_* limits."""
    if use_cuda_kernels(x):
        torch.ops.persimmon_rt.decode_linear_int8_folded_ln(x, weight, scale, ln_weight, fold_scale, fold_shift,
                                                            residual, out, relu2, eps, unscale)
    else:
        reference.decode_linear_int8_folded_ln(x, weight, scale, ln_weight, fold_scale, fold_shift, residual, out,
                                               relu2, eps, unscale)


def dequantize_int8(weight, scale, out):
    """out = weight * scale[:, None] rounded to out's dtype (reference.dequantize_int8)."""
    if use_cuda_kernels(weight) and out.dtype in (torch.float16, torch.bfloat16):
        torch.ops.persimmon_rt.dequantize_int8(weight, scale, out)
    else:
        reference.dequantize_int8(weight, scale, out)


def greedy_advance(logits, tokens, positions, slots, seq_lens, active):
    """tokens = argmax(logits, -1); positions, slots, seq_lens += active (reference.greedy_advance): the
    greedy decode step's tail in two launches on the GPU (fp32 logits, int64 tokens / positions / slots,
    int32 seq_lens / active)."""
    if use_cuda_kernels(logits) and has_op("greedy_advance") and logits.dtype == torch.float32:
        torch.ops.persimmon_rt.greedy_advance(logits, tokens, positions, slots, seq_lens, active)
    else:
        reference.greedy_advance(logits, tokens, positions, slots, seq_lens, active)


def sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, tokens):
    """Temperature / top-k / top-p sampling from torch.sort's output (reference.sample_sorted): on the GPU
    three launches in place of the ~45 of the torch composition (fp32 logits, sorted logits and noise; int64
    order, top_k and tokens)."""
    if use_cuda_kernels(logits) and has_op("sample_sorted") and logits.dtype == torch.float32:
        torch.ops.persimmon_rt.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, tokens)
    else:
        reference.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, tokens)
