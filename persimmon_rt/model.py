"""Persimmon in plain PyTorch, with transformers' class, argument and parameter names.

These modules are the oracle: they reproduce transformers' Persimmon op for op (including where it rounds
to the model dtype), support autograd and gradient checkpointing for fine-tuning, and run on any device.
The fast CUDA path lives in the engine; it is checked against these classes.

Fine-tuning: use bf16 or fp32. fp16 fine-tuning of Persimmon is known to produce NaNs (relu² activations
exceed the fp16 range); fp16 is for inference.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import DynamicCache
from .config import PersimmonConfig
from .quantization import scheme_of
from .generation import GenerationMixin
from .reference import rope_inv_freq
from .weights import (GENERATION_CONFIG, CheckpointError, atomic_files, check_tensors, find_non_finite,
                      load_state_dict, read_generation_config, save_state_dict, weight_files)


# ------------------------------------------------------------------------------------------------- outputs
class ModelOutput:
    """Attribute access plus tuple-style indexing over the fields that are not None (as transformers)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutputWithPast(CausalLMOutputWithPast):
    pass


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# ------------------------------------------------------------------------------------------------- layers
class PersimmonRotaryEmbedding(nn.Module):
    """cos/sin of positions * inv_freq, computed in fp32 and rounded to the activation dtype (as transformers)."""

    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        seq_len = int(position_ids.max()) + 1 if c.rope_type == "dynamic" else None
        inv_freq = rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_type,
                                 (c.rope_scaling or {}).get("factor", 1.0), c.max_position_embeddings,
                                 seq_len, device=x.device)
        freqs = position_ids.float()[..., None] * inv_freq          # [B, S, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PersimmonAttention(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rotary_ndims = config.rotary_dim
        self.scaling = self.head_dim ** -0.5
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_mask, position_embeddings, past_key_values=None,
                output_attentions=False):
        bsz, q_len, _ = hidden_states.shape
        # Head-major fused layout: output row h*3*D + t*D + d holds q (t=0), k (t=1), v (t=2) of head h.
        qkv = self.query_key_value(hidden_states).view(bsz, q_len, self.num_heads, 3, self.head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if self.qk_layernorm:
            q = self.q_layernorm(q)
            k = self.k_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, S, D]

        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        r = self.rotary_ndims
        q_rot, k_rot = q[..., :r], k[..., :r]
        q = torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q[..., r:]), dim=-1)
        k = torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k[..., r:]), dim=-1)

        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=self.config.attention_dropout, training=self.training)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, q_len, -1)
        return self.dense(out), (probs if output_attentions else None)


class PersimmonMLP(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(torch.square(torch.relu(self.dense_h_to_4h(x))))


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PersimmonAttention(config, layer_idx)
        self.mlp = PersimmonMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attention_mask, position_embeddings, past_key_values=None,
                output_attentions=False):
        attn_out, attn_weights = self.self_attn(self.input_layernorm(hidden_states), attention_mask,
                                                position_embeddings, past_key_values, output_attentions)
        hidden_states = hidden_states + attn_out
        mlp_out = self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return mlp_out + hidden_states, attn_weights


