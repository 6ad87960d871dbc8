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
        gen = self.generation_config or {}
        do_sample = gen.get("do_sample", False) if do_sample is None else do_sample
        temperature = gen.get("temperature", 1.0) if temperature is None else temperature
        top_k = gen.get("top_k", 50) if top_k is None else top_k
        top_p = gen.get("top_p", 1.0) if top_p is None else top_p
        validate_sampling(temperature, top_k, top_p)
        if eos_token_id is None:
            eos_token_id = gen.get("eos_token_id", self.config.eos_token_id)
        eos = torch.tensor([] if eos_token_id is None else
                           (list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]),
                           dtype=torch.long, device=self.device)
        if pad_token_id is None:
            pad_token_id = gen.get("pad_token_id", self.config.pad_token_id)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos.numel() else 0
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)

        if input_ids is None and inputs_embeds is None:
            raise ValueError("generate needs input_ids or inputs_embeds")
        prompt = input_ids if input_ids is not None else None
        bsz, prompt_len = (prompt.shape if prompt is not None else inputs_embeds.shape[:2])
        if prompt_len == 0:
            raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token)")
        if max_new_tokens is None:
            max_new_tokens = (max_length - prompt_len) if max_length is not None else gen.get("max_new_tokens", 20)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = self.config.max_position_embeddings
        if prompt_len + max_new_tokens > limit and self.config.rope_type != "dynamic":
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({limit})")

        if attention_mask is None:
            attention_mask = torch.ones(bsz, prompt_len, dtype=torch.long, device=self.device)
        if use_engine is None:
            use_engine = prompt is not None and min_new_tokens == 0 and _engine_applies(self)
        if use_engine and max_new_tokens > 0:
            if prompt is None or min_new_tokens:
                raise ValueError("the engine path takes token prompts and no min_new_tokens")
            rows = [row[mask.bool()].tolist() for row, mask in zip(prompt, attention_mask)]
            engine = _engine_for(self, bsz, max(len(r) for r in rows) + max_new_tokens)
            result = engine.generate(rows, max_new_tokens=max_new_tokens,
                                     temperature=temperature if do_sample else 0.0, top_k=top_k or 0,
                                     top_p=top_p, seed=seed, stop_token_ids=eos.tolist())
            width = max(len(ids) for ids in result.token_ids)
            generated = torch.full((bsz, width), pad_token_id, dtype=torch.long)
            for r, ids in enumerate(result.token_ids):
                generated[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            return torch.cat((prompt, generated.to(prompt.device)), dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self(input_ids=prompt, inputs_embeds=inputs_embeds if prompt is None else None,
                   attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        next_logits = out.logits[:, -1, :]
        finished = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        params = row_parameters(bsz, temperature if do_sample else 0.0, top_k, top_p, self.device)
        new_tokens = []
        for step in range(max_new_tokens):
            if step < min_new_tokens and eos.numel():
                next_logits = next_logits.float().index_fill(-1, eos, float("-inf"))
            token = sample(next_logits, *params, greedy=not do_sample or temperature == 0, generator=generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            if eos.numel():
                finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(bsz, 1)), dim=-1)
            position_ids = position_ids[:, -1:] + 1
            out = self(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_logits = out.logits[:, -1, :]
        generated = torch.stack(new_tokens, dim=1) if new_tokens else torch.empty(bsz, 0, dtype=torch.long,
                                                                                  device=self.device)
        return generated if prompt is None else torch.cat((prompt, generated), dim=1)


def _engine_applies(model) -> bool:
    from . import ops

    weight = next(model.parameters())
    return (ops.use_cuda_kernels(weight) and weight.dtype in (torch.float16, torch.bfloat16)
            and ops.attention_supports(model.config.head_dim))


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
