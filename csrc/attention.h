// Torch-free launchers of the attention ops; semantics in persimmon_rt/reference.py.
// T = packed query tokens, B = sequences, S = cache length, H = heads, D = head_dim.
// All tensors contiguous, fp16 or bf16 (`dtype`), 16-byte aligned; shapes are checked by the caller
// (torch_bindings.cpp) before launch. Launchers throw std::exception on a launch failure.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

// Head dims the attention kernels are built for: the launchers dispatch over this list (any other
// head_dim is an error), and the extension exports it as persimmon_rt._C.ATTENTION_HEAD_DIMS.
inline constexpr int kAttentionHeadDims[] = {64, 128};

constexpr bool attention_supports_head_dim(int head_dim) {
  for (const int d : kAttentionHeadDims)
    if (d == head_dim) return true;
  return false;
}

// out = causal softmax(q k^T * scale) v of the new tokens of every sequence over its cache.
// max_q_len >= max_b (cu[b+1] - cu[b]) sizes the grid without reading cu_seqlens_q on the host.
// head_dim one of kAttentionHeadDims.
void launch_attention_prefill(const void* q,               // [T, H, D]
                              const void* k_cache,         // [B, S, H, D]
                              const void* v_cache,         // [B, S, H, D]
                              const int32_t* cu_seqlens_q, // [B + 1]  sequence b owns queries [cu[b], cu[b+1])
                              const int32_t* seq_lens,     // [B]  keys of sequence b after this chunk
                              void* out,                   // [T, H, D]  written
                              int num_tokens, int batch, int max_q_len, int cache_len, int num_heads,
                              int head_dim, float scale, DType dtype, cudaStream_t stream);

// The kernel launch_attention_prefill runs for head_dim on the current device: "wgmma" where it is asked
// for and available (an sm_90a build on a compute capability 9.0 device, head_dim 64 or 128), else "mma_sync".
// PERSIMMON_RT_PREFILL_ATTENTION=wgmma|mma_sync asks, read at every call; unset, attention.cu's default
// applies. (Caches of more than about INT32_MAX positions in all take mma_sync whatever the answer here.)
const char* attention_prefill_kernel_name(int head_dim);

// Bytes of scratch launch_attention_decode (and launch_qkv_attention_decode) needs for this shape (0 if
// none); the caller allocates it
// on the launch stream so CUDA-graph capture stays allocation-free inside the kernels.
size_t attention_decode_workspace_bytes(int batch, int cache_len, int num_heads, int head_dim);

// out[b] = softmax(q[b] k[b, :seq_lens[b]]^T * scale) v[b, :seq_lens[b]]; zeros where seq_lens[b] == 0.
// The launch depends only on the shapes (never on seq_lens), so it can be captured in a CUDA graph and
// replayed with new lengths. head_dim one of kAttentionHeadDims.
void launch_attention_decode(const void* q,                // [B, H, D]
                             const void* k_cache,          // [B, S, H, D]
                             const void* v_cache,          // [B, S, H, D]
                             const int32_t* seq_lens,      // [B]
                             void* out,                    // [B, H, D]  written
                             void* workspace,              // attention_decode_workspace_bytes(...) bytes
                             int batch, int cache_len, int num_heads, int head_dim,
                             float scale, DType dtype, cudaStream_t stream);

// attention_decode with the new token's QK-LayerNorm, rotary and cache write fused in: equals
// launch_qk_norm_rope_cache(qkv, ..., q) followed by launch_attention_decode(q, ...) bit for bit, in one
// launch (plus the combine where attention_decode has one) and without q in memory. Preconditions, besides
// both ops' (the caller checks them): slot_mapping[b] = b * S + seq_lens[b] - 1 where seq_lens[b] > 0 (the
// new token is the last key), and inside row b, [b * S, (b + 1) * S), where seq_lens[b] == 0 (an idle
// row); any other slot traps the kernel. head_dim one of kAttentionHeadDims.
void launch_qkv_attention_decode(
    const void* qkv,              // [B, H, 3, D]  strides (qkv_stride_b, qkv_stride_h, qkv_stride_s, 1)
    const void* positions,        // [B] int64 if positions_int64 else int32
    const float* inv_freq,        // [R / 2]
    const void* q_weight,         // [D]  null: no QK-LayerNorm at all
    const void* q_bias,           // [D] or null
    const void* k_weight,         // [D] or null
    const void* k_bias,           // [D] or null
    void* k_cache,                // [B, S, H, D]  read, and written at slot_mapping
    void* v_cache,                // [B, S, H, D]
    const void* slot_mapping,     // [B] int64 if slots_int64 else int32: flat slots b * S + s
    const int32_t* seq_lens,      // [B]  keys after this token (its own included); 0 = idle row
    void* out,                    // [B, H, D]  written
    void* workspace,              // attention_decode_workspace_bytes(...) bytes
    int batch, int cache_len, int num_heads, int head_dim, int rotary_dim,
    int64_t qkv_stride_b, int64_t qkv_stride_h, int64_t qkv_stride_s, bool positions_int64, bool slots_int64,
    float eps, float scale, DType dtype, cudaStream_t stream);

}  // namespace persimmon_rt
