"""The inference engine: static KV cache, packed prefill, CUDA-graph decode with in-graph sampling.

    engine = Engine.from_pretrained(path, dtype=torch.float16, max_batch_size=8, max_seq_len=4096)
    result = engine.generate(["human: Hi\\n\\nadept:"], max_new_tokens=64)

The forward pass is written once against `ops.py`: on a GPU with the extension built it runs the CUDA
kernels, elsewhere the fp32 references (the same API, slowly). Weights are the parameters of a
`PersimmonForCausalLM` (ours or transformers'), referenced, never copied.

Per layer (T packed tokens; the residual stream h is carried between fused LayerNorms):
    x, h  = LN_in(down_prev, residual=h)
    qkv   = x W_qkv^T + b                      [T, H, 3, D] head-major
    q     = qk_norm_rope_cache(qkv) -> caches  (k, v written at each token's slot)
    a     = attention(q, caches) W_o^T + b_o
    x, h  = LN_post(a, residual=h)
    up    = relu(x W_up^T + b_up)^2            (bias_relu2 epilogue)
    down  = up W_down^T + b_down
Decode runs the same function for one token per row inside a CUDA graph per batch bucket; the
graph reads tokens, positions, slots, lengths and sampling parameters from static device tensors.
With tensor parallelism (`tp`, see tensor_parallel.py) each rank runs this over its heads and MLP columns;
`a` and `down` are all-reduced in place before their LayerNorm and the logits gathered over the vocabulary,
all inside the same graph.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .config import PersimmonConfig
from .generation import validate_sampling
from .reference import rope_inv_freq

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Decode steps kept queued ahead of the host (see Engine._wave). With one, the GPU idled between steps
# for the host to wake from the previous step's event and launch the next (0.07-0.1 ms a step measured).
PIPELINE_DEPTH = 2


@dataclass
class LayerWeights:
    ln_in_w: torch.Tensor
    ln_in_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    q_ln_w: torch.Tensor | None
    q_ln_b: torch.Tensor | None
    k_ln_w: torch.Tensor | None
    k_ln_b: torch.Tensor | None
    dense_w: torch.Tensor
    dense_b: torch.Tensor | None          # None on tensor-parallel ranks > 0 (rank 0 adds it to the sum)
    ln_post_w: torch.Tensor
    ln_post_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor | None           # as dense_b


@dataclass
class Weights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_ln_w: torch.Tensor
    final_ln_b: torch.Tensor
    lm_head: torch.Tensor

    @classmethod
    def from_module(cls, model: torch.nn.Module, config: PersimmonConfig) -> "Weights":
        """Reference the parameters of a causal-LM module by their HF names (no copies)."""
        p = {name: t.detach() for name, t in model.named_parameters()}
        p.update({name: t.detach() for name, t in model.named_buffers()})
        prefix = "model." if "model.embed_tokens.weight" in p else ""

        def get(name, optional=False):
            if name == "lm_head.weight":
                return p.get(name, p[f"{prefix}embed_tokens.weight"])
            if name in p:
                return p[name]
            if optional:
                return None
            raise KeyError(f"the model has no parameter {name!r}")

        return cls.assemble(get, config, prefix)

    @classmethod
    def assemble(cls, get, config: PersimmonConfig, prefix: str) -> "Weights":
        """Weights from get(HF name, optional=False) -> tensor (None when optional and absent). "lm_head.weight"
        is asked for by that name; the getter decides what stands in for it (the embedding when tied)."""
        layers = []
        for i in range(config.num_hidden_layers):
            n = f"{prefix}layers.{i}."
            layers.append(LayerWeights(
                get(n + "input_layernorm.weight"), get(n + "input_layernorm.bias"),
                get(n + "self_attn.query_key_value.weight"), get(n + "self_attn.query_key_value.bias"),
                get(n + "self_attn.q_layernorm.weight", True), get(n + "self_attn.q_layernorm.bias", True),
                get(n + "self_attn.k_layernorm.weight", True), get(n + "self_attn.k_layernorm.bias", True),
                get(n + "self_attn.dense.weight"), get(n + "self_attn.dense.bias"),
                get(n + "post_attention_layernorm.weight"), get(n + "post_attention_layernorm.bias"),
                get(n + "mlp.dense_h_to_4h.weight"), get(n + "mlp.dense_h_to_4h.bias"),
                get(n + "mlp.dense_4h_to_h.weight"), get(n + "mlp.dense_4h_to_h.bias")))
        return cls(get(f"{prefix}embed_tokens.weight"), layers, get(f"{prefix}final_layernorm.weight"),
                   get(f"{prefix}final_layernorm.bias"), get("lm_head.weight"))


class StaticKVCache:
    """Per-layer K and V, [max_batch, max_seq, heads, head_dim]; row b belongs to batch slot b. Under tensor
    parallelism over N ranks each rank holds its heads only (num_heads = H / N)."""

    def __init__(self, config: PersimmonConfig, max_batch: int, max_seq: int, dtype, device,
                 num_heads: int | None = None):
        shape = (max_batch, max_seq, num_heads or config.num_attention_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    @staticmethod
    def nbytes(config: PersimmonConfig, max_batch: int, max_seq: int, dtype, tp_size: int = 1) -> int:
        """Bytes of the cache (of one rank's share under tensor parallelism over tp_size ranks)."""
        per_token = 2 * config.num_hidden_layers * config.hidden_size * torch.finfo(dtype).bits // 8 // tp_size
        return per_token * max_batch * max_seq


@dataclass
class GenerationResult:
    texts: list[str] | None
    token_ids: list[list[int]]
    finish_reasons: list[str]             # "stop" (stop token or string) or "length"


@dataclass
class StreamEvent:
    index: int                            # which prompt of the call
    token_id: int
    text: str                             # newly completed text ("" while a character is incomplete)
    finished: str | None = None           # finish reason on the last event of a sequence


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph | None
    tokens: torch.Tensor                  # [B] int64: input token of each row
    positions: torch.Tensor               # [B] int64
    slots: torch.Tensor                   # [B] int64: flat cache slot b*S + position
    seq_lens: torch.Tensor                # [B] int32: keys per row after this step (0 = idle row)
    temperature: torch.Tensor             # [B, 1] fp32 (0 = greedy)
    top_k: torch.Tensor                   # [B] int64 (0 = off)
    top_p: torch.Tensor                   # [B, 1] fp32
    active: torch.Tensor                  # [B] int32: 1 for rows still generating (their inputs advance)
    next_tokens: torch.Tensor = field(default=None)  # [B] int64, written by the step


class Engine:
    """Prefill + decode over a static KV cache. One generate call at a time: calls from several threads
    are serialised by a lock (the cache and the captured graphs are shared state). A stream holds the
    lock until it is exhausted or closed (`close()` on the iterator, or leaving a `for` loop early and
    dropping it).

    Tensor parallelism: pass `tp` (a `tensor_parallel.TensorParallel`) and run the same calls on every rank
    (launched by torchrun); each rank holds 1/N of the weights (sliced from `model`, or `weights` made by
    `tensor_parallel.load_shard`) and of the KV cache, and every rank returns the same tokens."""

    def __init__(self, model: torch.nn.Module | None, config: PersimmonConfig, max_batch_size: int = 1,
                 max_seq_len: int | None = None, tokenizer=None, use_cuda_graphs: bool = True,
                 prefill_chunk_tokens: int = 8192, tp=None, weights: Weights | None = None):
        self.config = config
        self.model = model                          # keeps the parameters alive
        self.tp = tp if tp is not None and tp.world_size > 1 else None     # None: the single-device path
        tp_size = self.tp.world_size if self.tp is not None else 1
        if self.tp is not None:
            from .tensor_parallel import check_tp_config, weights_from_module

            check_tp_config(config, tp_size)
        if weights is not None:
            self.weights = weights                  # already this rank's share under tensor parallelism
        elif self.tp is not None:
            self.weights = weights_from_module(model, config, self.tp.rank, tp_size)
        else:
            self.weights = Weights.from_module(model, config)
        self.num_heads = config.num_attention_heads // tp_size     # this rank's heads (KV cache, attention)
        self.device = self.weights.embed.device
        if self.tp is not None and self.tp.device.type != self.device.type:
            raise ValueError(f"the weights are on {self.device} but the tensor-parallel group communicates on "
                             f"{self.tp.device} (NCCL needs CUDA weights, gloo CPU ones)")
        self.dtype = self.weights.embed.dtype
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"unsupported weight dtype {self.dtype}; use float16, bfloat16 or float32")
        if ops.use_cuda_kernels(self.weights.embed):
            if self.dtype == torch.float32:
                raise ValueError("the CUDA kernels take float16 or bfloat16 weights; load with dtype=torch.float16 "
                                 "or torch.bfloat16 (float32 runs on the CPU reference path)")
            if config.head_dim not in (64, 128):
                raise ValueError(f"the CUDA attention kernels support head_dim 64 and 128, this model has "
                                 f"{config.head_dim}; run it on the CPU reference path (device='cpu')")
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = int(max_seq_len or config.max_position_embeddings)
        if self.max_batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("max_batch_size must be >= 1 and max_seq_len >= 2")
        if self.max_seq_len > config.max_position_embeddings and config.rope_type != "dynamic":
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        self._check_cache_fits()
        self.cache = StaticKVCache(config, self.max_batch_size, self.max_seq_len, self.dtype, self.device,
                                   self.num_heads)
        self.tokenizer = tokenizer
        generation_config = getattr(model, "generation_config", None)   # ours: a dict from the model dir
        self.generation_config = generation_config if isinstance(generation_config, dict) else {}
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.inv_freq = self._inv_freq(self.max_seq_len if config.rope_type != "dynamic" else 0)
        self._gemv = ops.use_cuda_kernels(self.weights.embed) and ops.has_op("decode_linear")
        self._graphs: dict[tuple[int, bool], _DecodeGraph] = {}
        self._graph_pool = None
        self._lock = threading.Lock()
        # Timings of the last wave: prefill_s (prompt + first token), decode_s over decode_steps steps.
        self.last_stats: dict = {}

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float16, device=None, max_batch_size: int = 1,
                        max_seq_len: int | None = None, tp=None, **kwargs) -> "Engine":
        """Load an HF-format directory. With `tp` (tensor parallelism over more than one rank) each rank reads
        only its slices of the checkpoint (`tensor_parallel.load_shard`) onto `device` (default tp.device)."""
        from .model import GENERATION_CONFIG, PersimmonForCausalLM
        from .tokenizer import PersimmonTokenizer

        sharded = tp is not None and tp.world_size > 1
        default = tp.device if sharded else ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device or default)
        if device.type == "cpu" and dtype == torch.float16:
            dtype = torch.float32                     # the CPU reference path computes in fp32 anyway
        tokenizer = None
        try:
            tokenizer = PersimmonTokenizer.from_pretrained(path)
        except FileNotFoundError:
            pass
        if not sharded:
            model = PersimmonForCausalLM.from_pretrained(path, dtype=dtype, device=device)
            return cls(model, model.config, max_batch_size, max_seq_len, tokenizer, **kwargs)
        from .tensor_parallel import load_shard

        config = PersimmonConfig.from_pretrained(path)
        weights = load_shard(path, config, tp.rank, tp.world_size, dtype=dtype, device=device)
        engine = cls(None, config, max_batch_size, max_seq_len, tokenizer, tp=tp, weights=weights, **kwargs)
        gen_path = os.path.join(os.fspath(path), GENERATION_CONFIG)
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as fh:
                engine.generation_config = json.load(fh)
        return engine

    @classmethod
    def from_transformers(cls, model, tokenizer=None, **kwargs) -> "Engine":
        """Wrap an already-loaded transformers PersimmonForCausalLM; its weights are used in place."""
        config = PersimmonConfig.from_dict(model.config.to_dict())
        return cls(model, config, tokenizer=tokenizer, **kwargs)

    def _check_cache_fits(self) -> None:
        if self.device.type != "cuda":
            return
        tp_size = self.tp.world_size if self.tp is not None else 1
        need = StaticKVCache.nbytes(self.config, self.max_batch_size, self.max_seq_len, self.dtype, tp_size)
        free, _ = torch.cuda.mem_get_info(self.device)
        if self.tp is not None:
            free = self.tp.min_over_ranks(free)      # every rank decides alike (none waits in a collective)
        reserve = 2 * 2**30          # activations of a prefill chunk, logits, graph pools
        if need + reserve > free:
            per_token = StaticKVCache.nbytes(self.config, 1, 1, self.dtype, tp_size)
            budget = max(free - reserve, 0) // per_token
            raise MemoryError(
                f"KV cache for max_batch_size={self.max_batch_size} x max_seq_len={self.max_seq_len} needs "
                f"{need / 2**30:.2f} GiB but {free / 2**30:.2f} GiB is free (keeping {reserve / 2**30:.0f} GiB "
                f"for activations): the largest that fit are max_seq_len={budget // self.max_batch_size} at "
                f"this batch size, or max_batch_size={budget // self.max_seq_len} at this length")

    def _inv_freq(self, seq_len: int) -> torch.Tensor:
        c = self.config
        return rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_type, (c.rope_scaling or {}).get("factor", 1.0),
                             c.max_position_embeddings, seq_len or None, device=self.device)

    # --------------------------------------------------------------------------------------------- model
    def _forward(self, tokens, positions, slots, attend, select=None, inputs_embeds=None) -> torch.Tensor:
        """Run every layer over packed tokens and return fp32 logits of the rows in `select` (all if None).

        attend(q [T, H, D], layer) -> [T, H, D] is the attention of this pass (prefill or decode).
        Under tensor parallelism H is this rank's heads; the dense and MLP-down outputs are partial sums,
        all-reduced in place before the LayerNorm that adds them to the residual, and the vocabulary slices
        of the logits are gathered. Without it the `self.tp` checks are all that is added (at trace time).
        """
        c, w, tp = self.config, self.weights, self.tp
        H, D = self.num_heads, c.head_dim
        h = F.embedding(tokens, w.embed) if inputs_embeds is None else inputs_embeds
        T = h.shape[0]
        x = torch.empty_like(h)
        q = torch.empty(T, H, D, dtype=h.dtype, device=h.device)
        down = None
        for i, lw in enumerate(w.layers):
            if down is None:
                ops.layernorm(h, lw.ln_in_w, lw.ln_in_b, x, c.layer_norm_eps)
            else:
                ops.layernorm(down, lw.ln_in_w, lw.ln_in_b, x, c.layer_norm_eps, h, h)
            qkv = self._linear(x, lw.qkv_w, lw.qkv_b).view(T, H, 3, D)
            ops.qk_norm_rope_cache(qkv, positions, self.inv_freq, lw.q_ln_w, lw.q_ln_b, lw.k_ln_w, lw.k_ln_b,
                                   self.cache.k[i], self.cache.v[i], slots, q, c.layer_norm_eps)
            attn = self._linear(attend(q, i).view(T, H * D), lw.dense_w, lw.dense_b)
            if tp is not None:
                tp.all_reduce_(attn)
            ops.layernorm(attn, lw.ln_post_w, lw.ln_post_b, x, c.layer_norm_eps, h, h)
            up = self._linear(x, lw.up_w, lw.up_b, relu2=True)
            down = self._linear(up, lw.down_w, lw.down_b)
            if tp is not None:
                tp.all_reduce_(down)
        if select is not None:
            down, h = down[select], h[select]
        out = torch.empty_like(h)
        ops.layernorm(down, w.final_ln_w, w.final_ln_b, out, c.layer_norm_eps, h, torch.empty_like(h))
        logits = self._linear(out, w.lm_head, out_dtype=torch.float32)
        return logits if tp is None else tp.gather_vocab(logits)

    def _linear(self, x, weight, bias=None, relu2=False, out_dtype=None) -> torch.Tensor:
        """x W^T (+ bias) (then relu^2): the decode GEMV (weight streaming, epilogue fused) for up to
        DECODE_LINEAR_MAX_ROWS rows on the GPU; cuBLAS plus the bias_relu2 epilogue otherwise. out_dtype=float32
        gives fp32 logits."""
        if self._gemv and x.shape[0] <= ops.DECODE_LINEAR_MAX_ROWS:
            out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
            ops.decode_linear(x, weight, bias, None, out, relu2)
            return out
        if relu2:
            y = F.linear(x, weight)
            ops.bias_relu2(y, bias, y)
            return y
        y = F.linear(x, weight, bias)
        return y if out_dtype is None else y.to(out_dtype)

    def _prefill(self, prompts: list[torch.Tensor | None], embeds: list[torch.Tensor | None]) -> torch.Tensor:
        """Write the prompts of batch rows 0..n-1 into the cache, in chunks of at most prefill_chunk_tokens
        tokens (so memory stays bounded at 16K); returns fp32 logits of each row's last prompt token."""
        total = [len(p) if p is not None else e.shape[0] for p, e in zip(prompts, embeds)]
        done = [0] * len(total)
        last_logits: list[torch.Tensor | None] = [None] * len(total)
        while any(d < t for d, t in zip(done, total)):
            budget, chunk = self.prefill_chunk_tokens, []
            for j in range(len(total)):
                take = min(total[j] - done[j], budget)
                if take > 0:
                    chunk.append((j, done[j], take))
                    budget -= take
            for (j, start, take), row_logits in zip(chunk, self._prefill_chunk(prompts, embeds, chunk)):
                done[j] = start + take
                if done[j] == total[j]:
                    last_logits[j] = row_logits
        return torch.stack(last_logits)

    def _prefill_chunk(self, prompts, embeds, chunk) -> torch.Tensor:
        """One packed forward over (row, start, count) pieces, in row order; logits of each piece's last token."""
        dev, S = self.device, self.max_seq_len
        counts = [0] * self.max_batch_size
        seq_lens = torch.zeros(self.max_batch_size, dtype=torch.int32)
        positions, slots, parts = [], [], []
        for j, start, take in chunk:
            counts[j] = take
            seq_lens[j] = start + take
            positions.append(torch.arange(start, start + take))
            slots.append(positions[-1] + j * S)
            parts.append((prompts[j] if prompts[j] is not None else embeds[j])[start:start + take])
        cu = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32)
        if prompts[chunk[0][0]] is not None:
            tokens, inputs_embeds = torch.cat(parts).to(dev), None
        else:
            tokens, inputs_embeds = None, torch.cat(parts).to(dev, self.dtype, copy=True)
        max_q = max(take for _, _, take in chunk)
        cu, seq_lens = cu.to(dev), seq_lens.to(dev)

        def attend(q, layer):
            out = torch.empty_like(q)
            ops.attention_prefill(q, self.cache.k[layer], self.cache.v[layer], cu, seq_lens, max_q, out,
                                  self.scale)
            return out

        last = torch.tensor(list(itertools.accumulate(take for _, _, take in chunk)), device=dev) - 1
        return self._forward(tokens, torch.cat(positions).to(dev), torch.cat(slots).to(dev), attend, select=last,
                             inputs_embeds=inputs_embeds)

    def _decode_step(self, g: _DecodeGraph, greedy: bool) -> None:
        """One token for every row of the bucket: reads g's inputs, writes g.next_tokens."""
        rows = g.tokens.shape[0]           # the bucket: cache rows [0, rows) hold its sequences

        def attend(q, layer):
            out = torch.empty_like(q)
            ops.attention_decode(q, self.cache.k[layer][:rows], self.cache.v[layer][:rows], g.seq_lens, out,
                                 self.scale)
            return out

        logits = self._forward(g.tokens, g.positions, g.slots, attend)
        g.next_tokens = greedy_or_sample(logits, g.temperature, g.top_k, g.top_p, greedy)
        # The next step's inputs, advanced on the device so the host only reads the sampled tokens:
        # active rows feed their token back and move one position on; retired and idle rows stay put.
        g.tokens.copy_(g.next_tokens)
        g.positions.add_(g.active)
        g.slots.add_(g.active)
        g.seq_lens.add_(g.active)

    def _graph_for(self, bucket: int, greedy: bool) -> _DecodeGraph:
        key = (bucket, greedy)
        if key in self._graphs:
            return self._graphs[key]
        dev = self.device
        g = _DecodeGraph(None, torch.zeros(bucket, dtype=torch.long, device=dev),
                         torch.zeros(bucket, dtype=torch.long, device=dev),
                         torch.arange(bucket, device=dev) * self.max_seq_len,
                         torch.zeros(bucket, dtype=torch.int32, device=dev),
                         torch.ones(bucket, 1, device=dev), torch.zeros(bucket, dtype=torch.long, device=dev),
                         torch.ones(bucket, 1, device=dev), torch.zeros(bucket, dtype=torch.int32, device=dev))
        if self.use_cuda_graphs:
            # Warm up on a side stream (allocator and kernel handles), then capture one step. Idle rows
            # (seq_len 0) keep the capture from reading the cache; replays read the real lengths.
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._decode_step(g, greedy)
            torch.cuda.current_stream(dev).wait_stream(stream)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            g.graph = torch.cuda.CUDAGraph()
            # Under tensor parallelism other threads (NCCL's, the process group's watchdog) make CUDA calls
            # while this thread captures; "thread_local" keeps those from invalidating the capture.
            mode = "global" if self.tp is None else "thread_local"
            with torch.cuda.graph(g.graph, pool=self._graph_pool, capture_error_mode=mode):
                self._decode_step(g, greedy)
        self._graphs[key] = g
        return g

    def capture(self, batch_sizes: Sequence[int] = (1,), greedy: bool = True) -> None:
        """Capture the decode graphs for these batch sizes now (otherwise on first use)."""
        for b in batch_sizes:
            self._graph_for(_bucket(b, self.max_batch_size), greedy)

    # ---------------------------------------------------------------------------------------- generation
    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
                 stop_strings: Sequence[str] | None = None, stream: bool = False, inputs_embeds=None):
        """Generate from a batch of prompts: strings (needs a tokenizer), lists of token ids, or (with
        `prompts=None`) `inputs_embeds` as a list of [len, hidden] tensors.

        temperature 0 is greedy. Stop token ids default to the model's end-of-text. Returns a
        GenerationResult, or with stream=True an iterator of StreamEvent as tokens are produced.
        Batches larger than max_batch_size run in waves.
        """
        validate_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        token_prompts, embed_prompts = self._normalise_prompts(prompts, inputs_embeds)
        stop_ids = self._stop_ids(stop_token_ids)
        events = self._generate_events(token_prompts, embed_prompts, max_new_tokens, temperature, top_k, top_p,
                                       seed, stop_ids, list(stop_strings or []))
        if stream:
            return events
        n = len(token_prompts)
        ids: list[list[int]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        for ev in events:
            ids[ev.index].append(ev.token_id)
            if ev.finished:
                reasons[ev.index] = ev.finished
        texts = None
        if self.tokenizer is not None:
            texts = [self._final_text(seq, stop_strings) for seq in ids]
        return GenerationResult(texts, ids, reasons)

    def _final_text(self, ids: list[int], stop_strings) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop_strings or []:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text

    def _normalise_prompts(self, prompts, inputs_embeds):
        V = self.config.vocab_size
        if inputs_embeds is not None:
            if prompts is not None:
                raise ValueError("give prompts or inputs_embeds, not both")
            embeds = [inputs_embeds] if torch.is_tensor(inputs_embeds) and inputs_embeds.dim() == 2 else list(inputs_embeds)
            for e in embeds:
                if e.dim() != 2 or e.shape[1] != self.config.hidden_size:
                    raise ValueError(f"each inputs_embeds must be [len, {self.config.hidden_size}], "
                                     f"got {tuple(e.shape)}")
                if not e.is_floating_point():
                    raise ValueError(f"inputs_embeds must be floating point, got {e.dtype}")
            return [None] * len(embeds), embeds
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (tokenizer.model in the model directory)")
                p = self.tokenizer.encode(p)
            t = torch.as_tensor(list(p) if not torch.is_tensor(p) else p, dtype=torch.long).flatten().cpu()
            if t.numel() == 0:
                raise ValueError("empty prompt: give at least one token")
            if int(t.min()) < 0 or int(t.max()) >= V:
                raise ValueError(f"prompt token ids must be in [0, {V}); got min {int(t.min())}, max {int(t.max())}")
            out.append(t)
        return out, [None] * len(out)

    def _stop_ids(self, stop_token_ids) -> list[int]:
        if stop_token_ids is not None:
            return list(stop_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return [self.tokenizer.eos_token_id]
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        return [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])

    def _generate_events(self, token_prompts, embed_prompts, max_new_tokens, temperature, top_k, top_p, seed,
                         stop_ids, stop_strings) -> Iterator[StreamEvent]:
        n = len(token_prompts)
        for start in range(0, n, self.max_batch_size):
            idx = list(range(start, min(n, start + self.max_batch_size)))
            with self._lock:
                yield from self._wave(idx, [token_prompts[i] for i in idx], [embed_prompts[i] for i in idx],
                                      max_new_tokens, temperature, top_k, top_p, seed, stop_ids, stop_strings)

    @torch.no_grad()
    def _wave(self, idx, prompts, embeds, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
              stop_strings) -> Iterator[StreamEvent]:
        B = len(idx)
        lens = [len(p) if p is not None else e.shape[0] for p, e in zip(prompts, embeds)]
        for L in lens:
            if L + max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                                 f"max_seq_len ({self.max_seq_len})")
        if self.config.rope_type == "dynamic":
            self.inv_freq.copy_(self._inv_freq(max(lens)))
        greedy = temperature == 0
        if self.tp is not None and not greedy:
            # Every rank draws the same random numbers (the logits are identical), so the sampled tokens
            # agree without a collective in the step: one seed, rank 0's, for the whole wave.
            seed = self.tp.shared_seed(seed)
        bucket = _bucket(B, self.max_batch_size)
        # Capture (its warm-up steps write the cache at position 0) before the prefill fills the cache, and
        # seed after it (its warm-up steps draw random numbers), so a seed gives the same tokens whether or
        # not this call had to capture.
        g = self._graph_for(bucket, greedy)
        if seed is not None:
            torch.manual_seed(seed)
        started = time.perf_counter()
        logits = self._prefill(prompts, embeds)
        temp = torch.ones(bucket, 1)            # idle rows sample at temperature 1 (ignored, but finite)
        temp[:B] = max(temperature, 1e-6)
        g.temperature.copy_(temp)
        g.top_k.fill_(int(top_k))
        g.top_p.fill_(float(top_p))
        first = greedy_or_sample(logits, g.temperature[:B], g.top_k[:B], g.top_p[:B], greedy)
        decoders = [self.tokenizer.stream_decoder(skip_special_tokens=True) if self.tokenizer else None
                    for _ in range(B)]
        texts = [""] * B
        finished = [False] * B
        self._start_decode(g, lens, first)
        seq_lens = [L + 1 for L in lens]         # keys per row after the next step; dynamic rotary only
        tokens = first.tolist()                  # syncs: the prefill (and first sample) is done
        self.last_stats = {"batch": B, "prompt_tokens": sum(lens), "prefill_s": time.perf_counter() - started,
                           "decode_steps": 0, "decode_s": 0.0}
        decode_started = time.perf_counter()
        # The loop keeps two steps queued ahead of the host: step n + 2 is launched before the host waits
        # for step n + 1 and handles step n's tokens (detokenising, stop checks, the caller's own work on a
        # stream), so the GPU neither waits for the host nor for the host to notice a finished step. The
        # price is up to two wasted steps when every row stops early; a row that stops at step n has
        # already run steps n + 1 and n + 2, whose tokens are dropped and whose K/V land inside its own
        # cache row (positions < prompt + max_new_tokens <= max_seq_len). Dynamic rotary needs each
        # step's true lengths before launching it, so it runs in lockstep.
        depth = 0 if self.config.rope_type == "dynamic" else PIPELINE_DEPTH
        on_gpu = self.device.type == "cuda"
        host_tokens = [torch.empty(B, dtype=torch.long, pin_memory=on_gpu) for _ in range(max(depth, 1))]
        arrived = [torch.cuda.Event() if on_gpu else None for _ in host_tokens]
        launched = 0                             # decode steps queued so far (step k fills slot (k-1) % len)

        def launch() -> None:
            nonlocal launched
            slot = launched % len(host_tokens)
            self._launch_step(g, greedy, host_tokens[slot], arrived[slot])
            launched += 1

        for step in range(max_new_tokens):
            last = step == max_new_tokens - 1
            while launched < min(step + depth, max_new_tokens - 1):
                launch()
            retired = []
            for r in range(B):
                if finished[r]:
                    continue
                tok = tokens[r]
                delta = decoders[r].push(tok) if decoders[r] else ""
                texts[r] += delta
                reason = None
                if tok in stop_ids or (stop_strings and any(s in texts[r] for s in stop_strings)):
                    reason = "stop"
                elif last:
                    reason = "length"
                if reason:
                    delta += decoders[r].flush() if decoders[r] else ""
                    finished[r] = True
                    retired.append(r)
                yield StreamEvent(idx[r], tok, delta, reason)
            if all(finished) or last:
                break
            if retired:
                self._retire_rows(g, retired)
            if depth == 0:
                self.inv_freq.copy_(self._inv_freq(max(n for n, done in zip(seq_lens, finished) if not done)))
                launch()
                seq_lens = [n + (not done) for n, done in zip(seq_lens, finished)]
            slot = step % len(host_tokens)       # step + 1's tokens
            if arrived[slot] is not None:
                arrived[slot].synchronize()
            tokens = host_tokens[slot].tolist()
            self.last_stats["decode_steps"] += 1
            self.last_stats["decode_s"] = time.perf_counter() - decode_started

    def _launch_step(self, g: _DecodeGraph, greedy: bool, host_tokens: torch.Tensor, copied) -> None:
        """Queue one decode step and the copy of its tokens into `host_tokens` (pinned on a GPU);
        `copied` (a CUDA event, None on the CPU) marks when they have arrived."""
        if g.graph is not None:
            g.graph.replay()
        else:
            self._decode_step(g, greedy)
        host_tokens.copy_(g.next_tokens[:host_tokens.shape[0]], non_blocking=copied is not None)
        if copied is not None:
            copied.record(torch.cuda.current_stream(self.device))

    def _start_decode(self, g: _DecodeGraph, lens: list[int], first: torch.Tensor) -> None:
        """Inputs of the first decode step: row r feeds `first[r]` at position lens[r]; idle rows attend to
        nothing (seq_len 0) and write their (ignored) K/V at position 0 of their own cache row."""
        bucket, B, S = g.tokens.shape[0], len(lens), self.max_seq_len
        positions = torch.zeros(bucket, dtype=torch.long)
        positions[:B] = torch.tensor(lens)
        active = torch.zeros(bucket, dtype=torch.int32)
        active[:B] = 1
        g.tokens.zero_()
        g.tokens[:B].copy_(first)
        g.positions.copy_(positions)
        g.slots.copy_(positions + torch.arange(bucket) * S)
        g.seq_lens.copy_((positions + 1) * active)
        g.active.copy_(active)

    def _retire_rows(self, g: _DecodeGraph, rows: list[int]) -> None:
        """Finished rows stop advancing, attend to nothing and write at position 0 of their own row (so a
        row that used its whole budget never writes past its end into the next row)."""
        index = torch.tensor(rows, device=self.device)
        g.active.index_fill_(0, index, 0)
        g.seq_lens.index_fill_(0, index, 0)
        g.slots.index_copy_(0, index, index * self.max_seq_len)


def greedy_or_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     greedy: bool) -> torch.Tensor:
    """Next token of each row of fp32 [B, V] logits, without a host sync (CUDA-graph safe).

    Sampling follows transformers' order: temperature, top-k (0 = off), top-p over what is left (keeping at
    least the best token); the draw is an exponential race (argmax p / E, E ~ Exp(1)), which samples from p.
    """
    if greedy:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p) & (ranks > 0), 0.0)
    race = probs / torch.empty_like(probs).exponential_(1.0)
    return order.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)


def _bucket(batch: int, max_batch: int) -> int:
    """The smallest captured batch size that holds `batch` rows."""
    return next((b for b in BATCH_BUCKETS if batch <= b <= max_batch), max_batch)
