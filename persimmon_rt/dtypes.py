"""The dtype names the command line, the converter and the benchmark accept, in one table."""

from __future__ import annotations

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """The torch.dtype for a name in DTYPES (also 'torch.float16', 'fp16', 'bf16', ...) or a dtype of the table."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"unsupported dtype {value!r}: expected one of {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16 (the name config.json uses)."""
    return str(dtype).removeprefix("torch.")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on a GPU (the CUDA kernels' type), float32 on the CPU (half precision is slow there)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
