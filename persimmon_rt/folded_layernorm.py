"""The LayerNorm before a decode projection, folded into the projection (decode_linear_folded_ln).

LN(x) W^T + bias = rstd (x * w) W^T - rstd mean s + c, with s = W w and c = W b + bias for the LayerNorm's
weight w and bias b. With s and c computed once per weight, the decode GEMV reads the residual stream
itself: it stages x * w in shared memory, summing x and x^2 on the way, and needs the row statistics only
in its epilogue. So the LayerNorm kernel before QKV, MLP-up and lm_head goes, and the dense / MLP-down
GEMVs add their output into the residual stream themselves (forward.py decides for which row counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quantization import QuantizedWeight


@dataclass(frozen=True)
class FoldedLayerNorm:
    """What decode_linear_folded_ln needs for one (LayerNorm, projection) pair."""

    ln_weight: torch.Tensor  # [K]  the LayerNorm weight times 2^-e, in the activations' dtype
    scale: torch.Tensor      # [N]  fp32: W ln_weight
    shift: torch.Tensor      # [N]  fp32: W ln_bias + bias
    unscale: float           # 2^e


def fold_layernorm(weight, ln_weight: torch.Tensor, ln_bias: torch.Tensor | None,
                   bias: torch.Tensor | None, rows_per_chunk: int = 8192) -> FoldedLayerNorm:
    """The fold of LayerNorm(ln_weight, ln_bias) into the projection (weight [N, K], a tensor or an int8
    QuantizedWeight, whose s and c are those of its dequantized rows q * scale in fp32; bias [N]).

    The kernel rounds x * ln_weight to the activations' dtype; a LayerNorm weight above 1 could take that
    past fp16's range where LN(x) itself stays small, so the weight is scaled by 2^-e (exact) to at most 1
    in magnitude and the product by 2^e after the sum. s and c are computed in fp32, `rows_per_chunk`
    weight rows at a time (the fp32 copy of a whole lm_head would be 4 GB)."""
    quantized = isinstance(weight, QuantizedWeight)
    n, k = weight.shape
    if ln_weight.shape != (k,) or (ln_bias is not None and ln_bias.shape != (k,)):
        raise ValueError(f"fold_layernorm: LayerNorm parameters must have shape [{k}] (the weight's K)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"fold_layernorm: bias must have shape [{n}] (the weight's N)")
    peak = ln_weight.float().abs().max().item()
    if not math.isfinite(peak):
        raise ValueError("fold_layernorm: the LayerNorm weight holds inf or NaN")
    e = max(0, math.ceil(math.log2(peak))) if peak > 0 else 0
    scaled_w = (ln_weight.float() * 2.0 ** -e).to(weight.dtype)
    w32, b32 = scaled_w.float(), None if ln_bias is None else ln_bias.float()
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    shift = torch.zeros(n, dtype=torch.float32, device=weight.device)
    for r in range(0, n, rows_per_chunk):
        if quantized:
            block = weight.qweight[r:r + rows_per_chunk].float() * weight.scale[r:r + rows_per_chunk, None]
        else:
            block = weight[r:r + rows_per_chunk].float()
        scale[r:r + rows_per_chunk] = block @ w32
        if b32 is not None:
            shift[r:r + rows_per_chunk] = block @ b32
    if bias is not None:
        shift += bias.float()
    return FoldedLayerNorm(scaled_w, scale, shift, float(2 ** e))
