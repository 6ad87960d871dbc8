"""Tensor names of a Fuyu checkpoint.

Files on the Hub (adept/fuyu-8b) use the names of transformers 4: `language_model.model.*` for the decoder,
`language_model.lm_head.weight`, `vision_embed_tokens.*`. transformers 5 renames them on loading to
`model.language_model.*`, `lm_head.weight`, `model.vision_embed_tokens.*` (its module names, and ours);
both spellings load. `decoder_sources` gives the engine the decoder under its usual "model."-prefixed
names, and `vision_names` the patch projection.
"""

from __future__ import annotations

from collections.abc import Mapping

# (prefix in a file, prefix in our modules), the first that matches wins.
_RENAMES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_embed_tokens.", "model.vision_embed_tokens."),
)


def module_name(name: str) -> str:
    """A checkpoint tensor name as FuyuForCausalLM names it (transformers 5 names pass through)."""
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def checkpoint_name(name: str) -> str:
    """Our module name as transformers writes it into a file (the transformers-4 spelling)."""
    for old, new in _RENAMES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def decoder_sources(state: Mapping) -> dict:
    """The decoder's tensors under Persimmon's HF names ("model.layers.0...", "lm_head.weight")."""
    out = {}
    for name, entry in state.items():
        ours = module_name(name)
        if ours.startswith("model.language_model."):
            out["model." + ours[len("model.language_model."):]] = entry
        elif ours == "lm_head.weight":
            out[ours] = entry
    return out


def vision_names(state: Mapping) -> dict[str, str]:
    """'weight' / 'bias' of the patch projection -> the name in `state`."""
    return {module_name(n).rsplit(".", 1)[1]: n for n in state
            if module_name(n).startswith("model.vision_embed_tokens.")}
