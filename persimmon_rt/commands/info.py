"""`persimmon-rt info`: the installed build, the GPU, and (for a model directory) what it needs."""

from __future__ import annotations

import argparse
import os

import torch

from ..dtypes import DTYPES, default_dtype, dtype_name, parse_dtype
from ._common import default_device, model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None, help="model directory (default: the demo model)")
    parser.add_argument("--batch", type=int, default=1, help="batch size for the memory estimate")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the maximum)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype for the memory estimate (default: what generate uses here: float16 on a GPU, "
                             "float32 on the CPU)")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="memory estimate with weights quantized while loading: int8 (default: as stored)")


def run(args: argparse.Namespace) -> int:
    from .. import __version__, ops
    from ..config import PersimmonConfig
    from ..fuyu.config import FuyuConfig, is_fuyu_dir
    from ..cache import StaticKVCache
    from ..quantized_sources import resolve_scheme
    from ..weights import weight_files

    print(f"persimmon_rt {__version__}, torch {torch.__version__}")
    if ops.HAVE_CUDA_EXT:
        archs = getattr(ops._C, "CUDA_ARCHS", "unknown")
        print(f"CUDA extension: built (architectures {archs})")
    else:
        print("CUDA extension: not built (every op runs on its PyTorch reference)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                  f"{p.multi_processor_count} SMs")
    else:
        print("GPU: none visible to torch")

    path = model_dir(args)
    fuyu = is_fuyu_dir(path)
    config = FuyuConfig.from_pretrained(path).text_config if fuyu else PersimmonConfig.from_pretrained(path)
    files = weight_files(path)
    disk = sum(os.path.getsize(f) for f in files)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(default_device())
    n_params = _count_parameters(config)
    full = n_params * torch.finfo(dtype).bits // 8
    scheme = resolve_scheme(config, args.quantize)[0]
    weights = quantized_bytes(config, dtype) if scheme else full
    context = args.context or config.max_position_embeddings
    cache = StaticKVCache.nbytes(config, args.batch, context, dtype)
    print(f"model: {path}")
    if fuyu:
        p = FuyuConfig.from_pretrained(path)
        print(f"  multimodal (Fuyu): images as {p.patch_size}x{p.patch_size}x{p.num_channels} patches, one linear layer "
              f"into the decoder; generate --image PATH")
    print(f"  {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads "
          f"x {config.head_dim}, ffn {config.intermediate_size}, vocab {config.vocab_size}, "
          f"max positions {config.max_position_embeddings}, rotary {config.rotary_dim} dims "
          f"(theta {config.rope_theta:g}, {config.rope_type})")
    print(f"  {n_params / 1e6:.1f} M parameters, {disk / 2**20:.1f} MiB on disk in {len(files)} file(s), "
          f"saved as {config.torch_dtype}")
    if scheme:
        print(f"  weights quantized {scheme} (weight-only, per output channel): {weights / 2**30:.2f} GiB against "
              f"{full / 2**30:.2f} GiB at {dtype_name(dtype)}, {(full - weights) / 2**30:.2f} GiB saved")
    print(f"  memory at {dtype_name(dtype)}, batch {args.batch} x context {context}: "
          f"weights {weights / 2**30:.2f} GiB + KV cache {cache / 2**30:.2f} GiB = "
          f"{(weights + cache) / 2**30:.2f} GiB (plus activations)")
    return 0


def quantized_bytes(config, dtype) -> int:
    """Weight bytes with the scheme's tensors as int8 plus fp32 per-row scales, the rest in `dtype`."""
    from ..quantization import is_quantized_name
    from ..weights import expected_shapes

    shapes = dict(expected_shapes(config))
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    else:
        shapes.setdefault("lm_head.weight", (config.vocab_size, config.hidden_size))
    total = 0
    for name, shape in shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        total += numel + 4 * shape[0] if is_quantized_name(name) else numel * torch.finfo(dtype).bits // 8
    return total


def _count_parameters(config) -> int:
    from ..model import PersimmonForCausalLM

    with torch.device("meta"):           # shapes only, no memory
        return PersimmonForCausalLM(config).num_parameters()
