"""The image front end of the engine, and loading a Fuyu directory for it.

Images and prompts go through the processor (transformers' FuyuProcessor token layout); the token ids are
embedded with the engine's own table, the patches projected by `vision_embed_tokens` into the placeholder
positions, and the engine gets the result as `inputs_embeds`: the prefill runs the fused kernels over the
patch embeddings like any prompt, and decoding (text tokens only) runs in the same captured graphs.
`Engine.from_pretrained` on a Fuyu directory calls `load_fuyu` and keeps the front end as `engine.images`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..loading import Weights, normalise_names
from ..quantized_sources import materializer, resolve_scheme
from ..weights import CheckpointError, open_checkpoint
from .config import FuyuConfig
from .names import decoder_sources, vision_names
from .processor import FuyuImageProcessor, FuyuProcessor, _preprocessor_settings
from .tokenizer import load_tokenizer


class ImageFrontEnd:
    """Turns (prompt, image) pairs into [len, hidden] input embeddings."""

    def __init__(self, config: FuyuConfig, vision_w: torch.Tensor, vision_b: torch.Tensor,
                 processor: FuyuProcessor | None):
        self.config, self.vision_w, self.vision_b, self.processor = config, vision_w, vision_b, processor

    @torch.no_grad()
    def embed_prompts(self, prompts, images, embed) -> list[torch.Tensor]:
        """`embed(tokens)` gives rows of the decoder's embedding table (the engine's Forward.embed)."""
        if self.processor is None:
            raise ValueError("image prompts need the model's tokenizer (tokenizer.json) for the processor")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt")
        return [self._embed_one(*self.processor.sample_ids(p, im), embed) for p, im in zip(prompts, images)]

    def _embed_one(self, ids: list[int], patches, embed) -> torch.Tensor:
        tokens = torch.tensor(ids, dtype=torch.long, device=self.vision_w.device)
        embeds = embed(tokens).to(self.vision_w.dtype)
        if patches is not None:
            # The projection runs in the model dtype, as in transformers (nn.Linear on dtype weights).
            x = torch.from_numpy(patches).to(self.vision_w.device, self.vision_w.dtype)
            embeds[tokens == self.config.image_token_id] = F.linear(x, self.vision_w, self.vision_b)
        return embeds


def load_fuyu(path: str, dtype, device, quantize=None) -> tuple[FuyuConfig, Weights, ImageFrontEnd]:
    """(config, decoder Weights, front end) of a Fuyu directory, read tensor by tensor onto `device`."""
    config = FuyuConfig.from_pretrained(path)
    text = config.text_config
    _, quantize_now = resolve_scheme(text, quantize)
    with contextlib.ExitStack() as stack:
        raw = open_checkpoint(path, stack)
        sources = normalise_names(decoder_sources(raw), text)
        weights = Weights.assemble(sources, text, None, materializer(device, dtype, quantize_now), where=path)
        names = vision_names(raw)
        if set(names) != {"weight", "bias"}:
            raise CheckpointError(f"{path}: no vision_embed_tokens weight and bias (not a Fuyu checkpoint?)")
        w, b = (raw[names[k]][:].to(device=device, dtype=dtype).contiguous() for k in ("weight", "bias"))
    if tuple(w.shape) != (text.hidden_size, config.patch_dim):
        raise CheckpointError(f"{path}: vision_embed_tokens.weight is {tuple(w.shape)}, expected "
                              f"{(text.hidden_size, config.patch_dim)}")
    tokenizer = load_tokenizer(path)
    processor = None if tokenizer is None else FuyuProcessor(FuyuImageProcessor(**_preprocessor_settings(path)),
                                                             tokenizer)
    return config, weights, ImageFrontEnd(config, w, b, processor)


def fuyu_from_module(model, processor: FuyuProcessor | None = None) -> tuple[FuyuConfig, Weights, ImageFrontEnd]:
    """The same from a loaded FuyuForCausalLM (ours or transformers'), parameters used in place."""
    config = model.config if isinstance(model.config, FuyuConfig) else FuyuConfig.from_dict(model.config.to_dict())
    state = {n: p.detach() for n, p in model.named_parameters()}
    weights = Weights.assemble(normalise_names(decoder_sources(state), config.text_config), config.text_config,
                               where=type(model).__name__)
    names = vision_names(state)
    return config, weights, ImageFrontEnd(config, state[names["weight"]], state[names["bias"]], processor)
