"""The engine's weights: one `Weights` assembled from one source of tensors by HF name.

Every way the engine gets its tensors is a *source*, a mapping from HF name (always with the "model."
prefix; "lm_head.weight" stands for the embedding when the two are tied) to a tensor or a lazy
safetensors slice:

    module_sources(model)          parameters of a loaded module, referenced in place
    checkpoint sources             an HF-format directory: memory-mapped .bin tensors or lazy safetensors
                                   slices (a tensor-parallel rank reads only its part), or, for a whole
                                   model onto a GPU, streamed block by block (device_loader)

`Weights.assemble(sources, config, shard)` checks every shape against the config, takes each rank's part
(sharding.py) when `shard` is given, and materialises the result; so single-device and tensor-parallel
loading share one path and one set of checks. Weight-only quantization (quantization.py) is one more
kind of source (quantized_sources.py): projection, lm_head and embedding fields then hold a
`QuantizedWeight` (int8 + per-row scales) instead of a tensor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace

import torch

from .config import PersimmonConfig
from .quantization import QuantizedWeight, check_scheme, quantize_weight
from .quantized_sources import assemble_streamed, check_no_stray_scales, materializer, pair_quantized, \
    resolve_scheme, streaming_converter, wanted_names
from .sharding import check_tp_config, take_shard
from .weights import CheckpointError, check_tensors, expected_shapes, open_checkpoint, weight_files


@dataclass(kw_only=True)
class LayerWeights:
    ln_in_w: torch.Tensor
    ln_in_b: torch.Tensor
    qkv_w: torch.Tensor | QuantizedWeight
    qkv_b: torch.Tensor
    q_ln_w: torch.Tensor | None
    q_ln_b: torch.Tensor | None
    k_ln_w: torch.Tensor | None
    k_ln_b: torch.Tensor | None
    dense_w: torch.Tensor | QuantizedWeight
    dense_b: torch.Tensor | None          # None on tensor-parallel ranks > 0 (rank 0 adds it to the sum)
    ln_post_w: torch.Tensor
    ln_post_b: torch.Tensor
    up_w: torch.Tensor | QuantizedWeight
    up_b: torch.Tensor
    down_w: torch.Tensor | QuantizedWeight
    down_b: torch.Tensor | None           # as dense_b


# Field -> HF name inside "model.layers.{i}.".
_LAYER_NAMES = {
    "ln_in_w": "input_layernorm.weight", "ln_in_b": "input_layernorm.bias",
    "qkv_w": "self_attn.query_key_value.weight", "qkv_b": "self_attn.query_key_value.bias",
    "q_ln_w": "self_attn.q_layernorm.weight", "q_ln_b": "self_attn.q_layernorm.bias",
    "k_ln_w": "self_attn.k_layernorm.weight", "k_ln_b": "self_attn.k_layernorm.bias",
    "dense_w": "self_attn.dense.weight", "dense_b": "self_attn.dense.bias",
    "ln_post_w": "post_attention_layernorm.weight", "ln_post_b": "post_attention_layernorm.bias",
    "up_w": "mlp.dense_h_to_4h.weight", "up_b": "mlp.dense_h_to_4h.bias",
    "down_w": "mlp.dense_4h_to_h.weight", "down_b": "mlp.dense_4h_to_h.bias",
}
_MODEL_NAMES = {"embed": "model.embed_tokens.weight", "final_ln_w": "model.final_layernorm.weight",
                "final_ln_b": "model.final_layernorm.bias", "lm_head": "lm_head.weight"}


@dataclass(kw_only=True)
class Weights:
    embed: torch.Tensor | QuantizedWeight
    layers: list[LayerWeights]
    final_ln_w: torch.Tensor
    final_ln_b: torch.Tensor
    lm_head: torch.Tensor | QuantizedWeight

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor once (the tied lm_head may be the embedding itself; a QuantizedWeight gives its int8
        weight and its scales)."""
        seen = set()
        for t in [self.embed, self.final_ln_w, self.final_ln_b, self.lm_head] + \
                [getattr(lw, f.name) for lw in self.layers for f in fields(lw)]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield from (t.qweight, t.scale) if isinstance(t, QuantizedWeight) else (t,)

    @property
    def scheme(self) -> str | None:
        """The quantization scheme of the projections ("int8"), or None for full precision."""
        return "int8" if isinstance(self.layers[0].qkv_w if self.layers else self.lm_head, QuantizedWeight) else None

    @classmethod
    def assemble(cls, sources: Mapping, config: PersimmonConfig, shard: tuple[int, int] | None = None,
                 materialize: Callable = lambda t, name: t, where: str = "") -> "Weights":
        """Weights from `sources` (HF name -> tensor or lazy slice), after checking every shape against
        `config`. shard=(rank, world_size) keeps rank's part of each split tensor; `materialize(entry, name)`
        turns each (sliced) entry into what the engine holds (a tensor on a device, in a dtype, contiguous,
        or a QuantizedWeight)."""
        check_tensors(expected_shapes(config), sources, allow_unexpected=True, where=where)
        if shard is not None:
            check_tp_config(config, shard[1])

        def get(name: str):
            entry = sources.get(name)
            if entry is None:
                return None                   # optional (QK-LayerNorm absent); required ones were checked
            try:
                part = entry if shard is None else take_shard(name, entry, *shard)
                return None if part is None else materialize(part, name)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{where or 'weights'}: cannot read {name!r}: {exc}") from exc

        layers = [LayerWeights(**{f: get(f"model.layers.{i}.{n}") for f, n in _LAYER_NAMES.items()})
                  for i in range(config.num_hidden_layers)]
        return cls(layers=layers, **{f: get(n) for f, n in _MODEL_NAMES.items()})


