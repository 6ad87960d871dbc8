"""`FuyuModel` and `FuyuForCausalLM`: transformers' Fuyu on our Persimmon decoder (model.py), with the same
module and parameter names, forward arguments and outputs, so its checkpoints load and its tests carry over.

The vision side is one linear layer: each 30x30x3 patch becomes an embedding, written over the image
placeholder tokens (`config.image_token_id`) of the text embeddings, in order.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..generation import GenerationMixin
from ..model import CausalLMOutputWithPast, PersimmonModel, PersimmonPreTrainedModel, causal_lm_loss
from ..weights import CheckpointError, check_tensors, load_state_dict, read_generation_config
from .config import FuyuConfig
from .names import checkpoint_name, module_name


class FuyuModel(nn.Module):
    """The decoder (`language_model`) and the patch projection (`vision_embed_tokens`), no head."""

    def __init__(self, config: FuyuConfig):
        super().__init__()
        self.config = config
        self.language_model = PersimmonModel(config.text_config)
        self.vision_embed_tokens = nn.Linear(config.patch_dim, config.text_config.hidden_size)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [..., hidden] of flattened patches [..., patch_dim]."""
        return self.vision_embed_tokens(pixel_values)

    def merge_image_patches(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                            image_patches) -> torch.Tensor:
        """`inputs_embeds` with the placeholder positions of `input_ids` replaced, in order, by the
        embeddings of `image_patches` ([N, D], [B, N, D] or a list of [N_i, D])."""
        if isinstance(image_patches, (list, tuple)):
            image_patches = torch.cat([p.reshape(-1, p.shape[-1]) for p in image_patches])
        patches = image_patches.to(self.vision_embed_tokens.weight.device, self.vision_embed_tokens.weight.dtype)
        features = self.get_image_features(patches).reshape(-1, inputs_embeds.shape[-1])
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"Image features and image tokens do not match, tokens: {int(mask.sum())}, "
                             f"features: {features.shape[0]}")
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.to(inputs_embeds.dtype))

    def forward(self, input_ids=None, image_patches=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, output_hidden_states=False,
                output_attentions=False, cache_position=None, return_dict=True, **unused):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed_tokens(input_ids)
        if image_patches is not None:
            if input_ids is None:
                raise ValueError("image_patches need input_ids to find the image placeholder tokens")
            inputs_embeds = self.merge_image_patches(input_ids, inputs_embeds, image_patches)
        return self.language_model(None, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                                   output_hidden_states, output_attentions, cache_position)


class FuyuForCausalLM(PersimmonPreTrainedModel):
    config_class = FuyuConfig

    def __init__(self, config: FuyuConfig):
        super().__init__(config)
        self.model = FuyuModel(config)
        self.vocab_size = config.text_config.vocab_size
        self.lm_head = nn.Linear(config.text_config.hidden_size, self.vocab_size, bias=False)

    @property
    def base_model(self) -> PersimmonModel:
        return self.model.language_model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def forward(self, input_ids=None, image_patches=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, labels=None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states=False, output_attentions=False,
                cache_position=None, return_dict=True, **unused) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids, image_patches, attention_mask, position_ids, past_key_values, inputs_embeds,
                             use_cache, output_hidden_states, output_attentions, cache_position)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = causal_lm_loss(logits, labels, self.vocab_size) if labels is not None else None
        return CausalLMOutputWithPast(loss, logits, outputs.past_key_values, outputs.hidden_states,
                                      outputs.attentions)

    @torch.no_grad()
    def generate(self, input_ids=None, image_patches=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """transformers' generate for Fuyu: the prompt (with its image placeholders) followed by the new
        tokens. The image embeddings enter at the prefill; new tokens are ordinary text tokens."""
        kwargs.setdefault("use_engine", False)            # the engine front end is fuyu.engine.FuyuEngine
        if image_patches is None or input_ids is None:
            return GenerationMixin.generate(self, input_ids, attention_mask, **kwargs)
        embeds = self.model.merge_image_patches(input_ids, self.get_input_embeddings()(input_ids), image_patches)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new = GenerationMixin.generate(self, None, attention_mask, inputs_embeds=embeds, **kwargs)
        return torch.cat((input_ids, new.to(input_ids.device)), dim=1)

    # -- loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", device=None,
                        torch_dtype=None, **unused) -> "FuyuForCausalLM":
        """Load a Fuyu HF-format directory (the Hub's transformers-4 names or transformers 5's)."""
        path = os.fspath(path)
        config = FuyuConfig.from_pretrained(path)
        state = {module_name(k): v for k, v in load_state_dict(path).items()}
        target = _resolve_dtype(torch_dtype if torch_dtype is not None else dtype, config, state)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        check_tensors(expected, state, ignore=("rotary_emb.inv_freq",), where=path)
        device = torch.device(device) if device is not None else torch.device("cpu")
        model.load_state_dict({k: state[k].to(device=device, dtype=target) for k in expected}, strict=False,
                              assign=True)
        model.tie_weights()
        model.generation_config = read_generation_config(path)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json and model.safetensors, named as transformers writes Fuyu checkpoints."""
        from ..weights import atomic_files, save_state_dict

        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {checkpoint_name(k): v for k, v in state.items()}
        with atomic_files(os.fspath(directory)) as tmp:
            save_state_dict(state, tmp)
            self.config.extra["architectures"] = [type(self).__name__]
            self.config.extra["dtype"] = str(self.dtype).replace("torch.", "")
            self.config.save_pretrained(tmp)


def _resolve_dtype(dtype, config: FuyuConfig, state: dict) -> torch.dtype:
    if dtype is None or dtype == "auto":
        name = config.extra.get("dtype") or config.extra.get("torch_dtype")
        if name:
            return getattr(torch, str(name).replace("torch.", ""))
        return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CheckpointError(f"unsupported dtype {dtype!r}: use float16, bfloat16, float32 or 'auto'")
    return dtype