# ---------------------------------------------------------------------------------------------- base class
class PersimmonPreTrainedModel(nn.Module, GenerationMixin):
    config_class = PersimmonConfig
    base_model_prefix = "model"
    # Heads a checkpoint of another class may lack; they are freshly initialised (with a warning).
    _head_keys: tuple[str, ...] = ()

    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config
        self.generation_config: dict[str, Any] = {}
        self.gradient_checkpointing = False

    # -- properties transformers users reach for
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        skip = {"model.embed_tokens.weight", "embed_tokens.weight"} if exclude_embeddings else set()
        return sum(p.numel() for n, p in self.named_parameters() if n not in skip)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True
        for module in self.modules():
            if isinstance(module, PersimmonModel):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, (PersimmonModel, PersimmonPreTrainedModel)):
                module.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    @property
    def base_model(self) -> "PersimmonModel":
        return self if isinstance(self, PersimmonModel) else getattr(self, self.base_model_prefix)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- loading and saving
    @classmethod
    def from_config(cls, config: PersimmonConfig, dtype: torch.dtype | None = None, device=None):
        """A randomly initialised model (see init_weights), on `device` (default: torch's current default)."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = cls(config)
        model.init_weights()
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", device=None,
                        config: PersimmonConfig | None = None, check_finite: bool = False,
                        torch_dtype=None, quantize: str | None = None, **config_overrides):
        """Load an HF-format directory: config.json plus safetensors (single or sharded) or pytorch_model*.bin.

        dtype: "auto" keeps the checkpoint's dtype; a torch dtype (or its name) converts while loading.
        device: where the parameters live ("cpu", "cuda", ...); tensors move one at a time.
        check_finite: scan every tensor for NaN/Inf and refuse the checkpoint if any has them.
        quantize: "int8" loads onto the CPU and moves the model to `device` with every projection and lm_head
        quantized on arrival (quantized_modules.py; inference only).
        """
        path = os.fspath(path)
        config = config or PersimmonConfig.from_pretrained(path, **config_overrides)
        if quantize is not None or scheme_of(config) is not None:
            return _load_quantized(cls, path, config, dtype, device, quantize, check_finite, torch_dtype)
        dtype = torch_dtype if torch_dtype is not None else dtype
        file_state = load_state_dict(path)
        file_names = _checkpoint_names(cls, file_state)            # our name -> the name in the file
        state = {ours: file_state[theirs] for ours, theirs in file_names.items()}
        if check_finite:
            bad = find_non_finite(state)
            if bad:
                raise CheckpointError(f"non-finite values (NaN/Inf) in: {', '.join(bad)}")
        target_dtype = _resolve_dtype(dtype, config, state)

        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied = config.tie_word_embeddings and "lm_head.weight" in expected
        if tied:
            expected.pop("lm_head.weight")
            state.pop("lm_head.weight", None)
        missing_heads = [k for k in cls._head_keys if k in expected and k not in state]
        for k in missing_heads:
            expected.pop(k)
        ignore = ("rotary_emb.inv_freq",) + (("lm_head.",) if "lm_head.weight" not in expected and not tied else ())
        check_tensors(expected, state, ignore=ignore, where=path)

        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and all(f.endswith(".safetensors") for f in weight_files(path)):
            # Streamed from disk into GPU memory: host memory stays at two 64 MiB buffers (device_loader).
            from .device_loader import load_state_dict as load_to_device

            raw = load_to_device(path, device, target_dtype, names={file_names[k] for k in expected})
            loaded = {k: raw[file_names[k]] for k in expected}
        else:
            loaded = {k: state[k].to(device=device, dtype=target_dtype) for k in expected}
        model.load_state_dict(loaded, strict=False, assign=True)
        if missing_heads:
            warnings.warn(f"{cls.__name__}: {', '.join(missing_heads)} not in the checkpoint; initialised randomly "
                          "(train them before use)", stacklevel=2)
            for head in dict.fromkeys(k.rsplit(".", 1)[0] for k in missing_heads):
                module = model.get_submodule(head).to_empty(device=device).to(target_dtype)
                with torch.no_grad():
                    module.weight.normal_(0.0, config.initializer_range)
                    if module.bias is not None:
                        module.bias.zero_()
        model.tie_weights()
        model.config.torch_dtype = str(target_dtype).replace("torch.", "")
        model.generation_config = read_generation_config(path)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
        """Write config.json and safetensors weights (sharded when large) into `directory`.

        Files are written to a temporary directory first and moved in at the end, so an interrupted save
        never leaves a half-written weight file behind.
        """
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config = PersimmonConfig.from_dict(self.config.to_dict())
        config.torch_dtype = str(self.dtype).replace("torch.", "")
        config.extra["architectures"] = [type(self).__name__]
        with atomic_files(os.fspath(directory)) as tmp:
            kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
            save_state_dict(state, tmp, **kwargs)
            config.save_pretrained(tmp)
            if self.generation_config:
                with open(os.path.join(tmp, GENERATION_CONFIG), "w", encoding="utf-8") as fh:
                    json.dump(self.generation_config, fh, indent=2, sort_keys=True)


def _load_quantized(cls, path, config, dtype, device, quantize, check_finite, torch_dtype):
    from .quantization import check_scheme
    from .quantized_modules import quantize_module

    check_scheme(quantize)
    if scheme_of(config) is not None:
        raise CheckpointError(f"{path} is saved quantized ({scheme_of(config)}); the module path loads full-precision "
                              "checkpoints only: use persimmon_rt.engine.Engine.from_pretrained for this one")
    model = cls.from_pretrained(path, dtype=dtype, device="cpu", config=config, check_finite=check_finite,
                                torch_dtype=torch_dtype)
    return quantize_module(model, quantize, torch.device(device) if device is not None else torch.device("cpu"))


def _checkpoint_names(cls, state: dict) -> dict[str, str]:
    """Our parameter name -> the checkpoint's, letting a base model load a head checkpoint (strip
    "model.") and a head model load a base one (add it)."""
    has_prefix = any(k.startswith("model.") for k in state)
    if cls is PersimmonModel and has_prefix:
        return {k[len("model."):]: k for k in state if k.startswith("model.")}
    if cls is not PersimmonModel and not has_prefix:
        return {f"model.{k}": k for k in state}
    return {k: k for k in state}


def _resolve_dtype(dtype, config: PersimmonConfig, state: dict[str, torch.Tensor]) -> torch.dtype:
    if dtype is None or dtype == "auto":
        if config.dtype is not None:
            return config.dtype
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        return floats[0] if floats else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {dtype!r}: use torch.float16, torch.bfloat16, torch.float32 or 'auto'")
    return dtype


# -------------------------------------------------------------------------------------------------- models
class PersimmonModel(PersimmonPreTrainedModel):
    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = PersimmonRotaryEmbedding(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=False, output_attentions=False,
                cache_position=None, return_dict=True, **unused):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], "
                             f"got {tuple(inputs_embeds.shape)}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache()
        elif isinstance(past_key_values, (tuple, list)):
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        bsz, q_len = inputs_embeds.shape[:2]
        if past_len + q_len > self.config.max_position_embeddings and self.config.rope_type != "dynamic":
            warnings.warn(f"sequence length {past_len + q_len} exceeds max_position_embeddings "
                          f"{self.config.max_position_embeddings}; quality is not guaranteed", stacklevel=2)
        if cache_position is None:
            cache_position = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        mask = _causal_mask(attention_mask, cache_position, past_len + q_len, bsz, inputs_embeds.dtype,
                            inputs_embeds.device)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            if self.gradient_checkpointing and self.training:
                hidden_states, attn = checkpoint(layer, hidden_states, mask, position_embeddings, None,
                                                 output_attentions, use_reentrant=False)
            else:
                hidden_states, attn = layer(hidden_states, mask, position_embeddings, past_key_values,
                                            output_attentions)
            if all_attn is not None:
                all_attn.append(attn)
        hidden_states = self.final_layernorm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
        )


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)].unique()[:5].tolist()
        raise ValueError(f"token id(s) {bad} outside the vocabulary [0, {vocab_size})")


def _causal_mask(attention_mask, cache_position, kv_len, bsz, dtype, device):
    """Additive [B, 1, Q, KV] mask: key j visible to query i iff j <= cache_position[i] and not padding.

    Masked scores get the dtype's most negative value rather than -inf, so a row with no visible key (a
    left-padding query) softmaxes to uniform weights instead of NaN, as in transformers.
    """
    kv_idx = torch.arange(kv_len, device=device)
    allowed = kv_idx[None, :] <= cache_position[:, None]              # [Q, KV]
    allowed = allowed[None, None].expand(bsz, 1, -1, -1)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != bsz or attention_mask.shape[1] < kv_len:
            raise ValueError(f"attention_mask must be [batch={bsz}, >= {kv_len}], got {tuple(attention_mask.shape)}")
        allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))


class PersimmonForCausalLM(PersimmonPreTrainedModel):
    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False,
                output_attentions=False, logits_to_keep: int | torch.Tensor = 0, cache_position=None,
                return_dict=True, **unused) -> CausalLMOutputWithPast:
        """Logits stay in the model dtype, as in transformers ("no upscaling to float was ever done for
        Persimmon"); the loss is computed on fp32 logits."""
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_hidden_states, output_attentions, cache_position)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss, logits, outputs.past_key_values, outputs.hidden_states,
                                      outputs.attentions)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of position t predicting labels[t+1] (labels == -100 ignored), on fp32 logits."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), shifted.reshape(-1), ignore_index=ignore_index)


