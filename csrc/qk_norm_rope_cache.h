// Torch-free launcher of the fused QK-LayerNorm + rotary + KV-cache write; semantics in
// persimmon_rt/reference.py (qk_norm_rope_cache). T = tokens, H = heads, D = head_dim, R = rotary dims.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// D % 8 == 0 and D <= 256; R even and R <= D; `qkv` 16-byte aligned with strides multiples of 8
// elements; every other tensor contiguous. A slot outside [0, num_slots) traps the kernel.
void launch_qk_norm_rope_cache(
    const void* qkv,            // [T, H, 3, D]  strides (qkv_stride_t, qkv_stride_h, qkv_stride_s, 1)
    const void* positions,      // [T] int64 if positions_int64 else int32
    const float* inv_freq,      // [R / 2]
    const void* q_weight,       // [D]  null: no QK-LayerNorm at all (as the reference)
    const void* q_bias,         // [D] or null
    const void* k_weight,       // [D] or null
    const void* k_bias,         // [D] or null
    void* k_cache,              // [num_slots, H, D]  the [B, S, H, D] cache, flat
    void* v_cache,              // [num_slots, H, D]
    const void* slot_mapping,   // [T] int64 if slots_int64 else int32
    void* q_out,                // [T, H, D]
    int64_t num_tokens, int num_heads, int head_dim, int rotary_dim, int64_t num_slots,
    int64_t qkv_stride_t, int64_t qkv_stride_h, int64_t qkv_stride_s,
    bool positions_int64, bool slots_int64, float eps, DType dtype, cudaStream_t stream);

}  // namespace persimmon_rt
