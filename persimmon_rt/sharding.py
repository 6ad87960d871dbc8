"""Megatron-style sharding rules: which part of each HF-named tensor a tensor-parallel rank holds.

Pure functions of (name, tensor or lazy safetensors slice, rank, world size), so loading can apply them
while reading a checkpoint and tests can check them without a process group. tensor_parallel.py explains
the layout and owns the process group.
"""

from __future__ import annotations

import torch

from .config import PersimmonConfig

REPLICATE = "replicate"          # every rank holds the whole tensor
SPLIT_ROWS = "rows"              # dim 0 split in N contiguous blocks (column-parallel output, vocab slice)
SPLIT_COLUMNS = "columns"        # dim 1 split in N contiguous blocks (row-parallel input)
FIRST_RANK = "first_rank"        # bias of a row-parallel projection: rank 0 holds it, the others None

_RULES = (
    ("self_attn.query_key_value.weight", SPLIT_ROWS),
    ("self_attn.query_key_value.bias", SPLIT_ROWS),
    ("self_attn.dense.weight", SPLIT_COLUMNS),
    ("self_attn.dense.bias", FIRST_RANK),
    ("mlp.dense_h_to_4h.weight", SPLIT_ROWS),
    ("mlp.dense_h_to_4h.bias", SPLIT_ROWS),
    ("mlp.dense_4h_to_h.weight", SPLIT_COLUMNS),
    ("mlp.dense_4h_to_h.bias", FIRST_RANK),
)


def shard_rule(name: str) -> str:
    """How the parameter `name` (HF name, with or without the "model." prefix) is split across ranks."""
    if name == "lm_head.weight":
        return SPLIT_ROWS
    for suffix, rule in _RULES:
        if name.endswith(suffix):
            return rule
    return REPLICATE


def check_tp_config(config: PersimmonConfig, world_size: int) -> None:
    """Raise ValueError unless heads, intermediate size and vocabulary all split evenly over world_size."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {world_size!r}")
    for field, what in (("num_attention_heads", "attention heads"), ("intermediate_size", "MLP columns"),
                        ("vocab_size", "vocabulary rows of lm_head")):
        value = getattr(config, field)
        if value % world_size:
            raise ValueError(f"tensor parallelism over {world_size} ranks needs {field} divisible by "
                             f"{world_size}, but the model has {value} {what}")


def shard_range(size: int, rank: int, world_size: int, name: str = "tensor") -> tuple[int, int]:
    """[start, stop) of rank's block when `size` is split in world_size equal contiguous blocks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if size % world_size:
        raise ValueError(f"{name}: dimension of size {size} does not split over {world_size} ranks")
    step = size // world_size
    return rank * step, (rank + 1) * step


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.shape) if hasattr(tensor, "shape") else tuple(tensor.get_shape())


def take_shard(name: str, tensor, rank: int, world_size: int) -> torch.Tensor | None:
    """Rank's part of parameter `name`. `tensor` is anything indexed like a tensor: a torch.Tensor (the
    result is a view where the slice is contiguous) or a safetensors slice from `safe_open(...).get_slice`
    (only the rank's part is read from the file). Returns None for a row-parallel bias on ranks > 0."""
    rule = shard_rule(name)
    shape = _shape(tensor)
    if rule == SPLIT_ROWS:
        start, stop = shard_range(shape[0], rank, world_size, name)
        return tensor[start:stop]
    if rule == SPLIT_COLUMNS:
        start, stop = shard_range(shape[1], rank, world_size, name)
        return tensor[:, start:stop]
    if rule == FIRST_RANK:
        return tensor[:] if rank == 0 else None
    return tensor[:]
