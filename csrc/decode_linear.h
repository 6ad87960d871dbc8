// Torch-free launcher of the decode GEMV with fused epilogue, out = act(x W^T + bias) + residual;
// semantics in persimmon_rt/reference.py (decode_linear). M = rows (decode batch), N = output
// features, K = input features.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

constexpr int kDecodeLinearMaxRows = 16;

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// 1 <= M <= 16, K % 8 == 0, ldx % 8 == 0, x and weight 16-byte aligned; x, weight, bias and residual of
// `dtype`; out of `dtype`, or fp32 when out_fp32. x must not overlap out; residual may alias out
// exactly. No workspace, no host synchronisation: safe to capture in a CUDA graph.
void launch_decode_linear(const void* x,         // [M, K]  row stride ldx elements, unit column stride
                          const void* weight,    // [N, K]  contiguous
                          const void* bias,      // [N]  or nullptr
                          const void* residual,  // [M, N]  contiguous, or nullptr
                          void* out,             // [M, N]  contiguous, written
                          int64_t ldx, int M, int N, int K, bool relu2, DType dtype, bool out_fp32,
                          cudaStream_t stream);

}  // namespace persimmon_rt
