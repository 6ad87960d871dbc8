"""Weight-only int8 on the module path: `PersimmonForCausalLM.from_pretrained(..., quantize="int8")` swaps
every projection and lm_head for a QuantizedLinear (int8 weight + fp32 per-row scales, dequantized into
a temporary for each call), one layer at a time, from host memory onto the target device: the
full-precision weights never sit on the device. The embedding stays in the model dtype here (the
engine's loader quantizes it too). For inference; autograd does not reach int8 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import QuantizedWeight, check_scheme, quantize_weight


class QuantizedLinear(nn.Module):
    """y = x (q * s)^T + b, the weight dequantized to x's dtype per call (ops.dequantize_int8)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.qweight)
        self.register_buffer("weight_scale", weight.scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = QuantizedWeight(self.weight, self.weight_scale, x.dtype).dequantize()
        return F.linear(x, w, self.bias)


def quantize_module(model: nn.Module, scheme: str, device) -> nn.Module:
    """Move `model` (on the CPU) to `device`, every nn.Linear quantized on arrival, module by module."""
    check_scheme(scheme)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                weight = quantize_weight(child.weight.detach().to(device))
                bias = None if child.bias is None else child.bias.detach().to(device)
                setattr(module, child_name, QuantizedLinear(weight, bias))
    return model.to(device)
