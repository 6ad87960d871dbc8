"""The inference engine: a static KV cache, packed prefill, CUDA-graph decode with in-graph sampling.

    engine = Engine.from_pretrained(path, dtype=torch.float16, max_batch_size=8, max_seq_len=4096)
    result = engine.generate(["human: Hi\\n\\nadept:"], max_new_tokens=64)

The engine puts together the pieces, each in its own module: the weights (loading.py), the cache
(cache.py), the forward pass on the fused ops (forward.py), the per-bucket decode state and its CUDA
graphs (decode_state.py, decode_graphs.py), and the scheduler that lets rows join and leave the decode at
step boundaries (scheduler.py). On a GPU with the extension built the forward pass runs the CUDA kernels,
elsewhere the fp32 references (the same API, slowly).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import ops
from .cache import StaticKVCache
from .config import PersimmonConfig
from .decode_graphs import GREEDY, SAMPLED, SAMPLED_LOGPROBS, DecodeGraphs, bucket_for
from .forward import Forward
from .fuyu.config import is_fuyu_dir
from .loading import Weights, load_weights, weights_from_module
from .sampling import MAX_LOGPROBS, validate_sampling
from .scheduler import Request, Scheduler
from .weights import read_generation_config

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class GenerationResult:
    texts: list[str] | None               # each ends just before its stop token or stop string
    token_ids: list[list[int]]            # every generated token, the one that stopped the sequence included
    finish_reasons: list[str]             # "stop" (stop token or string) or "length"


@dataclass
class StreamEvent:
    index: int                            # which prompt of the call
    token_id: int
    text: str                             # newly released text ("" while a character or a stop is pending)
    finished: str | None = None           # finish reason on the last event of a sequence
    logprob: float | None = None          # with logprobs=: the token's log-probability (fp32)
    top_logprobs: list[tuple[int, float]] | None = None     # and the most likely (id, log-probability)


class Engine:
    """Prefill + decode over a static KV cache. One generate call at a time: calls from several threads
    are serialised by a lock (the cache and the captured graphs are shared state). A stream holds the
    lock until it is exhausted or closed (`close()` on the iterator, or leaving a `for` loop early and
    dropping it).

    Tensor parallelism: pass `tp` (a `tensor_parallel.TensorParallel`) and run the same calls on every rank
    (launched by torchrun); each rank holds 1/N of the weights (sliced from `model`, or `weights` loaded
    with `loading.load_weights(..., shard=(rank, N))`) and of the KV cache, and every rank returns the same
    tokens."""

    def __init__(self, model: torch.nn.Module | None, config: PersimmonConfig, max_batch_size: int = 1,
                 max_seq_len: int | None = None, tokenizer=None, use_cuda_graphs: bool = True,
                 prefill_chunk_tokens: int = 8192, tp=None, weights: Weights | None = None,
                 generation_config: dict | None = None):
        self.config = config
        self.model = model                          # keeps the parameters alive
        self.tp = tp if tp is not None and tp.world_size > 1 else None     # None: the single-device path
        shard = (self.tp.rank, self.tp.world_size) if self.tp is not None else None
        self.weights = weights if weights is not None else weights_from_module(model, config, shard)
        self.device, self.dtype = self.weights.embed.device, self.weights.embed.dtype
        self._check_placement()
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = int(max_seq_len or config.max_position_embeddings)
        self._check_sizes()
        tp_size = self.tp.world_size if self.tp is not None else 1
        self.cache = StaticKVCache(config, self.max_batch_size, self.max_seq_len, self.dtype, self.device,
                                   config.num_attention_heads // tp_size)
        self.tokenizer = tokenizer
        if generation_config is None:               # ours keeps it as a dict from the model directory
            generation_config = getattr(model, "generation_config", None)
        self.generation_config = generation_config if isinstance(generation_config, dict) else {}
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.forward = Forward(config, self.weights, self.cache, self.max_seq_len, self.tp)
        self.graphs = DecodeGraphs(self.forward, self.max_seq_len, use_cuda_graphs, self.tp is not None)
        if self.tp is not None:
            self.tp.register_graph_owner(self)
            self.tp.enable_fast_all_reduce(self.dtype, config.hidden_size)
        self._lock = threading.Lock()
        self.images = None                          # the image front end of a multimodal model (Fuyu)
        # Timings of the last generate call: prefill_s (prompts + first tokens), decode_s over decode_steps.
        self.last_stats: dict = {}

    @property
    def num_heads(self) -> int:
        """Attention heads this engine (this rank, under tensor parallelism) computes."""
        return self.forward.num_heads

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float16, device=None, max_batch_size: int = 1,
                        max_seq_len: int | None = None, tp=None, quantize: str | None = None, **kwargs) -> "Engine":
        """Load an HF-format directory straight into the engine's weights (no nn.Module). With `tp` (more
        than one rank) each rank reads only its slices, onto `device` (default tp.device).
        quantize="int8": weight-only int8 (quantization.py), quantized tensor by tensor while loading; a
        checkpoint saved quantized loads quantized without it."""
        from .tokenizer import PersimmonTokenizer

        sharded = tp is not None and tp.world_size > 1
        default = tp.device if sharded else ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device or default)
        if device.type == "cpu" and dtype == torch.float16:
            dtype = torch.float32                     # the CPU reference path computes in fp32 anyway
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; use torch.float16, torch.bfloat16 or torch.float32")
        path = os.fspath(path)
        if is_fuyu_dir(path):
            return cls._from_fuyu(path, dtype, device, max_batch_size, max_seq_len, tp, quantize, **kwargs)
        config = PersimmonConfig.from_pretrained(path)
        tokenizer = None
        try:
            tokenizer = PersimmonTokenizer.from_pretrained(path)
        except FileNotFoundError:
            pass
        shard = (tp.rank, tp.world_size) if sharded else None
        weights = load_weights(path, config, dtype, device, shard, quantize=quantize)
        return cls(None, config, max_batch_size, max_seq_len, tokenizer, tp=tp, weights=weights,
                   generation_config=read_generation_config(path), **kwargs)

    @classmethod
    def _from_fuyu(cls, path, dtype, device, max_batch_size, max_seq_len, tp, quantize, **kwargs) -> "Engine":
        """Fuyu: the decoder as usual, plus the image front end (fuyu/frontend.py) as `engine.images`."""
        from .fuyu.frontend import load_fuyu

        if tp is not None and tp.world_size > 1:
            raise ValueError("Fuyu does not support tensor parallelism yet; run it on one GPU")
        config, weights, images = load_fuyu(path, dtype, device, quantize)
        engine = cls(None, config.text_config, max_batch_size, max_seq_len, images.processor and images.processor.tokenizer,
                     weights=weights, generation_config=read_generation_config(path), **kwargs)
        engine.images = images
        return engine

    @classmethod
    def from_transformers(cls, model, tokenizer=None, **kwargs) -> "Engine":
        """Wrap an already-loaded transformers PersimmonForCausalLM; its weights are used in place. Pass
        `tokenizer=` (a PersimmonTokenizer) for text prompts."""
        config = PersimmonConfig.from_dict(model.config.to_dict())
        return cls(model, config, tokenizer=tokenizer, **kwargs)

    def _check_placement(self) -> None:
        if self.tp is not None and self.tp.device.type != self.device.type:
            raise ValueError(f"the weights are on {self.device} but the tensor-parallel group communicates on "
                             f"{self.tp.device} (NCCL needs CUDA weights, gloo CPU ones)")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported weight dtype {self.dtype}; use float16, bfloat16 or float32")
        if ops.use_cuda_kernels(self.weights.embed):
            if self.dtype == torch.float32:
                raise ValueError("the CUDA kernels take float16 or bfloat16 weights; load with dtype=torch.float16 "
                                 "or torch.bfloat16 (float32 runs on the CPU reference path)")
            if self.weights.scheme is not None and (self.config.hidden_size % 16 or self.config.intermediate_size % 16):
                raise ValueError(f"the int8 CUDA kernels need hidden_size and intermediate_size divisible by 16, "
                                 f"this model has {self.config.hidden_size} and {self.config.intermediate_size}")
            if not ops.kernels_support(self.config.head_dim):
                raise ValueError(f"the CUDA attention kernels support head_dim {ops.ATTENTION_HEAD_DIMS}, this "
                                 f"model has {self.config.head_dim}; run it on the CPU reference path "
                                 "(device='cpu')")

    def _check_sizes(self) -> None:
        config = self.config
        if self.max_batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("max_batch_size must be >= 1 and max_seq_len >= 2")
        if self.max_seq_len > config.max_position_embeddings and config.rope_type != "dynamic":
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        self._check_cache_fits()

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

    # ----------------------------------------------------------------------------------------- graphs
    def capture(self, batch_sizes: Sequence[int] = (1,), greedy: bool = True, logprobs: bool = False) -> None:
        """Capture the decode graphs for these batch sizes now (otherwise on first use)."""
        variant = SAMPLED_LOGPROBS if logprobs else (GREEDY if greedy else SAMPLED)
        with self._lock:
            for b in batch_sizes:
                rows = bucket_for(b, self.max_batch_size)
                self.graphs.state(rows).clear()
                self.graphs.capture(rows, variant)

    def release_graphs(self) -> None:
        """Free the captured decode graphs (they are captured again on next use). Under tensor parallelism
        this runs before the process group is destroyed (see TensorParallel.shutdown)."""
        with self._lock:
            self.graphs.release()

    def scheduler(self, rows: int | None = None, prefill_budget: int | None = None) -> Scheduler:
        """A continuous-batching scheduler over `rows` rows (default max_batch_size), with every step variant
        captured. The caller owns the engine while it uses it (hold `engine.lock`)."""
        rows = bucket_for(rows or self.max_batch_size, self.max_batch_size)
        self.graphs.state(rows).clear()
        for variant in (GREEDY, SAMPLED, SAMPLED_LOGPROBS):
            self.graphs.capture(rows, variant)
        return self._scheduler(rows, prefill_budget)

    def _scheduler(self, rows: int, prefill_budget: int | None = None) -> Scheduler:
        embed_patches = None if self.images is None else \
            (lambda ids, patches: self.images.embed(ids, patches, self.forward.embed))
        return Scheduler(self.forward, self.graphs, rows, self.tokenizer, self.prefill_chunk_tokens, prefill_budget,
                         embed_patches=embed_patches)

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def decode_step(self, batch: int, context: int, greedy: bool = True):
        """For benchmarks: a function that queues one decode step (the captured graph when there is one) over
        `batch` rows at position `context`, set up now. Each call advances the rows by one position, so it may
        be called as many times as the cache has room after `context`."""
        rows = bucket_for(batch, self.max_batch_size)
        variant = GREEDY if greedy else SAMPLED
        state = self.graphs.state(rows)
        state.clear()
        self.graphs.capture(rows, variant)
        n = min(batch, rows)
        state.join(range(n), torch.zeros(n, dtype=torch.long), [context] * n, [0.0 if greedy else 1.0] * n,
                   [0] * n, [1.0] * n)
        return lambda: self.graphs.launch(rows, variant)

    # ---------------------------------------------------------------------------------------- generation
    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
                 stop_strings: Sequence[str] | None = None, stream: bool = False, inputs_embeds=None,
                 logprobs: int | None = None, images=None):
        """Generate from a batch of prompts: strings (needs a tokenizer), lists of token ids, or (with
        `prompts=None`) `inputs_embeds` as a list of [len, hidden] tensors. A multimodal model (Fuyu) takes
        `images`, one per text prompt (paths, PIL images or uint8 arrays).

        temperature 0 is greedy. Stop token ids default to the model's end-of-text; texts end just before a
        stop token or stop string. logprobs=k (0..5) adds each token's log-probability and the k most
        likely alternatives to the stream events. Returns a GenerationResult, or with stream=True an
        iterator of StreamEvent as tokens are produced. Prompts beyond max_batch_size wait for a free row.
        """
        patches = None
        if images is not None:
            if inputs_embeds is not None:
                raise ValueError("give images with text prompts, not with inputs_embeds")
            prompts, patches = self._image_prompts(prompts, images)
        requests = self._requests(prompts, inputs_embeds, max_new_tokens, temperature, top_k, top_p,
                                  stop_token_ids, stop_strings, logprobs, patches)
        events = self._events(requests, seed)
        if stream:
            return events
        for _ in events:
            pass
        texts = [r.text for r in requests] if self.tokenizer is not None else None
        return GenerationResult(texts, [r.output_ids for r in requests], [r.finish_reason for r in requests])

    def _image_prompts(self, prompts, images) -> tuple[list[list[int]], list]:
        """Token ids and patches of each (text prompt, image) pair, through the processor."""
        self._need_images()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt")
        pairs = [self.images.prompt(p, im) for p, im in zip(prompts, images)]
        return [ids for ids, _ in pairs], [patches for _, patches in pairs]

    def _need_images(self) -> None:
        if self.images is None:
            raise ValueError("this is a text-only Persimmon model; images need a Fuyu model directory")

    def _requests(self, prompts, inputs_embeds, max_new_tokens, temperature, top_k, top_p, stop_token_ids,
                  stop_strings, logprobs, patches=None) -> list[Request]:
        prompts = self._normalise_prompts(prompts, inputs_embeds)
        patches = patches or [None] * len(prompts)
        return [self.request(p, max_new_tokens, temperature, top_k, top_p, stop_token_ids, stop_strings, logprobs,
                             tag=i, patches=patches[i])
                for i, p in enumerate(prompts)]

    def request(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None,
                stop_strings: Sequence[str] | None = None, logprobs: int | None = None, tag=None,
                patches: torch.Tensor | None = None) -> Request:
        """A checked Request for a scheduler: `prompt` is a string, token ids, or an embeddings tensor
        [len, hidden]; a multimodal model (Fuyu) also takes token ids with the image `patches` that fill their
        placeholders (`engine.images.prompt(text, image)` makes both). Raises ValueError naming the problem
        (a prompt that does not fit, bad sampling values, an out-of-range token id, an empty stop string,
        patches that do not fit the placeholders)."""
        validate_sampling(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
        if any(not isinstance(s, str) or not s for s in stop_strings or []):
            raise ValueError("stop strings must be non-empty strings")
        if not (torch.is_tensor(prompt) and prompt.is_floating_point()):
            prompt = self._token_prompt(prompt)
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"engine's max_seq_len ({self.max_seq_len})")
        if patches is not None:
            self._need_images()
            if prompt.is_floating_point():
                raise ValueError("image patches go with token ids, not with input embeddings")
            patches = torch.as_tensor(patches)
            self.images.check(prompt, patches)
        return Request(prompt, max_new_tokens, temperature, top_k or 0, top_p, self._stop_ids(stop_token_ids),
                       list(stop_strings or []), logprobs, tag=tag, patches=patches)

    def _events(self, requests: list[Request], seed: int | None) -> Iterator[StreamEvent]:
        greedy = requests[0].temperature == 0
        variant = SAMPLED_LOGPROBS if requests[0].logprobs is not None else (GREEDY if greedy else SAMPLED)
        if self.tp is not None and not greedy:
            # Every rank draws the same random numbers (the logits are identical), so the sampled tokens
            # agree without a collective in the step: one seed, rank 0's, for the whole call.
            seed = self.tp.shared_seed(seed)
        with self._lock:
            rows = bucket_for(min(len(requests), self.max_batch_size), self.max_batch_size)
            self.graphs.state(rows).clear()
            # Capture before the prefill fills the cache, and seed after it (its warm-up steps draw random
            # numbers), so a seed gives the same tokens whether or not this call had to capture.
            self.graphs.capture(rows, variant)
            if seed is not None:
                torch.manual_seed(seed)
            scheduler = self._scheduler(rows)
            for r in requests:
                scheduler.submit(r)
            yield from self._drive(scheduler)

    def _drive(self, scheduler: Scheduler) -> Iterator[StreamEvent]:
        started = time.perf_counter()
        stats = self.last_stats = {"batch": len(scheduler.waiting), "prompt_tokens": sum(map(len, scheduler.waiting)),
                                   "prefill_s": None, "decode_steps": 0, "decode_s": 0.0}
        decode_started = None
        while scheduler.busy():
            for ev in scheduler.step():
                yield StreamEvent(ev.request.tag, ev.token_id, ev.text, ev.finished, ev.logprob, ev.top_logprobs)
            if scheduler.decode_steps == 0:
                stats["prefill_s"] = time.perf_counter() - started
                decode_started = time.perf_counter()
            else:
                stats["decode_steps"] = scheduler.decode_steps
                stats["decode_s"] = time.perf_counter() - decode_started

    def _normalise_prompts(self, prompts, inputs_embeds) -> list[torch.Tensor]:
        """Token prompts as int64 CPU tensors [L], or the inputs_embeds [L, hidden] as given."""
        if inputs_embeds is not None:
            if prompts is not None:
                raise ValueError("give prompts or inputs_embeds, not both")
            embeds = [inputs_embeds] if torch.is_tensor(inputs_embeds) and inputs_embeds.dim() == 2 else list(inputs_embeds)
            for e in embeds:
                if e.dim() != 2 or e.shape[1] != self.config.hidden_size or e.shape[0] == 0:
                    raise ValueError(f"each inputs_embeds must be [len >= 1, {self.config.hidden_size}], "
                                     f"got {tuple(e.shape)}")
                if not e.is_floating_point():
                    raise ValueError(f"inputs_embeds must be floating point, got {e.dtype}")
            return embeds
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        return [self._token_prompt(p) for p in prompts]

    def _token_prompt(self, prompt) -> torch.Tensor:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass tokenizer= (a PersimmonTokenizer) to the "
                                 "engine, or give token ids")
            prompt = self.tokenizer.encode(prompt)
        t = torch.as_tensor(list(prompt) if not torch.is_tensor(prompt) else prompt, dtype=torch.long).flatten().cpu()
        if t.numel() == 0:
            raise ValueError("empty prompt: give at least one token")
        V = self.config.vocab_size
        if int(t.min()) < 0 or int(t.max()) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V}); got min {int(t.min())}, max {int(t.max())}")
        return t

    def _stop_ids(self, stop_token_ids) -> list[int]:
        if stop_token_ids is not None:
            return list(stop_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return [self.tokenizer.eos_token_id]
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        return [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
