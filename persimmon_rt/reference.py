"""fp32 PyTorch definition of every fused op: the executable specification the CUDA kernels match.

Every function computes in fp32 whatever its input dtype, rounds its outputs to the input dtype once, and
writes into the output tensors it is given (like the CUDA ops), so a kernel and its reference can be called
the same way. Shapes use T = tokens, H = heads, D = head_dim, R = rotary dims, B = batch, S = cache length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def rope_inv_freq(rotary_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  max_position_embeddings: int | None = None, seq_len: int | None = None,
                  device=None) -> torch.Tensor:
    """inv_freq[j] = theta'^(-2j/R) for j < R/2, in fp32, for the rope types Persimmon configs use.

    - default: theta' = theta.
    - linear:  inv_freq / factor (positions divided by factor).
    - dynamic (NTK): while seq_len <= max_position_embeddings, default; beyond it,
      theta' = theta * (factor * seq_len / max_pos - (factor - 1)) ** (R / (R - 2)).
    """
    base = float(theta)
    if rope_type == "dynamic" and seq_len is not None and seq_len > max_position_embeddings:
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponent)
    if rope_type == "linear":
        inv_freq = inv_freq / factor
    return inv_freq


def _layer_norm_f32(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    x = x.float()
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """NeoX rotate-half on dims [0, R): out[j] = x[j]cos - x[j+R/2]sin, out[j+R/2] = x[j+R/2]cos + x[j]sin."""
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def qk_norm_rope_cache(
    qkv: torch.Tensor,            # [T, H, 3, D]  head-major fused projection output (any strides, last dim unit)
    positions: torch.Tensor,      # [T] int32/int64  rotary position of each token
    inv_freq: torch.Tensor,       # [R/2] fp32  from rope_inv_freq (carries linear/dynamic scaling)
    q_weight: torch.Tensor | None,  # [D]  q LayerNorm weight shared by all heads (None: no QK-LayerNorm)
    q_bias: torch.Tensor | None,    # [D]
    k_weight: torch.Tensor | None,  # [D]
    k_bias: torch.Tensor | None,    # [D]
    k_cache: torch.Tensor,        # [B, S, H, D]  written at slot_mapping
    v_cache: torch.Tensor,        # [B, S, H, D]
    slot_mapping: torch.Tensor,   # [T] int32/int64  flat slot b*S + s of each token in the caches
    q_out: torch.Tensor,          # [T, H, D]  written
    eps: float,
) -> None:
    """q_out = rope(LN_q(q)); k_cache[slot] = rope(LN_k(k)); v_cache[slot] = v.

    LayerNorm over D (statistics in fp32, skipped when the weights are None), then rotary on the first
    R = 2 * len(inv_freq) dims with angle positions * inv_freq computed in fp32 (as transformers does).
    Slots outside [0, B*S) are an error in the CUDA op; here they raise IndexError.
    """
    rotary_dim = 2 * inv_freq.numel()
    q, k, v = qkv[:, :, 0].float(), qkv[:, :, 1].float(), qkv[:, :, 2]
    if q_weight is not None:
        q = _layer_norm_f32(q, q_weight, q_bias, eps)
        k = _layer_norm_f32(k, k_weight, k_bias, eps)
    angles = positions.float()[:, None] * inv_freq.float()[None, :]   # [T, R/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]   # [T, 1, R/2], shared by all heads
    q = _rotate(q, cos, sin, rotary_dim)
    k = _rotate(k, cos, sin, rotary_dim)
    q_out.copy_(q.to(q_out.dtype))
    B, S, H, D = k_cache.shape
    slots = slot_mapping.long()
    k_cache.view(B * S, H, D)[slots] = k.to(k_cache.dtype)
    v_cache.view(B * S, H, D)[slots] = v.to(v_cache.dtype)


def layernorm(
    x: torch.Tensor,              # [N, C]
    weight: torch.Tensor,         # [C]
    bias: torch.Tensor,           # [C]
    out: torch.Tensor,            # [N, C]  written
    eps: float,
    residual: torch.Tensor | None = None,      # [N, C]  optional residual stream added to x first
    residual_out: torch.Tensor | None = None,  # [N, C]  written with x + residual (may alias residual)
) -> None:
    """out = LN(x) or, with a residual, r = round(x + residual); residual_out = r; out = LN(r).

    The sum is rounded to the activation dtype before normalising, as transformers' unfused
    `residual + hidden_states` followed by `nn.LayerNorm` does; statistics are in fp32.
    """
    if residual is not None:
        summed = (x.float() + residual.float()).to(x.dtype)
        residual_out.copy_(summed)
        x = summed
    out.copy_(_layer_norm_f32(x, weight, bias, eps).to(out.dtype))


def all_reduce_layernorm(
    partials: Sequence[torch.Tensor],  # W x [N, C]  each rank's partial sums, in rank order
    weight: torch.Tensor,         # [C]
    bias: torch.Tensor,           # [C]
    out: torch.Tensor,            # [N, C]  written
    eps: float,
    residual: torch.Tensor,       # [N, C]
    residual_out: torch.Tensor,   # [N, C]  written (may alias residual)
) -> None:
    """The tensor-parallel all-reduce fused with the residual LayerNorm: s = round(sum of the partials,
    in fp32 and rank order), then layernorm(s, residual=residual) as above (r = round(s + residual);
    residual_out = r; out = LN(r))."""
    summed = partials[0].float()
    for p in partials[1:]:
        summed = summed + p.float()
    layernorm(summed.to(partials[0].dtype), weight, bias, out, eps, residual, residual_out)


def bias_relu2(
    x: torch.Tensor,              # [N, F]
    bias: torch.Tensor,           # [F]
    out: torch.Tensor,            # [N, F]  written (may alias x)
) -> None:
    """out = relu(x + bias)^2, computed in fp32 and rounded once (the prefill MLP epilogue)."""
    y = torch.relu(x.float() + bias.float())
    out.copy_((y * y).to(out.dtype))


def attention_prefill(
    q: torch.Tensor,              # [T, H, D]  queries of all sequences, packed
    k_cache: torch.Tensor,        # [B, S, H, D]  keys of sequence b in row b, positions [0, seq_lens[b])
    v_cache: torch.Tensor,        # [B, S, H, D]
    cu_seqlens_q: torch.Tensor,   # [B+1] int32  sequence b's queries are q[cu[b]:cu[b+1]]
    seq_lens: torch.Tensor,       # [B] int32  keys of sequence b after this chunk (cached prefix + new)
    max_seqlen_q: int,            # >= max_b n_b; sizes the CUDA grid without a host sync (unused here)
    out: torch.Tensor,            # [T, H, D]  written
    scale: float,
) -> None:
    """Causal attention of new tokens over their sequence's cache (chunked prefill).

    Query i of sequence b (n_b = cu[b+1] - cu[b] queries) sits at position p = seq_lens[b] - n_b + i and
    attends to keys [0, p]: out = softmax(q k^T * scale + causal mask) v, softmax in fp32.
    """
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        n, L = cu[b + 1] - cu[b], lens[b]
        if n == 0:
            continue
        qb = q[cu[b]:cu[b + 1]].float().transpose(0, 1)           # [H, n, D]
        kb = k_cache[b, :L].float().transpose(0, 1)               # [H, L, D]
        vb = v_cache[b, :L].float().transpose(0, 1)
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale     # [H, n, L]
        qpos = torch.arange(L - n, L, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[cu[b]:cu[b + 1]] = torch.matmul(probs, vb).transpose(0, 1).to(out.dtype)


def attention_decode(
    q: torch.Tensor,              # [B, H, D]  one query per sequence
    k_cache: torch.Tensor,        # [B, S, H, D]
    v_cache: torch.Tensor,        # [B, S, H, D]
    seq_lens: torch.Tensor,       # [B] int32  keys to attend to (the query's own key included); 0 = idle row
    out: torch.Tensor,            # [B, H, D]  written (zeros for idle rows)
    scale: float,
) -> None:
    """out[b] = softmax(q[b] k[b, :len]^T * scale) v[b, :len], softmax in fp32."""
    lens = seq_lens.tolist()
    for b, L in enumerate(lens):
        if L == 0:
            out[b].zero_()
            continue
        qb = q[b].float()[:, None, :]                             # [H, 1, D]
        kb = k_cache[b, :L].float().transpose(0, 1)               # [H, L, D]
        vb = v_cache[b, :L].float().transpose(0, 1)
        probs = torch.softmax(torch.matmul(qb, kb.transpose(1, 2)) * scale, dim=-1)
        out[b] = torch.matmul(probs, vb)[:, 0].to(out.dtype)


def qkv_attention_decode(
    qkv: torch.Tensor,            # [B, H, 3, D]  the new token of each sequence, head-major projection output
    positions: torch.Tensor,      # [B] int32/int64  rotary position of each new token
    inv_freq: torch.Tensor,       # [R/2] fp32
    q_weight: torch.Tensor | None,  # [D]  (None: no QK-LayerNorm)
    q_bias: torch.Tensor | None,    # [D]
    k_weight: torch.Tensor | None,  # [D]
    k_bias: torch.Tensor | None,    # [D]
    k_cache: torch.Tensor,        # [B, S, H, D]  written at slot_mapping
    v_cache: torch.Tensor,        # [B, S, H, D]
    slot_mapping: torch.Tensor,   # [B] int32/int64  flat slot b*S + s of each new token
    seq_lens: torch.Tensor,       # [B] int32  keys after this token (its own included); 0 = idle row
    out: torch.Tensor,            # [B, H, D]  written (zeros for idle rows)
    eps: float,
    scale: float,
) -> None:
    """qk_norm_rope_cache of one new token per sequence, then attention_decode of its q (rounded to out's
    dtype, as q_out is) over the cache, the new key included: the decode step's attention in one op.

    The new token must be the last key: slot_mapping[b] = b*S + seq_lens[b] - 1 where seq_lens[b] > 0, and
    any slot of row b ([b*S, (b+1)*S)) where seq_lens[b] == 0 (an idle row; its k and v are still written).
    Other slots raise ValueError here and trap the CUDA op, whose blocks take the new key from registers
    while one of them writes it to the cache.
    """
    S = k_cache.shape[1]
    for b, (slot, L) in enumerate(zip(slot_mapping.tolist(), seq_lens.tolist())):
        if not (b * S <= slot < (b + 1) * S) or (L > 0 and slot != b * S + L - 1):
            raise ValueError(f"qkv_attention_decode: slot_mapping[{b}] = {slot} with seq_lens[{b}] = {L}: the slot "
                             f"must be b*S + seq_lens[b] - 1 (S = {S}), or in row b when seq_lens[b] = 0")
    q = torch.empty(qkv.shape[0], qkv.shape[1], qkv.shape[3], dtype=out.dtype, device=out.device)
    qk_norm_rope_cache(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, k_cache, v_cache, slot_mapping,
                       q, eps)
    attention_decode(q, k_cache, v_cache, seq_lens, out, scale)


def decode_linear(
    x: torch.Tensor,              # [M, K]  M <= 16 rows (decode: one per sequence)
    weight: torch.Tensor,         # [N, K]  nn.Linear layout
    bias: torch.Tensor | None,    # [N]
    residual: torch.Tensor | None,  # [M, N]  added after the activation (may alias out)
    out: torch.Tensor,            # [M, N]  written
    relu2: bool = False,
    ln_weight: torch.Tensor | None = None,  # [K]  LayerNorm prologue on x (None: none)
    ln_bias: torch.Tensor | None = None,    # [K]  (only with ln_weight)
    eps: float = 1e-5,
) -> None:
    """out = act(LN(x) W^T + bias) + residual, act = relu(.)^2 when relu2 else identity; fp32 accumulation,
    the epilogue in fp32, rounded once. The decode projections: QKV (LN_in prologue, bias), dense and
    MLP-down (bias + residual), MLP-up (LN_post prologue, bias + relu2), lm_head (final-LN prologue, no
    bias; out may be fp32 for sampling).

    With ln_weight, x is first replaced by LN(x) * ln_weight + ln_bias over K, statistics in fp32, rounded
    to x's dtype: exactly what `layernorm` would write for x, so the fused op equals layernorm followed by
    decode_linear."""
    if ln_weight is not None:
        x = _layer_norm_f32(x, ln_weight, ln_bias, eps).to(x.dtype)
    elif ln_bias is not None:
        raise ValueError("decode_linear: ln_bias needs ln_weight")
    _linear_epilogue(x.float() @ weight.float().t(), bias, relu2, residual, out)


def decode_linear_folded_ln(
    x: torch.Tensor,              # [M, K]  the residual stream (not normalised)
    weight: torch.Tensor,         # [N, K]
    ln_weight: torch.Tensor,      # [K]  the LayerNorm weight, possibly times 1 / unscale (folded_layernorm.py)
    fold_scale: torch.Tensor,     # [N]  fp32: weight @ ln_weight
    fold_shift: torch.Tensor,     # [N]  fp32: weight @ ln_bias + bias
    residual: torch.Tensor | None,  # [M, N]  (may alias out)
    out: torch.Tensor,            # [M, N]  written
    relu2: bool = False,
    eps: float = 1e-5,
    unscale: float = 1.0,
) -> None:
    """decode_linear with its LayerNorm folded into per-output constants:
        out = act(unscale * rstd * (round(x * ln_weight) W^T - mean * fold_scale) + fold_shift) + residual,
    mean and rstd = 1 / sqrt(E[x^2] - mean^2 + eps) x's row statistics in fp32 (the variance clamped at 0).
    Since LN(x) W^T + bias = rstd (x * w) W^T - rstd mean (W w) + W b + bias, with fold_scale = W w and
    fold_shift = W b + bias this is decode_linear's LayerNorm prologue up to rounding: x * w is rounded to
    x's dtype instead of LN(x). The statistics are needed only after the product, so the GPU kernel streams
    weights from its first instruction."""
    mean, rstd, scaled = _folded_ln_terms(x, ln_weight, eps, unscale)
    y = rstd * (scaled @ weight.float().t() - mean * fold_scale.float()) + fold_shift.float()
    _linear_epilogue(y, None, relu2, residual, out)


def decode_linear_int8_folded_ln(
    x: torch.Tensor,              # [M, K]  the residual stream
    weight: torch.Tensor,         # [N, K]  int8
    scale: torch.Tensor,          # [N]  fp32 per-row scale
    ln_weight: torch.Tensor,      # [K]
    fold_scale: torch.Tensor,     # [N]  fp32: (scale * weight) @ ln_weight
    fold_shift: torch.Tensor,     # [N]  fp32: (scale * weight) @ ln_bias + bias
    residual: torch.Tensor | None,
    out: torch.Tensor,
    relu2: bool = False,
    eps: float = 1e-5,
    unscale: float = 1.0,
) -> None:
    """decode_linear_folded_ln over int8 weights with per-row scales: the scale applied to the fp32 product
    of round(x * ln_weight) and the int8 row, before the fold's mean * fold_scale is taken off."""
    mean, rstd, scaled = _folded_ln_terms(x, ln_weight, eps, unscale)
    product = (scaled @ weight.float().t()) * scale.float()
    _linear_epilogue(rstd * (product - mean * fold_scale.float()) + fold_shift.float(), None, relu2, residual, out)


