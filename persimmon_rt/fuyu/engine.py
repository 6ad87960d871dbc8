"""`FuyuEngine`: the Persimmon engine with an image front end.

Images and prompts go through the processor (the same token layout as transformers' FuyuProcessor); the
token ids are embedded with the engine's own table, the patches projected by `vision_embed_tokens` into
the placeholder positions, and the result goes to `Engine.generate` as `inputs_embeds`: the prefill runs
the fused kernels over the patch embeddings like any prompt, and decoding (text tokens only) runs in the
same captured graphs. Nothing in the engine itself knows about images.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from ..engine import SUPPORTED_DTYPES, Engine
from ..loading import Weights, normalise_names
from ..quantized_sources import materializer, resolve_scheme
from ..weights import CheckpointError, open_checkpoint, read_generation_config
from .config import FuyuConfig
from .names import decoder_sources, vision_names
from .processor import FuyuImageProcessor, FuyuProcessor, _preprocessor_settings
from .tokenizer import load_tokenizer


class FuyuEngine(Engine):
    """`generate(prompts, images=[...])`: one image per prompt (None for a text-only prompt)."""

    def __init__(self, config: FuyuConfig, weights: Weights, vision: tuple[torch.Tensor, torch.Tensor],
                 processor: FuyuProcessor | None, model=None, **kwargs):
        if kwargs.get("tp") is not None:
            raise ValueError("Fuyu does not support tensor parallelism yet; run it on one GPU")
        super().__init__(model, config.text_config, weights=weights,
                         tokenizer=processor.tokenizer if processor else None, **kwargs)
        self.fuyu_config, self.processor = config, processor
        self.vision_w, self.vision_b = vision

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float16, device=None, max_batch_size: int = 1,
                        max_seq_len: int | None = None, tp=None, quantize: str | None = None, **kwargs):
        """A Fuyu HF-format directory (the Hub's names or transformers 5's) onto one device."""
        if tp is not None and tp.world_size > 1:
            raise ValueError("Fuyu does not support tensor parallelism yet; run it on one GPU")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu" and dtype == torch.float16:
            dtype = torch.float32                     # the CPU reference path computes in fp32 anyway
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; use torch.float16, torch.bfloat16 or torch.float32")
        path = os.fspath(path)
        config = FuyuConfig.from_pretrained(path)
        weights, vision = _load(path, config, dtype, device, quantize)
        return cls(config, weights, vision, _processor(path), max_batch_size=max_batch_size,
                   max_seq_len=max_seq_len, generation_config=read_generation_config(path), **kwargs)

    @classmethod
    def from_module(cls, model, processor: FuyuProcessor | None = None, **kwargs) -> "FuyuEngine":
        """Wrap a loaded FuyuForCausalLM (ours or transformers'); its parameters are used in place."""
        config = model.config if isinstance(model.config, FuyuConfig) else FuyuConfig.from_dict(model.config.to_dict())
        state = {n: p.detach() for n, p in model.named_parameters()}
        sources = normalise_names(decoder_sources(state), config.text_config)
        weights = Weights.assemble(sources, config.text_config, where=type(model).__name__)
        names = vision_names(state)
        return cls(config, weights, (state[names["weight"]], state[names["bias"]]), processor, model=model, **kwargs)

    def generate(self, prompts, images=None, **kwargs):
        """Engine.generate, with `images` (paths, PIL images or uint8 arrays) one per prompt."""
        if images is None:
            return super().generate(prompts, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("give images with text prompts, not with inputs_embeds")
        return super().generate(None, inputs_embeds=self.embed_prompts(prompts, images), **kwargs)

    @torch.no_grad()
    def embed_prompts(self, prompts, images) -> list[torch.Tensor]:
        """[len, hidden] input embeddings of each (prompt, image) pair."""
        if self.processor is None:
            raise ValueError("image prompts need the model's tokenizer (tokenizer.json) for the processor")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt")
        return [self._embed_one(*self.processor.sample_ids(p, im)) for p, im in zip(prompts, images)]

    def _embed_one(self, ids: list[int], patches) -> torch.Tensor:
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = self.forward.embed(tokens).to(self.dtype)
        if patches is not None:
            # The projection runs in the model dtype, as in transformers (nn.Linear on dtype weights).
            x = torch.from_numpy(patches).to(self.device, self.dtype)
            projected = F.linear(x, self.vision_w, self.vision_b)
            embeds[tokens == self.fuyu_config.image_token_id] = projected
        return embeds


def _load(path: str, config: FuyuConfig, dtype, device, quantize):
    """(decoder Weights, (patch projection weight, bias)) read tensor by tensor onto `device`."""
    text = config.text_config
    _, quantize_now = resolve_scheme(text, quantize)
    with contextlib.ExitStack() as stack:
        raw = open_checkpoint(path, stack)
        sources = normalise_names(decoder_sources(raw), text)
        weights = Weights.assemble(sources, text, None, materializer(device, dtype, quantize_now), where=path)
        names = vision_names(raw)
        if set(names) != {"weight", "bias"}:
            raise CheckpointError(f"{path}: no vision_embed_tokens weight and bias (not a Fuyu checkpoint?)")
        vision = tuple(raw[names[k]][:].to(device=device, dtype=dtype).contiguous() for k in ("weight", "bias"))
    if vision[0].shape != (text.hidden_size, config.patch_dim):
        raise CheckpointError(f"{path}: vision_embed_tokens.weight is {tuple(vision[0].shape)}, expected "
                              f"{(text.hidden_size, config.patch_dim)}")
    return weights, vision


def _processor(path: str) -> FuyuProcessor | None:
    tokenizer = load_tokenizer(path)
    return None if tokenizer is None else FuyuProcessor(FuyuImageProcessor(**_preprocessor_settings(path)), tokenizer)