def quantize_weights(weights: Weights, scheme: str = "int8") -> Weights:
    """A copy of full-precision `weights` with the projections, lm_head and embedding quantized (one tensor
    at a time, on their device; a tied head shares the embedding's); the originals are left as they are."""
    if check_scheme(scheme) is None or weights.scheme is not None:
        raise ValueError(f"quantize_weights: need full-precision weights and a scheme, got {scheme!r}")
    done: dict[int, QuantizedWeight] = {}

    def q(t: torch.Tensor) -> QuantizedWeight:
        if id(t) not in done:
            done[id(t)] = quantize_weight(t)
        return done[id(t)]

    layers = [replace(lw, qkv_w=q(lw.qkv_w), dense_w=q(lw.dense_w), up_w=q(lw.up_w), down_w=q(lw.down_w))
              for lw in weights.layers]
    return replace(weights, layers=layers, embed=q(weights.embed), lm_head=q(weights.lm_head))


def normalise_names(state: Mapping, config: PersimmonConfig) -> dict:
    """HF names with the "model." prefix (a base-model checkpoint has none), "lm_head.weight" pointing at
    the embedding when tied or absent."""
    out = dict(state) if any(k.startswith("model.") for k in state) else {f"model.{k}": v for k, v in state.items()}
    if config.tie_word_embeddings or out.get("lm_head.weight") is None:
        out["lm_head.weight"] = out.get("model.embed_tokens.weight")
    return out


def module_sources(model: torch.nn.Module, config: PersimmonConfig) -> dict:
    """HF name -> parameter (detached, not copied) of a causal-LM module, ours or transformers'."""
    params = {name: t.detach() for name, t in model.named_parameters()}
    params.update({name: t.detach() for name, t in model.named_buffers()})
    return normalise_names(params, config)


def weights_from_module(model: torch.nn.Module, config: PersimmonConfig,
                        shard: tuple[int, int] | None = None) -> Weights:
    """The engine's Weights referencing a loaded module's parameters (a rank's slices are views where
    contiguous, copies otherwise)."""
    materialize = (lambda t, name: t) if shard is None else (lambda t, name: t.contiguous())
    return Weights.assemble(module_sources(model, config), config, shard, materialize, where=type(model).__name__)


def load_weights(path: str | os.PathLike, config: PersimmonConfig, dtype: torch.dtype, device,
                 shard: tuple[int, int] | None = None, quantize: str | None = None) -> Weights:
    """The engine's Weights read from an HF-format directory onto `device`, converted to `dtype` one tensor
    (or one file) at a time. A whole model onto a GPU from safetensors streams through pinned buffers
    (device_loader: host memory stays at two blocks); otherwise tensors are read lazily, a rank reading
    only its slices, so no process ever holds more than its share.

    quantize="int8" quantizes the projections, lm_head and embedding as they arrive on `device`
    (quantization.py); a checkpoint saved quantized loads as it is, with or without `quantize`."""
    path, device = os.fspath(path), torch.device(device)
    scheme, quantize_now = resolve_scheme(config, quantize, shard)
    stored = scheme is not None and not quantize_now
    with contextlib.ExitStack() as stack:
        raw = open_checkpoint(path, stack)
        sources = normalise_names(raw, config)
        if stored:
            sources = pair_quantized(sources, where=path)
        else:
            check_no_stray_scales(sources, where=path)
        streamed = shard is None and device.type == "cuda" and all(
            f.endswith(".safetensors") for f in weight_files(path))
        if not streamed:
            return Weights.assemble(sources, config, shard, materializer(device, dtype, quantize_now), where=path)
        check_tensors(expected_shapes(config), sources, allow_unexpected=True, where=path)
        prefixed = any(k.startswith("model.") for k in raw)
    from .device_loader import load_state_dict as stream_to_device

    wanted = wanted_names(set(expected_shapes(config)) | {"model.embed_tokens.weight"})
    names = wanted if prefixed else {n.removeprefix("model.") for n in wanted}
    state = normalise_names(stream_to_device(path, device, names=names, convert=streaming_converter(dtype, quantize_now)),
                            config)
    if stored:
        state = assemble_streamed(state, dtype, where=path)
    return Weights.assemble(state, config, where=path, materialize=lambda t, name: t)
