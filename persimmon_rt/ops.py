"""One function per fused op: the CUDA kernel (torch.ops.persimmon_rt.*) for CUDA tensors when the
extension is built, the fp32 PyTorch reference (reference.py) otherwise. Signatures match reference.py;
callers above this module never know which one ran.
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


# Rows the decode GEMV takes (kDecodeLinearMaxRows in csrc/decode_linear.h); more go to cuBLAS, which
# is as fast from about 16 rows on (benchmarks/RESULTS.md, decode_linear at 32 rows).
DECODE_LINEAR_MAX_ROWS = 16


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


def decode_linear(x, weight, bias, residual, out, relu2=False):
    if use_cuda_kernels(x):
        torch.ops.persimmon_rt.decode_linear(x, weight, bias, residual, out, relu2)
    else:
        reference.decode_linear(x, weight, bias, residual, out, relu2)
