// Torch-free launcher of the greedy decode step's tail: tokens[b] = argmax(logits[b]) and the row moves on
// (positions, slots and seq_lens += active[b]). Semantics: persimmon_rt/reference.py (greedy_advance).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace persimmon_rt {

// Scratch bytes greedy_advance needs for `rows` rows of `vocab` logits.
size_t greedy_advance_workspace_bytes(int64_t rows, int64_t vocab);

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// 1 <= vocab < 2^31, 0 <= rows <= 65535, logits contiguous; workspace of greedy_advance_workspace_bytes.
void launch_greedy_advance(const float* logits,   // [B, V] fp32
                           int64_t* tokens,       // [B]  written
                           int64_t* positions,    // [B]  += active
                           int64_t* slots,        // [B]  += active
                           int32_t* seq_lens,     // [B]  += active
                           const int32_t* active, // [B]  0 or 1
                           void* workspace, int64_t rows, int64_t vocab, cudaStream_t stream);

}  // namespace persimmon_rt
