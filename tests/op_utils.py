"""Helpers shared by the op tests: a CUDA skip marker that never touches a GPU at collection, the
derived tolerance check, a CUDA-graph capture helper, and the QK-LayerNorm parameters.
"""

from __future__ import annotations

import pytest
import torch

from persimmon_rt import ops

SKIP_REASON = "needs a CUDA GPU and persimmon_rt._C"

# torch.cuda.is_available() creates no context (and is False at once on a CPU build), so collecting
# these tests on a machine without a GPU stays GPU-free.
HAVE_CUDA_KERNELS = ops.HAVE_CUDA_EXT and torch.cuda.is_available()


def requires_cuda(obj):
    """Marks a test function or class `cuda` and skips it unless a GPU and the extension are present."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAVE_CUDA_KERNELS, reason=SKIP_REASON)(obj))


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in fp64; NaN if either holds a NaN (so a NaN can never pass)."""
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def check_against_fp32(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, floor: float = 1e-6,
                       what: str = "out") -> None:
    """The kernel's error vs the fp32 reference must be at most twice the error of plain PyTorch doing the
    same computation in the low precision (`lowp`), plus a tiny absolute floor.

    The bound comes from the reference's own rounding, not from a hand-picked tolerance: a kernel that
    rounds once (as it should) lands near the lowp error or below it.
    """
    assert out.shape == ref.shape == lowp.shape, (out.shape, ref.shape, lowp.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    err, base = max_abs_err(out, ref), max_abs_err(lowp, ref)
    assert err <= 2 * base + floor, f"{what}: max error {err:.3g} > 2 x plain-PyTorch error {base:.3g} + {floor:g}"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like `t` filled with NaN: any element a kernel fails to write stays NaN."""
    return torch.full_like(t, float("nan"))


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """Warms `fn` up on a side stream (as torch recommends before capture) and captures it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def qk_layernorm_params(D: int, dtype, device, layernorm: bool = True, with_bias: bool = True):
    """Random QK-LayerNorm (q_weight, k_weight, q_bias, k_bias) over head_dim D, weights around 1; None
    where the case has no LayerNorm (or no bias)."""
    affine = lambda scale, shift: (torch.randn(D, device=device) * scale + shift).to(dtype)  # noqa: E731
    q_weight = affine(0.2, 1.0) if layernorm else None
    k_weight = affine(0.2, 1.0) if layernorm else None
    q_bias = affine(0.1, 0.0) if layernorm and with_bias else None
    k_bias = affine(0.1, 0.0) if layernorm and with_bias else None
    return q_weight, k_weight, q_bias, k_bias
