"""The Persimmon forward pass of the engine, on the fused ops and a static KV cache.

Per layer (T packed tokens; the residual stream h is carried between fused LayerNorms):
    x, h  = LN_in(down_prev, residual=h)
    qkv   = x W_qkv^T + b                      [T, H, 3, D] head-major
    q     = qk_norm_rope_cache(qkv) -> caches  (k, v written at each token's slot)
    a     = attention(q, caches) W_o^T + b_o       (decode on the GPU: qkv_attention_decode does both)
    x, h  = LN_post(a, residual=h)
    up    = relu(x W_up^T + b_up)^2            (bias_relu2 epilogue)
    down  = up W_down^T + b_down
Prefill runs it over packed prompt pieces (causal attention over each row's cached prefix); decode over one
token per row of a `DecodeState` (split-KV attention), then samples, all capturable in a CUDA graph. A
pass of few rows on one GPU (one with fp16 / bf16 weights, up to eight with int8) folds each LayerNorm into
the projection after it (`_layers_folded`): no LayerNorm kernel, dense and MLP-down adding into h themselves.
With tensor parallelism (`tp`, tensor_parallel.py) each rank runs it over its heads and MLP columns; `a`
and `down` are all-reduced together with the LayerNorm that takes them (one fused kernel at decode), and
the logits gathered over the vocabulary.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import ops
from .cache import StaticKVCache
from .config import PersimmonConfig
from .decode_state import DecodeState
from .folded_layernorm import FoldedLayerNorm, fold_layernorm
from .loading import Weights
from .quantization import QuantizedWeight
from .reference import rope_inv_freq
from .sampling import sample, token_logprobs
from .transfer import upload, upload_split


REFERENCE_DECODE_ROWS = 16
# Decode buckets of up to this many rows run with the LayerNorms folded into the projections
# (folded_layernorm.py). Measured on the H200 (benchmarks/RESULTS.md): fp16 / bf16 weights 4.46 -> 4.37 ms a
# token at one row (run U3), no change at two rows, slower from four (4.62 -> 4.82 ms) and at eight (4.75 ->
# 7.21): each of the GEMV's many one-tile blocks stages all of x. int8 weights gain 0.13-0.15 ms a step at 1, 2,
# 4 and 8 rows (runs V2, V5, V6): their persistent grids stage x once a block for all its tiles. At 16 rows
# the staged x (131 KB a block) would leave one block an SM. The fp16 GEMV's persistent grid with the fold
# (run F2) still lost at four and eight rows: 4.60 -> 4.76 and 4.76 -> 5.15 ms (its folded GEMVs take
# ~5 us more than the plain ones, against 2.6 us for a LayerNorm kernel).
FOLDED_LN_MAX_ROWS = 1
FOLDED_LN_INT8_MAX_ROWS = 8
# Decode buckets of up to this many rows take the fused qkv_attention_decode: measured on the H200 it saves
# 0.07-0.08 ms a token at one row and costs 0.02-0.16 ms a step at eight (each split block recomputes its
# head's q and k: benchmarks/RESULTS.md, run I); sizes between are unmeasured and keep the unfused pair.
FUSED_DECODE_ATTENTION_MAX_ROWS = 1


class Forward:
    def __init__(self, config: PersimmonConfig, weights: Weights, cache: StaticKVCache, max_seq_len: int, tp=None):
        self.config, self.weights, self.cache, self.tp = config, weights, cache, tp
        self.device = weights.embed.device
        self.num_heads = cache.k[0].shape[2]                 # this rank's heads
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.dynamic_rope = config.rope_type == "dynamic"
        self.inv_freq = self._inv_freq(0 if self.dynamic_rope else max_seq_len)
        # Batches of up to gemv_rows tokens take the decode path (fused GEMVs); on the reference path too, so
        # the CPU runs (and tests) the same sequence of fused ops as the GPU.
        on_gpu = weights.embed.is_cuda
        self.gemv_rows = ops.DECODE_LINEAR_MAX_ROWS if on_gpu else REFERENCE_DECODE_ROWS
        # Decode's QK-LayerNorm, rotary and cache write run inside the attention kernel (one launch a layer
        # fewer) where the kernels take this model; elsewhere the unfused pair, which the op equals.
        self.fuse_decode_attention = (ops.use_cuda_kernels(weights.embed) and ops.kernels_support(config.head_dim)
                                      and ops.has_op("qkv_attention_decode"))
        # Decode with each LayerNorm folded into the projection after it (no LayerNorm kernels): on one GPU
        # (the tensor-parallel all-reduce keeps its fused LayerNorm).
        self.folds: list[dict[str, FoldedLayerNorm]] | None = None
        self.fold_rows = FOLDED_LN_MAX_ROWS if weights.scheme is None else FOLDED_LN_INT8_MAX_ROWS
        hidden, element = config.hidden_size, weights.final_ln_w.element_size()     # the activations' dtype
        folding_op = "decode_linear_folded_ln" if weights.scheme is None else "decode_linear_int8_folded_ln"
        if (ops.use_cuda_kernels(weights.final_ln_w) and ops.has_op(folding_op) and tp is None
                and hidden % ops.FOLDED_LN_K_MULTIPLE == 0
                and self.fold_rows * (hidden + 8) * element <= ops.FOLDED_LN_MAX_STAGE_BYTES):
            self.fold_layernorms(True)

    def fold_layernorms(self, enabled: bool) -> None:
        """Passes of up to `fold_rows` tokens with every LayerNorm folded into the next projection
        (folded_layernorm.py), or with LayerNorm kernels. Call it before any decode graph is captured (the
        graphs keep the path they were captured with); the weights are read now, once. The folds take (QKV +
        MLP-up outputs) x 2 fp32 per layer and 2 x vocabulary for lm_head (10 MB for Persimmon-8B)."""
        if not enabled:
            self.folds = None
            return
        if self.tp is not None:
            raise ValueError("folded LayerNorms need one device (tensor parallelism keeps its fused LayerNorm)")
        w = self.weights
        self.folds = [{"qkv": fold_layernorm(lw.qkv_w, lw.ln_in_w, lw.ln_in_b, lw.qkv_b),
                       "up": fold_layernorm(lw.up_w, lw.ln_post_w, lw.ln_post_b, lw.up_b)} for lw in w.layers]
        self.folds.append({"lm_head": fold_layernorm(w.lm_head, w.final_ln_w, w.final_ln_b, None)})

    def _inv_freq(self, seq_len: int) -> torch.Tensor:
        c = self.config
        return rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_type, (c.rope_scaling or {}).get("factor", 1.0),
                             c.max_position_embeddings, seq_len or None, device=self.device)

    def set_rotary_length(self, seq_len: int) -> None:
        """Dynamic NTK scaling: re-base the rotary frequencies for sequences of up to `seq_len` tokens."""
        if self.dynamic_rope:
            self.inv_freq.copy_(self._inv_freq(seq_len))

    # ---------------------------------------------------------------------------------------------- layers
    def logits(self, tokens, positions, slots, attend, select=None, inputs_embeds=None) -> torch.Tensor:
        """Run every layer over packed tokens and return fp32 logits of the rows in `select` (all if None).
        attend(q [T, H, D], layer) -> [T, H, D] is the attention of this pass (prefill or decode), run after
        qk_norm_rope_cache has written the tokens' k and v at `slots`."""
        return self._logits(tokens, self._unfused_attention(positions, slots, attend), select, inputs_embeds)

    def _unfused_attention(self, positions, slots, attend):
        """attention(qkv [T, H, 3, D], layer) -> [T, H, D]: qk_norm_rope_cache, then attend(q, layer)."""
        def attention(qkv, layer):
            lw = self.weights.layers[layer]
            q = torch.empty(qkv.shape[0], qkv.shape[1], qkv.shape[3], dtype=qkv.dtype, device=qkv.device)
            ops.qk_norm_rope_cache(qkv, positions, self.inv_freq, lw.q_ln_w, lw.q_ln_b, lw.k_ln_w, lw.k_ln_b,
                                   self.cache.k[layer], self.cache.v[layer], slots, q, self.config.layer_norm_eps)
            return attend(q, layer)
        return attention

    def _logits(self, tokens, attention, select=None, inputs_embeds=None) -> torch.Tensor:
        """logits() with attention(qkv [T, H, 3, D], layer) -> [T, H, D] doing all of each layer's attention."""
        w = self.weights
        h = self.embed(tokens) if inputs_embeds is None else inputs_embeds
        if self.folds is not None and h.shape[0] <= self.fold_rows:
            h = self._layers_folded(h, attention)
            if select is not None:
                h = h[select]
            return self._folded_linear(h, w.lm_head, self.folds[-1]["lm_head"], out_dtype=torch.float32)
        down, h = self._layers(h, attention)
        if select is not None:
            down, h = down[select], h[select]
        out = torch.empty_like(h)
        self._add_layernorm(down, w.final_ln_w, w.final_ln_b, out, h, torch.empty_like(h))
        logits = self._linear(out, w.lm_head, out_dtype=torch.float32)
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def _attention_block(self, x, lw, i, attention) -> torch.Tensor:
        """QKV projection, then attention (QK-LayerNorm, rotary, cache write, attention): [T, H * D], the
        input of the dense projection."""
        T, H, D = x.shape[0], self.num_heads, self.config.head_dim
        qkv = self._linear(x, lw.qkv_w, lw.qkv_b).view(T, H, 3, D)
        return attention(qkv, i).view(T, H * D)

    def _layers(self, h, attention) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer, with the LayerNorm (+ residual add) kernel between the projections; returns the last
        MLP output and the residual stream it is still to be added to.

        The decode GEMV could take each LayerNorm as its prologue and the residual add as its epilogue
        (decode_linear's ln_weight and residual): measured on the H200 that was slower (4.81 -> 5.68
        ms/token at batch 1: every block recomputes its rows' statistics before streaming weights), so here
        the LayerNorm stays a kernel of its own (benchmarks/RESULTS.md); passes of up to `fold_rows` rows fold it
        instead (_layers_folded)."""
        c = self.config
        x = torch.empty_like(h)
        down = None
        for i, lw in enumerate(self.weights.layers):
            if down is None:
                ops.layernorm(h, lw.ln_in_w, lw.ln_in_b, x, c.layer_norm_eps)
            else:
                self._add_layernorm(down, lw.ln_in_w, lw.ln_in_b, x, h, h)
            attn = self._linear(self._attention_block(x, lw, i, attention), lw.dense_w, lw.dense_b)
            self._add_layernorm(attn, lw.ln_post_w, lw.ln_post_b, x, h, h)
            down = self._linear(self._linear(x, lw.up_w, lw.up_b, relu2=True), lw.down_w, lw.down_b)
        return down, h

    def _layers_folded(self, h, attention) -> torch.Tensor:
        """Every layer with the LayerNorms folded into QKV and MLP-up (passes of up to `fold_rows` rows): dense
        and MLP-down add their output into the residual stream in their epilogue. Returns the residual stream
        after the last layer (a new tensor; h is not written)."""
        stream = torch.empty_like(h)
        for i, (lw, fold) in enumerate(zip(self.weights.layers, self.folds)):
            qkv_in = self._attention_block_folded(h, lw, fold["qkv"], i, attention)
            self._add_linear(qkv_in, lw.dense_w, lw.dense_b, h, stream)
            h = stream
            up = self._folded_linear(h, lw.up_w, fold["up"], relu2=True)
            self._add_linear(up, lw.down_w, lw.down_b, h, h)
        return h

    @staticmethod
    def _add_linear(x, weight, bias, residual, out) -> None:
        """out = x W^T + bias + residual, one decode GEMV (out may be residual itself)."""
        if isinstance(weight, QuantizedWeight):
            ops.decode_linear_int8(x, weight.qweight, weight.scale, bias, residual, out)
        else:
            ops.decode_linear(x, weight, bias, residual, out)

    def _attention_block_folded(self, h, lw, fold, i, attention) -> torch.Tensor:
        """_attention_block on the residual stream h, the input LayerNorm folded into QKV."""
        T, H, D = h.shape[0], self.num_heads, self.config.head_dim
        qkv = self._folded_linear(h, lw.qkv_w, fold).view(T, H, 3, D)
        return attention(qkv, i).view(T, H * D)

    def _folded_linear(self, x, weight, fold: FoldedLayerNorm, relu2=False, out_dtype=None) -> torch.Tensor:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
        eps = self.config.layer_norm_eps
        if isinstance(weight, QuantizedWeight):
            ops.decode_linear_int8_folded_ln(x, weight.qweight, weight.scale, fold.ln_weight, fold.scale, fold.shift,
                                             None, out, relu2, eps, fold.unscale)
        else:
            ops.decode_linear_folded_ln(x, weight, fold.ln_weight, fold.scale, fold.shift, None, out, relu2, eps,
                                        fold.unscale)
        return out

    def _add_layernorm(self, partial, weight, bias, out, residual, residual_out) -> None:
        """out = LN(residual_out = residual + partial): a projection's output joins the residual stream.
        Under tensor parallelism `partial` is this rank's share, summed over the ranks first (fused with
        the LayerNorm for decode-sized batches: fast_all_reduce.py)."""
        eps = self.config.layer_norm_eps
        if self.tp is None:
            ops.layernorm(partial, weight, bias, out, eps, residual, residual_out)
        else:
            self.tp.all_reduce_layernorm(partial, weight, bias, out, eps, residual, residual_out)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding table (dequantized rows of an int8 one)."""
        table = self.weights.embed
        return table.rows(tokens) if isinstance(table, QuantizedWeight) else F.embedding(tokens, table)

    def _linear(self, x, weight, bias=None, relu2=False, out_dtype=None) -> torch.Tensor:
        """x W^T (+ bias) (then relu^2): the decode GEMV (weight streaming, epilogue fused) for up to
        `gemv_rows` rows; cuBLAS plus the bias_relu2 epilogue otherwise. out_dtype=float32 gives fp32 logits.
        An int8 weight takes the int8 GEMV at decode; prefill dequantizes it into a scratch copy for cuBLAS
        (one projection at a time: the copy is freed, and its memory reused, before the next)."""
        if x.shape[0] <= self.gemv_rows:
            out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
            if isinstance(weight, QuantizedWeight):
                ops.decode_linear_int8(x, weight.qweight, weight.scale, bias, None, out, relu2)
            else:
                ops.decode_linear(x, weight, bias, None, out, relu2)
            return out
        if isinstance(weight, QuantizedWeight):
            weight = weight.dequantize(x.dtype)
        if relu2:
            y = F.linear(x, weight)
            ops.bias_relu2(y, bias, y)
            return y
        y = F.linear(x, weight, bias)
        return y if out_dtype is None else y.to(out_dtype)

    def warm_prefill_shapes(self, max_rows: int) -> None:
        """Run each projection once at every row count that takes cuBLAS, up to `max_rows`. A GEMM shape's
        first call makes cuBLAS choose, and CUDA load, its kernel: measured on the H200 that cost a prefill
        chunk 17-36 ms of host time instead of 5 (benchmarks/RESULTS.md, run P), which a server pays
        between two decode steps whenever a prompt ends in a chunk size it has not seen. Output discarded;
        writes no cache."""
        if self.device.type != "cuda" or max_rows <= self.gemv_rows:
            return
        lw, inputs = self.weights.layers[0], {}
        for weight, bias, relu2 in ((lw.qkv_w, lw.qkv_b, False), (lw.dense_w, lw.dense_b, False),
                                    (lw.up_w, lw.up_b, True), (lw.down_w, lw.down_b, False)):
            if isinstance(weight, QuantizedWeight):
                weight = weight.dequantize()           # what _linear multiplies by at prefill
            k = weight.shape[1]
            x = inputs.setdefault(k, torch.zeros(max_rows, k, dtype=weight.dtype, device=self.device))
            for rows in range(self.gemv_rows + 1, max_rows + 1):
                self._linear(x[:rows], weight, bias, relu2=relu2)

    # -------------------------------------------------------------------------------------------- prefill
    def prefill(self, pieces: Sequence[tuple[int, torch.Tensor, int, int]]) -> torch.Tensor:
        """One packed forward over prompt pieces (cache row, prompt, start, count), rows distinct: writes
        their K/V into the cache and returns fp32 logits [len(pieces), V] of each piece's last token.
        A prompt is token ids [L] or input embeddings [L, hidden]. Its index tensors are built on the host and
        copied without waiting for the GPU (transfer.py), so the decode steps queued before it keep running
        while it is launched."""
        dev, S, rows = self.device, self.cache.k[0].shape[1], self.cache.k[0].shape[0]
        order = sorted(range(len(pieces)), key=lambda i: pieces[i][0])     # packed by cache row
        counts, seq_lens, last = [0] * rows, [0] * rows, [0] * len(pieces)
        positions, slots, parts, packed = [], [], [], 0
        for i in order:
            row, prompt, start, take = pieces[i]
            counts[row], seq_lens[row] = take, start + take
            positions.append(torch.arange(start, start + take))
            slots.append(positions[-1] + row * S)
            parts.append(prompt[start:start + take])
            packed += take
            last[i] = packed - 1                                         # in the caller's order
        cu, seq_lens = upload_split([[0, *itertools.accumulate(counts)], seq_lens], torch.int32, dev)
        embeds = any(p.is_floating_point() for p in parts)
        index = [torch.cat(positions), torch.cat(slots), last] + ([] if embeds else [torch.cat(parts)])
        positions, slots, last, *tokens = upload_split(index, torch.long, dev)
        max_q = max(take for _, _, _, take in pieces)

        def attend(q, layer):
            out = torch.empty_like(q)
            ops.attention_prefill(q, self.cache.k[layer], self.cache.v[layer], cu, seq_lens, max_q, out, self.scale)
            return out

        # Token pieces beside embedding pieces go through the embedding table here.
        inputs_embeds = torch.cat([upload(p, self.weights.embed.dtype, dev) if p.is_floating_point()
                                   else self.embed(upload(p, torch.long, dev)) for p in parts]) if embeds else None
        return self.logits(tokens[0] if tokens else None, positions, slots, attend, select=last,
                           inputs_embeds=inputs_embeds)

    # --------------------------------------------------------------------------------------------- decode
    def decode(self, state: DecodeState, greedy: bool, logprobs: bool = False) -> None:
        """One token for every row of `state` (cache rows [0, state.rows)): reads its inputs, samples,
        optionally records log-probabilities, and advances the active rows. Capturable."""
        rows = state.rows

        def attend(q, layer):
            out = torch.empty_like(q)
            ops.attention_decode(q, self.cache.k[layer][:rows], self.cache.v[layer][:rows], state.seq_lens, out,
                                 self.scale)
            return out

        def attention_fused(qkv, layer):
            # The state keeps slots[r] = r * S + seq_lens[r] - 1 for active rows and an idle row's slot in its
            # own cache row (decode_state.py): the op's precondition.
            lw = self.weights.layers[layer]
            out = torch.empty(qkv.shape[0], qkv.shape[1], qkv.shape[3], dtype=qkv.dtype, device=qkv.device)
            ops.qkv_attention_decode(qkv, state.positions, self.inv_freq, lw.q_ln_w, lw.q_ln_b, lw.k_ln_w, lw.k_ln_b,
                                     self.cache.k[layer][:rows], self.cache.v[layer][:rows], state.slots,
                                     state.seq_lens, out, self.config.layer_norm_eps, self.scale)
            return out

        attention = (attention_fused if self.fuse_decode_attention and rows <= FUSED_DECODE_ATTENTION_MAX_ROWS
                     else self._unfused_attention(state.positions, state.slots, attend))
        logits = self._logits(state.tokens, attention)
        if greedy and not logprobs:
            state.advance_greedy(logits.float())
            return
        tokens = sample(logits, state.temperature, state.top_k, state.top_p, greedy=greedy)
        if logprobs:
            chosen, top_ids, top_lp = token_logprobs(logits, tokens)
            state.logprobs.copy_(chosen)
            state.top_ids.copy_(top_ids)
            state.top_logprobs.copy_(top_lp)
        state.advance(tokens)