def _folded_ln_terms(x: torch.Tensor, ln_weight: torch.Tensor, eps: float, unscale: float):
    """The folded LayerNorm's row terms: fp32 mean [M, 1], unscale * rstd [M, 1] (E[x^2] - mean^2, clamped
    at 0) and round(x * ln_weight) in fp32 [M, K]."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf.square().mean(-1, keepdim=True) - mean.square()).clamp_min(0)
    return mean, torch.rsqrt(var + eps) * unscale, (x * ln_weight.to(x.dtype)).float()


def _linear_epilogue(y: torch.Tensor, bias, relu2: bool, residual, out: torch.Tensor) -> None:
    """The decode GEMVs' epilogue on the fp32 product y: + bias, relu², + residual, rounded once into out."""
    if bias is not None:
        y = y + bias.float()
    if relu2:
        y = torch.relu(y).square()
    if residual is not None:
        y = y + residual.float()
    out.copy_(y.to(out.dtype))


def decode_linear_int8(
    x: torch.Tensor,              # [M, K]
    weight: torch.Tensor,         # [N, K]  int8
    scale: torch.Tensor,          # [N]  fp32, one per output row
    bias: torch.Tensor | None,    # [N]
    residual: torch.Tensor | None,  # [M, N]  (may alias out)
    out: torch.Tensor,            # [M, N]  written
    relu2: bool = False,
) -> None:
    """out = act(scale * (x Wq^T) + bias) + residual: decode_linear over int8 weights with per-row scales,
    the scale applied to the fp32 dot product (once per output), the epilogue in fp32, rounded once."""
    _linear_epilogue((x.float() @ weight.float().t()) * scale.float(), bias, relu2, residual, out)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out[n, k] = weight[n, k] * scale[n] (int8 weight, fp32 scale), the product in fp32, rounded once to
    out's dtype. Row blocks bound the fp32 temporary."""
    for start in range(0, weight.shape[0], 4096):
        stop = start + 4096
        out[start:stop] = (weight[start:stop].float() * scale[start:stop, None].float()).to(out.dtype)


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   seq_lens: torch.Tensor, active: torch.Tensor) -> None:
    """The greedy decode step's tail: tokens[b] = argmax(logits[b]) (torch.argmax's order: a NaN first, then
    the largest value, the lowest index among equals), and each row moves on by active[b]: positions, slots
    and seq_lens += active."""
    tokens.copy_(logits.argmax(dim=-1))
    positions.add_(active)
    slots.add_(active)
    seq_lens.add_(active)


