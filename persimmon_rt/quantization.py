"""Weight-only int8 quantization: the scheme, the quantized tensor type, and the checkpoint format.

Scheme "int8": symmetric int8 per output channel. A weight W [N, K] becomes q = round(W / s) clamped to
[-127, 127] with s = max_k |W[n, k]| / 127 per row (fp32; a row of zeros gets s = 1), so W ~ q * s.
Activations stay fp16 / bf16 and accumulate in fp32; the scale is applied once per output.

Quantized: every projection (QKV, dense, MLP up and down), lm_head and the input embedding (a row of the
embedding table is an output channel of the tied head, and keeping it at fp16 would cost 2 GiB of the
8B model's 9.5 GiB budget). LayerNorms and biases stay in the model dtype.

On disk (an HF-format directory): each quantized `X.weight` is stored as int8 [N, K] beside
`X.weight_scale`, fp32 [N]; config.json carries

    "quantization_config": {"quant_method": "persimmon_rt", "scheme": "int8", "bits": 8,
                            "symmetric": true, "granularity": "per_output_channel"}

and such a directory loads without re-quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import CheckpointError

SCHEMES = ("int8",)
QUANT_METHOD = "persimmon_rt"
SCALE_SUFFIX = "_scale"
QMAX = 127
# Rows quantized per step: bounds the fp32 temporaries to CHUNK_ROWS x K x 4 bytes (64 MiB at K = 4096).
CHUNK_ROWS = 4096

_QUANTIZED_SUFFIXES = ("self_attn.query_key_value.weight", "self_attn.dense.weight", "mlp.dense_h_to_4h.weight",
                       "mlp.dense_4h_to_h.weight")
_QUANTIZED_NAMES = ("lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight")


def check_scheme(scheme: str | None) -> str | None:
    """`scheme` if it is None or a known scheme; otherwise a ValueError naming the known ones."""
    if scheme is None or scheme in SCHEMES:
        return scheme
    raise ValueError(f"unknown quantization scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")


def is_quantized_name(name: str) -> bool:
    """Whether the weight called `name` (HF name, with or without "model.") is quantized by the scheme."""
    return name in _QUANTIZED_NAMES or name.endswith(_QUANTIZED_SUFFIXES)


def config_entry(scheme: str) -> dict:
    """The `quantization_config` of config.json for a checkpoint quantized with `scheme`."""
    check_scheme(scheme)
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "bits": 8, "symmetric": True,
            "granularity": "per_output_channel"}


def scheme_of(config) -> str | None:
    """The scheme a checkpoint's config says its weights are stored in (None: full precision); a
    quantization_config this package did not write, or with an unknown scheme, is an error."""
    entry = config.extra.get("quantization_config")
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD:
        method = entry.get("quant_method") if isinstance(entry, dict) else entry
        raise CheckpointError(f"config.json: quantization_config of method {method!r} is not supported "
                              f"(expected quant_method {QUANT_METHOD!r})")
    try:
        return check_scheme(entry.get("scheme"))
    except ValueError as exc:
        raise CheckpointError(f"config.json: quantization_config: {exc}") from None


@dataclass
class QuantizedWeight:
    """An int8 weight [N, K] with fp32 per-row scales, standing for a weight of `dtype` (the activation
    dtype it dequantizes to)."""

    qweight: torch.Tensor       # int8 [N, K]
    scale: torch.Tensor         # fp32 [N]
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def is_cuda(self) -> bool:
        return self.qweight.is_cuda

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q * s rounded to `dtype` (default: self.dtype); on a GPU by the dequantize_int8 kernel."""
        from . import ops

        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        ops.dequantize_int8(self.qweight, self.scale, out)
        return out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` dequantized (an embedding lookup): q[index] * s[index], fp32 product, rounded once."""
        return (self.qweight[index].float() * self.scale[index].unsqueeze(-1)).to(self.dtype)


def quantize_int8(weight: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], s fp32 [N]) of a floating-point weight [N, K], on its device, `chunk_rows` rows at a
    time (the fp32 copy of a whole lm_head would take 4 GiB)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8: expected a floating-point [N, K] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        w = weight[start:start + chunk_rows].float()
        s = w.abs().amax(dim=1) / QMAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start:start + chunk_rows] = torch.round(w / s[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        scale[start:start + chunk_rows] = s
    return q, scale


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """A QuantizedWeight of `weight` standing for `dtype` (default: weight's own)."""
    q, s = quantize_int8(weight)
    return QuantizedWeight(q, s, dtype or weight.dtype)


def check_quantized_pair(name: str, qweight, scale, where: str = "") -> None:
    """CheckpointError unless `qweight` is int8 [N, K] and `scale` a floating-point [N] (tensors or lazy
    safetensors slices)."""
    from .weights import shape_of

    prefix = f"{where + ': ' if where else ''}{name}"
    if scale is None:
        raise CheckpointError(f"{prefix}: quantized weight without its scales ({name}{SCALE_SUFFIX} is missing)")
    q_dtype, s_dtype = _dtype_of(qweight), _dtype_of(scale)
    if q_dtype not in ("I8", torch.int8):
        raise CheckpointError(f"{prefix}: a quantized weight must be int8, got {q_dtype}")
    n = shape_of(qweight)[0] if len(shape_of(qweight)) == 2 else None
    if tuple(shape_of(scale)) != (n,):
        raise CheckpointError(f"{prefix}{SCALE_SUFFIX}: scales must have shape [N] = [{n}] (one per row of the "
                              f"weight), got {list(shape_of(scale))}")
    if s_dtype not in ("F32", "F16", "BF16", torch.float32, torch.float16, torch.bfloat16):
        raise CheckpointError(f"{prefix}{SCALE_SUFFIX}: scales must be floating point, got {s_dtype}")


def _dtype_of(entry):
    return entry.dtype if isinstance(entry, torch.Tensor) else entry.get_dtype()
