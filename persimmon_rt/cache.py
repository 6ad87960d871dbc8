"""KV caches: `DynamicCache` for the module-level (reference) models, `StaticKVCache` for the engine.

`DynamicCache` grows by concatenation, like transformers' DynamicCache: simple, autograd-friendly, and
the oracle the fast engine's static cache is checked against. Each layer holds K (after QK-LayerNorm and
rotary) and V as [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch

from .config import PersimmonConfig


class DynamicCache:
    def __init__(self, num_layers: int | None = None):
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.key_cache)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_cache[layer_idx].shape[-2] if layer_idx < len(self.key_cache) else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's [B, H, S_new, D] keys/values; return the whole [B, H, S, D] history."""
        if layer_idx == len(self.key_cache):
            self.key_cache.append(key)
            self.value_cache.append(value)
        elif layer_idx < len(self.key_cache):
            self.key_cache[layer_idx] = torch.cat((self.key_cache[layer_idx], key), dim=-2)
            self.value_cache[layer_idx] = torch.cat((self.value_cache[layer_idx], value), dim=-2)
        else:
            raise IndexError(f"cache has {len(self.key_cache)} layers; cannot update layer {layer_idx}")
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows (e.g. drop finished sequences) in every layer."""
        self.key_cache = [k.index_select(0, beam_idx) for k in self.key_cache]
        self.value_cache = [v.index_select(0, beam_idx) for v in self.value_cache]

    @classmethod
    def from_legacy_cache(cls, past) -> "DynamicCache":
        """Accept the tuple-of-(key, value) format older transformers code passes around."""
        cache = cls()
        for layer_idx, (k, v) in enumerate(past):
            cache.update(k, v, layer_idx)
        return cache

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(zip(self.key_cache, self.value_cache))


class StaticKVCache:
    """Per-layer K and V, [max_batch, max_seq, heads, head_dim]; row b belongs to batch slot b. Under tensor
    parallelism over N ranks each rank holds its heads only (num_heads = H / N)."""

    def __init__(self, config: PersimmonConfig, max_batch: int, max_seq: int, dtype, device,
                 num_heads: int | None = None):
        shape = (max_batch, max_seq, num_heads or config.num_attention_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    @staticmethod
    def nbytes(config: PersimmonConfig, max_batch: int, max_seq: int, dtype, tp_size: int = 1) -> int:
        """Bytes of the cache (of one rank's share under tensor parallelism over tp_size ranks)."""
        per_token = 2 * config.num_hidden_layers * config.hidden_size * torch.finfo(dtype).bits // 8 // tp_size
        return per_token * max_batch * max_seq