class PersimmonForSequenceClassification(PersimmonPreTrainedModel):
    _head_keys = ("score.weight",)

    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PersimmonModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False,
                output_attentions=False, return_dict=True, **unused) -> SequenceClassifierOutputWithPast:
        """Scores the rightmost non-pad token of each row (works for left and right padding)."""
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_hidden_states, output_attentions)
        logits = self.score(outputs.last_hidden_state)
        bsz = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and bsz != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            if input_ids is None and pad is not None:
                warnings.warn(f"{type(self).__name__} cannot detect padding in inputs_embeds; using the last "
                              "position of each row", stacklevel=2)
            last = torch.full((bsz,), -1, device=logits.device, dtype=torch.long)
        else:
            non_pad = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        pooled = logits[torch.arange(bsz, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(pooled, labels.to(pooled.device), self.config)
        return SequenceClassifierOutputWithPast(loss, pooled, outputs.past_key_values, outputs.hidden_states,
                                                outputs.attentions)


def sequence_classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config: PersimmonConfig):
    """MSE for one label (regression), cross-entropy for integer labels, BCE-with-logits otherwise; the
    inferred problem_type is stored on the config, as transformers does."""
    n = config.num_labels
    if config.problem_type is None:
        if n == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(pooled, labels)


class PersimmonForTokenClassification(PersimmonPreTrainedModel):
    _head_keys = ("score.weight", "score.bias")

    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PersimmonModel(config)
        if config.classifier_dropout is not None:
            p = config.classifier_dropout
        elif config.hidden_dropout is not None:
            p = config.hidden_dropout
        else:
            p = 0.1
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False,
                output_attentions=False, return_dict=True, **unused) -> TokenClassifierOutput:
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_hidden_states, output_attentions)
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.to(logits.device).view(-1),
                                   ignore_index=-100)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
