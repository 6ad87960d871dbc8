// Torch-free launcher of LayerNorm with an optional fused residual add; semantics in
// persimmon_rt/reference.py (layernorm). N = rows, C = hidden size.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

constexpr int kLayerNormMaxHidden = 16384;

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// C % 8 == 0 and C <= kLayerNormMaxHidden; every tensor contiguous and 16-byte aligned.
// `out` may alias `x`, and `residual_out` may alias `residual` (each row is read before it is written).
void launch_layernorm(const void* x,          // [N, C]
                      const void* weight,     // [C]
                      const void* bias,       // [C]
                      void* out,              // [N, C]  LN(x), or LN(round(x + residual))
                      const void* residual,   // [N, C] or null
                      void* residual_out,     // [N, C]  round(x + residual); null iff residual is
                      int64_t rows, int hidden, float eps, DType dtype, cudaStream_t stream);

}  // namespace persimmon_rt
