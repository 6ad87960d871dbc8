"""The image front end of the engine, and loading a Fuyu directory for it.

An image and a prompt go through the processor (transformers' FuyuProcessor token layout) on the host:
token ids, and one patch per image placeholder (`prompt`). A request carrying patches is embedded when it
takes a scheduler row (`embed`): the token ids with the engine's own table, the patches projected by
`vision_embed_tokens` into the placeholder positions. The prefill runs the fused kernels over these
embeddings like any prompt, and decoding (text tokens only) runs in the same captured graphs.
`Engine.from_pretrained` on a Fuyu directory calls `load_fuyu` and keeps the front end as `engine.images`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..loading import Weights, normalise_names
from ..quantized_sources import materializer, resolve_scheme
from ..transfer import upload
from ..weights import CheckpointError, open_checkpoint
from .config import FuyuConfig
from .names import decoder_sources, vision_names
from .processor import FuyuImageProcessor, FuyuProcessor, _preprocessor_settings
from .tokenizer import load_tokenizer


class ImageFrontEnd:
    """Turns (prompt, image) pairs into token ids with image patches (host), and those into [len, hidden]
    input embeddings (device)."""

    def __init__(self, config: FuyuConfig, vision_w: torch.Tensor, vision_b: torch.Tensor,
                 processor: FuyuProcessor | None):
        self.config, self.vision_w, self.vision_b, self.processor = config, vision_w, vision_b, processor

    def prompt(self, text: str, image=None) -> tuple[list[int], torch.Tensor | None]:
        """Token ids (the processor's layout) and the image's patches [P, patch_dim] float32 (host), one per
        image placeholder; CPU work only. `image`: a path, encoded bytes, a PIL image or an array."""
        if self.processor is None:
            raise ValueError("image prompts need the model's tokenizer (tokenizer.json) for the processor")
        ids, patches = self.processor.sample_ids(text, image)
        return ids, None if patches is None else torch.from_numpy(patches)

    def check(self, ids: torch.Tensor, patches: torch.Tensor) -> None:
        """Raises ValueError unless `patches` fit the image placeholders of `ids` (token ids [L])."""
        placeholders = int((ids == self.config.image_token_id).sum())
        if patches.dim() != 2 or patches.shape[1] != self.config.patch_dim or patches.shape[0] != placeholders:
            raise ValueError(f"image patches must be [{placeholders} placeholders, {self.config.patch_dim}], got "
                             f"{tuple(patches.shape)}")

    @torch.no_grad()
    def embed(self, ids, patches: torch.Tensor | None, embed) -> torch.Tensor:
        """[L, hidden] input embeddings on the model's device: rows of the decoder's table (`embed(tokens)`,
        the engine's Forward.embed) with the projected patches in the placeholders' places, in order. Queued
        without waiting for the GPU (nothing is read back), so it may run between decode steps."""
        device, dtype = self.vision_w.device, self.vision_w.dtype
        tokens = upload(ids, torch.long, device)
        embeds = embed(tokens).to(dtype)
        if patches is None:
            return embeds
        # The projection runs in the model dtype, as in transformers (nn.Linear on dtype weights).
        projected = F.linear(upload(patches, torch.float32, device).to(dtype), self.vision_w, self.vision_b)
        image = tokens == self.config.image_token_id
        which = (image.cumsum(0) - 1).clamp_min(0)            # placeholder i takes patch i
        return torch.where(image[:, None], projected[which], embeds)


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