def sample_sorted(logits: torch.Tensor, sorted_logits: torch.Tensor, order: torch.Tensor, noise: torch.Tensor,
                  temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, tokens: torch.Tensor) -> None:
    """The sampler after torch.sort (sampling.sample): each row of fp32 logits [B, V] with its sorted values
    (descending) and their indices `order`, scaled by 1 / max(temperature, 1e-6); the ranks from top_k on
    dropped (top_k <= 0: none); softmax; rank r kept if r == 0 or the probability of the ranks before it is
    < top_p; then the exponential race, argmax over ranks of p / noise (noise: Exp(1) draws, one a sorted
    position), gives the token. A row with temperature <= 0 takes the argmax of its logits instead.
    temperature and top_p are [B] or [B, 1]."""
    rows, vocab = logits.shape
    t = temperature.reshape(rows, 1).float()
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    scaled = (sorted_logits / t.clamp_min(1e-6)).masked_fill(ranks >= k, float("-inf"))
    probs = scaled.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p.reshape(rows, 1)) & (ranks > 0), 0.0)
    drawn = order.gather(-1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(-1)
    tokens.copy_(torch.where(t[:, 0] > 0, drawn, logits.argmax(dim=-1)))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = ["rope_inv_freq", "qk_norm_rope_cache", "layernorm", "bias_relu2", "attention_prefill",
           "attention_decode", "qkv_attention_decode", "decode_linear", "decode_linear_int8", "dequantize_int8",
           "greedy_advance", "sample_sorted", "default_scale"]
