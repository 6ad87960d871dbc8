// Torch-free launcher of the sampler's tail after torch.sort: temperature, top-k, top-p and the exponential
// race over the sorted logits (argmax of the raw logits for rows with temperature <= 0). Semantics:
// persimmon_rt/reference.py (sample_sorted).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace persimmon_rt {

// Scratch bytes sample_sorted needs for `rows` rows of `vocab` logits.
size_t sample_sorted_workspace_bytes(int64_t rows, int64_t vocab);

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// 1 <= vocab < 2^31, 0 <= rows <= 65535, every tensor contiguous; workspace of sample_sorted_workspace_bytes.
void launch_sample_sorted(const float* logits,          // [B, V]
                          const float* sorted_logits,   // [B, V]  descending
                          const int64_t* order,         // [B, V]
                          const float* noise,           // [B, V]  Exp(1)
                          const float* temperature,     // [B]
                          const int64_t* top_k,         // [B]
                          const float* top_p,           // [B]
                          int64_t* tokens,              // [B]  out
                          void* workspace, int64_t rows, int64_t vocab, cudaStream_t stream);

}  // namespace persimmon_rt
