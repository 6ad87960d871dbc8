"""The module-level `generate` loop (KV cache, left-padded batches, stop tokens), on the shared sampler
(sampling.py); on a GPU where the kernels apply it hands token prompts to a cached Engine.
"""

from __future__ import annotations

import torch

from .sampling import row_parameters, sample, validate_sampling


class GenerationMixin:
    """`generate` for the module-level models, on whatever device they live."""

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 inputs_embeds: torch.Tensor | None = None, min_new_tokens: int = 0,
                 use_engine: bool | None = None, **unused) -> torch.Tensor:
        """Returns the prompt followed by the new tokens ([B, prompt + new]), as transformers does; with
        only `inputs_embeds`, just the new tokens. Sequences that finished are padded with `pad_token_id`.

        Defaults come from generation_config.json when the model directory has one, then from
        transformers' defaults (greedy, 20 new tokens; when sampling top_k=50, top_p=1.0, temperature=1.0).
        Positions follow the attention mask, so a left-padded batch generates what each row would alone.

        use_engine: run on the fast Engine (static cache, CUDA graphs, fused kernels). The default (None)
        does so for token prompts on a GPU where the kernels apply; sampled draws then come from the
        engine's in-graph sampler (same distribution, different random stream). The engine and its KV cache
        stay on the model (`model._engine`) for the next call; `del model._engine` frees them.
        """
        if not hasattr(self, "lm_head"):
            raise TypeError(f"{type(self).__name__} has no language-model head; use PersimmonForCausalLM")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("generate needs input_ids or inputs_embeds")
        bsz, prompt_len = (input_ids.shape if input_ids is not None else inputs_embeds.shape[:2])
        if prompt_len == 0:
            raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token)")
        s = _Settings(self, max_new_tokens, max_length, prompt_len, do_sample, temperature, top_k, top_p,
                      eos_token_id, pad_token_id)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if attention_mask is None:
            attention_mask = torch.ones(bsz, prompt_len, dtype=torch.long, device=self.device)
        if use_engine is None:
            use_engine = input_ids is not None and min_new_tokens == 0 and _engine_applies(self)
        if use_engine and s.max_new_tokens > 0:
            if input_ids is None or min_new_tokens:
                raise ValueError("the engine path takes token prompts and no min_new_tokens")
            return _generate_on_engine(self, input_ids, attention_mask, s, seed)
        generated = _generate_on_module(self, input_ids, inputs_embeds, attention_mask, s, min_new_tokens, generator)
        return generated if input_ids is None else torch.cat((input_ids, generated), dim=1)


class _Settings:
    """generate's arguments with the defaults filled in: the caller's, then generation_config.json, then
    transformers' (greedy, 20 new tokens; when sampling top_k=50, top_p=1.0, temperature=1.0); checked."""

    def __init__(self, model, max_new_tokens, max_length, prompt_len, do_sample, temperature, top_k, top_p,
                 eos_token_id, pad_token_id):
        gen, config = model.generation_config or {}, model.config
        self.do_sample = gen.get("do_sample", False) if do_sample is None else do_sample
        self.temperature = gen.get("temperature", 1.0) if temperature is None else temperature
        self.top_k = gen.get("top_k", 50) if top_k is None else top_k
        self.top_p = gen.get("top_p", 1.0) if top_p is None else top_p
        validate_sampling(self.temperature, self.top_k, self.top_p)
        self.greedy = not self.do_sample or self.temperature == 0
        if eos_token_id is None:
            eos_token_id = gen.get("eos_token_id", config.eos_token_id)
        self.eos = [] if eos_token_id is None else (
            list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
        if pad_token_id is None:
            pad_token_id = gen.get("pad_token_id", config.pad_token_id)
        self.pad = pad_token_id if pad_token_id is not None else (self.eos[0] if self.eos else 0)
        if max_new_tokens is None:
            max_new_tokens = (max_length - prompt_len) if max_length is not None else gen.get("max_new_tokens", 20)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = config.max_position_embeddings
        if prompt_len + max_new_tokens > limit and config.rope_type != "dynamic":
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({limit})")
        self.max_new_tokens = max_new_tokens


def _generate_on_module(model, input_ids, inputs_embeds, attention_mask, s: _Settings, min_new_tokens: int,
                        generator) -> torch.Tensor:
    """The new tokens [B, new] of the module's own forward with a growing KV cache."""
    bsz, device = attention_mask.shape[0], model.device
    eos = torch.tensor(s.eos, dtype=torch.long, device=device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds if input_ids is None else None,
                attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    params = row_parameters(bsz, 0.0 if s.greedy else s.temperature, s.top_k, s.top_p, device)
    new_tokens = []
    for step in range(s.max_new_tokens):
        next_logits = out.logits[:, -1, :]
        if step < min_new_tokens and eos.numel():
            next_logits = next_logits.float().index_fill(-1, eos, float("-inf"))
        token = sample(next_logits, *params, greedy=s.greedy, generator=generator)
        token = torch.where(finished, torch.full_like(token, s.pad), token)
        new_tokens.append(token)
        if eos.numel():
            finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == s.max_new_tokens - 1:
            break
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(bsz, 1)), dim=-1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(new_tokens, dim=1) if new_tokens else torch.empty(bsz, 0, dtype=torch.long, device=device)


def _generate_on_engine(model, input_ids, attention_mask, s: _Settings, seed) -> torch.Tensor:
    """The prompt and new tokens of the model's cached Engine; padding stripped before, added back after."""
    bsz = input_ids.shape[0]
    rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    engine = _engine_for(model, bsz, max(len(r) for r in rows) + s.max_new_tokens)
    result = engine.generate(rows, max_new_tokens=s.max_new_tokens, temperature=0.0 if s.greedy else s.temperature,
                             top_k=s.top_k or 0, top_p=s.top_p, seed=seed, stop_token_ids=s.eos)
    width = max(len(ids) for ids in result.token_ids)
    generated = torch.full((bsz, width), s.pad, dtype=torch.long)
    for r, ids in enumerate(result.token_ids):
        generated[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return torch.cat((input_ids, generated.to(input_ids.device)), dim=1)


def _engine_applies(model) -> bool:
    from . import ops

    weight = next(model.parameters())
    return (ops.use_cuda_kernels(weight) and weight.dtype in (torch.float16, torch.bfloat16)
            and ops.kernels_support(model.config.head_dim))


def _engine_for(model, batch: int, seq_len: int):
    """The model's cached Engine, rebuilt when a call needs a larger batch or sequence length."""
    from .engine import Engine

    engine = getattr(model, "_engine", None)
    if engine is None or engine.max_batch_size < batch or engine.max_seq_len < seq_len:
        if engine is not None:
            model._engine = engine = None           # free the old cache before allocating the new one
        engine = Engine(model, model.config, max_batch_size=batch, max_seq_len=seq_len)
        model._engine = engine
    return engine
