"""Quantized HF-format directories: a full-precision state dict turned into the on-disk int8 format
(quantization.py), and `persimmon-rt quantize`, which does that to an HF-format directory.

The output is written to a temporary directory renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

from .config import PersimmonConfig
from .dtypes import DTYPES, dtype_name, parse_dtype
from .quantization import (
    SCALE_SUFFIX,
    check_scheme,
    config_entry,
    is_quantized_name,
    quantize_int8,
    scheme_of,
)
from .weights import (
    GENERATION_CONFIG,
    CheckpointError,
    atomic_directory,
    check_tensors,
    expected_shapes,
    load_state_dict,
    save_state_dict,
)

# Files beside the weights that a quantized copy keeps.
_CARRIED = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", GENERATION_CONFIG)


def quantize_state_dict(state: dict[str, torch.Tensor], scheme: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The on-disk form of `state` under `scheme`: each weight the scheme quantizes as int8 beside its fp32
    `_scale`, every other floating-point tensor in `dtype`. One tensor at a time (fp32 temporaries are
    bounded by quantize_int8's row blocks)."""
    check_scheme(scheme)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_quantized_name(name):
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(tensor)
        else:
            out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def mark_quantized(config: PersimmonConfig, scheme: str, dtype: torch.dtype) -> None:
    """Record the scheme (config.json's quantization_config) and the activation dtype in `config`."""
    config.extra["quantization_config"] = config_entry(scheme)
    config.torch_dtype = dtype_name(dtype)


def quantize_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, scheme: str = "int8",
                        dtype=None, overwrite: bool = False) -> PersimmonConfig:
    """Write a quantized copy of the HF-format directory `src` to `out_dir` (weights, config.json and the
    tokenizer / generation files). dtype: the activation dtype the copy runs in (default: the checkpoint's)."""
    check_scheme(scheme)
    src = os.fspath(src)
    config = PersimmonConfig.from_pretrained(src)
    if scheme_of(config) is not None:
        raise CheckpointError(f"{src} is already quantized ({scheme_of(config)}); quantize a full-precision one")
    state = load_state_dict(src)                   # memory-mapped: read tensor by tensor while quantizing
    prefixed = any(k.startswith("model.") for k in state)
    named = state if prefixed else {f"model.{k}": v for k, v in state.items()}
    check_tensors(expected_shapes(config), named, allow_unexpected=True, where=src)
    dtype = parse_dtype(dtype) if dtype is not None else (config.dtype or torch.float16)
    quantized = quantize_state_dict(state, scheme, dtype)
    mark_quantized(config, scheme, dtype)
    with atomic_directory(os.fspath(out_dir), overwrite=overwrite) as tmp:
        save_state_dict(quantized, tmp)
        config.save_pretrained(tmp)
        for name in _CARRIED:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    return config


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="full-precision HF-format directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (quantized, HF format)")
    parser.add_argument("--scheme", default="int8", metavar="SCHEME",
                        help="quantization scheme: int8 (symmetric, per output channel)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="activation dtype of the copy (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no summary output")


def run(args: argparse.Namespace) -> int:
    check_scheme(args.scheme)
    start = time.monotonic()
    quantize_checkpoint(args.model, args.out, args.scheme, args.dtype, args.overwrite)
    if not args.quiet:
        size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
        print(f"quantized {args.model} ({args.scheme}) to {args.out}: {size / 2**20:.1f} MiB in "
              f"{time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0
