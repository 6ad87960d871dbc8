// Launcher: picks the group width G (lanes per head vector) from head_dim and sizes the grid.
#include "qk_norm_rope_cache.h"

#include "kernels/qk_norm_rope_cache.cuh"

namespace persimmon_rt {

namespace {

template <typename T, int G>
void launch(const QkNormRopeCacheParams& p, int64_t num_tokens, cudaStream_t stream) {
  // Whole warps (the group shuffles use full masks), one head per group, at most kQkMaxThreads a block;
  // more heads than fit one block spread over gridDim.y.
  const int threads = static_cast<int>(std::min<int64_t>(ceil_div(int64_t{p.num_heads} * G, 32) * 32, kQkMaxThreads));
  const int groups = threads / G;
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(ceil_div(p.num_heads, groups)));
  launch_kernel(qk_norm_rope_cache_kernel<T, G>, grid, dim3(threads),
                qk_norm_rope_cache_smem_bytes(p.rotary_dim, groups), stream, /*pdl=*/true, p);
}

}  // namespace

void launch_qk_norm_rope_cache(const void* qkv, const void* positions, const float* inv_freq, const void* q_weight,
                               const void* q_bias, const void* k_weight, const void* k_bias, void* k_cache,
                               void* v_cache, const void* slot_mapping, void* q_out, int64_t num_tokens,
                               int num_heads, int head_dim, int rotary_dim, int64_t num_slots, int64_t qkv_stride_t,
                               int64_t qkv_stride_h, int64_t qkv_stride_s, bool positions_int64, bool slots_int64,
                               float eps, DType dtype, cudaStream_t stream) {
  PRT_REQUIRE(head_dim > 0 && head_dim % kVec == 0 && head_dim <= 256, "head_dim must be a multiple of 8 in [8, 256]");
  PRT_REQUIRE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary_dim must be even and <= head_dim");
  PRT_REQUIRE(num_heads > 0 && num_heads <= (1 << 20) && num_tokens >= 0 && num_tokens < (int64_t{1} << 31),
              "num_heads must be in [1, 2^20] and num_tokens in [0, 2^31)");
  PRT_REQUIRE(qkv_stride_t % kVec == 0 && qkv_stride_h % kVec == 0 && qkv_stride_s % kVec == 0 &&
                  reinterpret_cast<uintptr_t>(qkv) % 16 == 0,
              "qkv must be 16-byte aligned with strides that are multiples of 8 elements");
  if (num_tokens == 0) return;
  const QkNormRopeCacheParams p{qkv,     positions, inv_freq,     q_weight,     q_bias,       k_weight,
                                k_bias,  k_cache,   v_cache,      slot_mapping, q_out,        num_slots,
                                qkv_stride_t,       qkv_stride_h, qkv_stride_s, num_heads,    head_dim,
                                rotary_dim,         positions_int64, slots_int64, eps};
  const int chunks = head_dim / kVec;  // lanes with work per head vector
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (chunks <= 1) launch<T, 1>(p, num_tokens, stream);
    else if (chunks <= 2) launch<T, 2>(p, num_tokens, stream);
    else if (chunks <= 4) launch<T, 4>(p, num_tokens, stream);
    else if (chunks <= 8) launch<T, 8>(p, num_tokens, stream);  // head_dim 64: Persimmon-8B
    else if (chunks <= 16) launch<T, 16>(p, num_tokens, stream);
    else launch<T, 32>(p, num_tokens, stream);
  });
}

}  // namespace persimmon_rt
