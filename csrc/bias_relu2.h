// Torch-free launcher of the prefill MLP epilogue out = relu(x + bias)^2; semantics in
// persimmon_rt/reference.py (bias_relu2). N = rows, F = features.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// F % 8 == 0; every tensor contiguous and 16-byte aligned. `out` may alias `x`.
void launch_bias_relu2(const void* x,      // [N, F]
                       const void* bias,   // [F]
                       void* out,          // [N, F]
                       int64_t rows, int64_t features, DType dtype, cudaStream_t stream);

}  // namespace persimmon_rt
