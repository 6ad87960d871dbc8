"""Sources of quantized weights for `Weights.assemble` (loading.py): quantize while loading, or pair the
int8 weights of a quantized checkpoint with their scales.

Quantizing while loading happens one tensor at a time on the target device, right after the tensor
arrives: the full-precision model never exists there (at most one checkpoint file of it, when a whole
safetensors file is streamed to the GPU). A quantized checkpoint is never re-quantized: its int8 weights
and fp32 scales are checked (present, int8, one scale per row) and loaded as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .quantization import (
    SCALE_SUFFIX,
    QuantizedWeight,
    check_quantized_pair,
    check_scheme,
    is_quantized_name,
    quantize_weight,
    scheme_of,
)
from .weights import CheckpointError, shape_of


class QuantizedEntry:
    """A lazy (int8 weight, scales) pair of a quantized checkpoint: safetensors slices or tensors."""

    def __init__(self, qweight, scale):
        self.qweight, self.scale = qweight, scale

    @property
    def shape(self) -> tuple[int, ...]:
        return shape_of(self.qweight)


def resolve_scheme(config, quantize: str | None, shard=None) -> tuple[str | None, bool]:
    """(scheme the weights end up in, whether to quantize them while loading) for a checkpoint of `config`
    and the scheme asked for. A quantized checkpoint keeps its scheme (asking for another is an error);
    tensor parallelism over quantized weights is not supported yet."""
    check_scheme(quantize)
    stored = scheme_of(config)
    if stored is not None and quantize is not None and quantize != stored:
        raise ValueError(f"the checkpoint is quantized as {stored!r}; it cannot be loaded as {quantize!r}")
    scheme = stored or quantize
    if scheme is not None and shard is not None and shard[1] > 1:
        raise ValueError(f"{scheme} weights do not support tensor parallelism yet; load them on one GPU (tp=1)")
    return scheme, stored is None and scheme is not None


def pair_quantized(sources: Mapping, where: str = "") -> dict:
    """`sources` of a quantized checkpoint with every quantized weight and its `_scale` merged into one
    QuantizedEntry (scale entries dropped), after checking each pair."""
    out = dict(sources)
    for name in [n for n in sources if is_quantized_name(n) and sources[n] is not None]:
        if name in out and isinstance(out[name], QuantizedEntry):
            continue                                    # a tied lm_head already paired through the embedding
        scale = sources.get(name + SCALE_SUFFIX)
        check_quantized_pair(name, sources[name], scale, where)
        entry = QuantizedEntry(sources[name], scale)
        for alias, value in sources.items():            # the tied head points at the same entry
            if value is sources[name]:
                out[alias] = entry
    for name in [n for n in out if n.endswith(SCALE_SUFFIX)]:
        del out[name]
    return out


def materializer(device, dtype: torch.dtype, quantize_now: bool):
    """materialize(entry) for Weights.assemble: a QuantizedEntry becomes a QuantizedWeight on `device`;
    with `quantize_now` a floating-point weight the scheme quantizes is quantized right after it reaches
    `device` (each entry once: a tied head shares the embedding's). Others go to `device` in `dtype`."""
    done: dict[int, QuantizedWeight] = {}

    def materialize(entry):
        if isinstance(entry, QuantizedEntry):
            key = id(entry)
            if key not in done:
                q = entry.qweight[:].to(device=device).contiguous()
                done[key] = QuantizedWeight(q, entry.scale[:].to(device=device, dtype=torch.float32).contiguous(),
                                            dtype)
            return done[key]
        return entry[:].to(device=device, dtype=dtype).contiguous()

    def materialize_quantizing(entry, name: str):
        if not is_quantized_name(name):
            return materialize(entry)
        key = id(entry)
        if key not in done:
            done[key] = quantize_weight(entry[:].to(device=device), dtype)
        return done[key]

    return materialize_quantizing if quantize_now else (lambda entry, name: materialize(entry))


def streaming_converter(dtype: torch.dtype, quantize_now: bool):
    """convert(name, tensor) for device_loader: scales stay fp32, int8 stays int8, weights the scheme
    quantizes are quantized (with `quantize_now`), other floating-point tensors go to `dtype`."""

    def convert(name: str, tensor: torch.Tensor):
        if name.endswith(SCALE_SUFFIX):
            return tensor.float()
        if not tensor.is_floating_point():
            return tensor
        if quantize_now and is_quantized_name(name):
            return quantize_weight(tensor, dtype)
        return tensor.to(dtype)

    return convert


def wanted_names(names: set[str]) -> set[str]:
    """`names` plus the scale of every quantized weight among them."""
    return set(names) | {n + SCALE_SUFFIX for n in names if is_quantized_name(n)}


def assemble_streamed(state: dict, dtype: torch.dtype, where: str) -> dict:
    """A streamed state of a quantized checkpoint (int8 weights and scales on the device) with each pair
    joined into a QuantizedWeight."""
    paired = pair_quantized(state, where)
    built: dict[int, QuantizedWeight] = {}
    for name, entry in paired.items():
        if isinstance(entry, QuantizedEntry):
            if id(entry) not in built:
                built[id(entry)] = QuantizedWeight(entry.qweight.contiguous(), entry.scale.float().contiguous(), dtype)
            paired[name] = built[id(entry)]
    return paired


def check_no_stray_scales(sources: Mapping, where: str) -> None:
    """A full-precision checkpoint holding `_scale` tensors is probably a quantized one whose config lost
    its quantization_config: refuse it rather than load int8 values as weights."""
    stray = sorted(n for n in sources if n.endswith(SCALE_SUFFIX))
    if stray:
        raise CheckpointError(f"{where}: {stray[0]} (and {len(stray) - 1} more) looks like a quantized weight's "
                              "scales, but config.json has no quantization_config")
