// Split-KV ("flash-decoding") attention of one query per sequence over its KV cache.
// Semantics: persimmon_rt/reference.py::attention_decode.
//
// Decode attention is a pure stream over the cache (2 * len * D two-byte elements per head, one FMA
// each), so the kernel is shaped for bytes in flight, not arithmetic: the grid is fixed by the cache
// capacity (CUDA-graph safe) and each block (split, head, sequence) takes an equal share of the keys
// actually present, read from seq_lens on the device. Inside a block, D/8 lanes hold one key (16 bytes
// each) and every thread keeps UNROLL key and value loads in flight before the first use; each lane
// group runs its own online softmax, so no barrier is needed until the block's final merge.
// With one split the block writes the output itself; otherwise it writes fp32 partials (max, sum and
// unnormalised output, all relative to its own max) and a combine kernel merges the splits.
#pragma once

#include <cstdint>

#include "attention_common.cuh"

namespace persimmon_rt {
namespace attention {

struct DecodeParams {
  const void* q;             // [B, H, D]
  const void* k_cache;       // [B, S, H, D]
  const void* v_cache;       // [B, S, H, D]
  const int32_t* seq_lens;   // [B]  keys per sequence (<= S); 0 = idle row, output zeros
  void* out;                 // [B, H, D]
  float* partial_out;        // [B, H, num_splits, D]  (unused with one split)
  float* partial_max;        // [B, H, num_splits]  log2 units
  float* partial_sum;        // [B, H, num_splits]
  int num_heads;             // H
  int cache_len;             // S
  int num_splits;
  float scale_log2;          // softmax scale * log2(e)
};

// Keys per split for a sequence of kv_len keys: an equal share rounded up to kDecodeSplitAlign, so that
// short sequences use only the first few splits rather than many near-empty ones. The split and
// combine kernels both derive the number of live splits from it.
constexpr int kDecodeSplitAlign = 64;

__device__ __forceinline__ int decode_split_len(int kv_len, int num_splits) {
  const int share = (kv_len + num_splits - 1) / num_splits;
  return (share + kDecodeSplitAlign - 1) / kDecodeSplitAlign * kDecodeSplitAlign;
}

// Grid: (num_splits, H, B). MIN_BLOCKS caps registers so that many blocks stay resident.
template <typename T, int D, int THREADS, int UNROLL, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) attention_decode_split_kernel(const DecodeParams p) {
  constexpr int kLanes = D / kVec;            // lanes sharing one key
  constexpr int kGroups = THREADS / kLanes;   // keys per load round
  constexpr int kStep = kGroups * UNROLL;     // keys per loop iteration
  static_assert(32 % kLanes == 0, "a key's lanes must sit in one warp");

  // Programmatic dependent launch: let the next kernel (the combine, or whatever follows a single
  // split) be scheduled now, then wait for the previous one (qk_norm_rope_cache writes q and the
  // cache) before reading anything.
  pdl_launch_dependents();
  pdl_wait();

  __shared__ float s_max[kGroups];
  __shared__ float s_sum[kGroups];
  __shared__ __align__(16) float s_out[kGroups][D];

  const int split = blockIdx.x;
  const int head = blockIdx.y;
  const int seq = blockIdx.z;
  const int tid = threadIdx.x;
  const int64_t row = int64_t(seq) * p.num_heads + head;  // (b, h) row of q, out and the partials
  const int kv_len = p.seq_lens[seq];
  if (kv_len == 0) {
    if (p.num_splits == 1 && tid < D / 2)
      reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + row * D)[tid] = pack2<T>(0.f, 0.f);
    return;
  }
  const int split_len = decode_split_len(kv_len, p.num_splits);
  const int k_begin = split * split_len;
  if (k_begin >= kv_len) return;
  const int k_end = min(kv_len, k_begin + split_len);

  const int sub = tid % kLanes;   // which 8 dims of the key this lane holds
  const int group = tid / kLanes;

  float q[kVec];  // this lane's 8 dims of the query, pre-scaled to log2 units
  load8(static_cast<const T*>(p.q) + row * D + sub * kVec, q);
#pragma unroll
  for (int i = 0; i < kVec; ++i) q[i] *= p.scale_log2;

  const int64_t tok_stride = int64_t(p.num_heads) * D;
  const int64_t kv_offset = int64_t(seq) * p.cache_len * tok_stride + head * D + sub * kVec;
  const T* g_k = static_cast<const T*>(p.k_cache) + kv_offset;
  const T* g_v = static_cast<const T*>(p.v_cache) + kv_offset;

  float run_max = -INFINITY;
  float run_sum = 0.f;
  float acc[kVec] = {};
  for (int base = k_begin; base < k_end; base += kStep) {
    uint4 kr[UNROLL], vr[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int key = base + u * kGroups + group;
      if (key < k_end) {
        kr[u] = ld_stream_16(g_k + key * tok_stride);
        vr[u] = ld_stream_16(g_v + key * tok_stride);
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float k[kVec];
      unpack8<T>(kr[u], k);
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) dot = fmaf(q[i], k[i], dot);
      dot = group_sum<kLanes>(dot);
      s[u] = base + u * kGroups + group < k_end ? dot : -INFINITY;
    }
    float mx = s[0];
#pragma unroll
    for (int u = 1; u < UNROLL; ++u) mx = fmaxf(mx, s[u]);
    const float new_max = fmaxf(run_max, mx);
    // A group with no key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    const float ref = new_max == -INFINITY ? 0.f : new_max;
    const float alpha = exp2f(run_max - ref);
    run_max = new_max;
    run_sum *= alpha;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] *= alpha;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const float pr = exp2f(s[u] - ref);
      run_sum += pr;
      float v[kVec];
      unpack8<T>(vr[u], v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = fmaf(pr, v[i], acc[i]);
    }
  }

  // Merge the lane groups: rescale each to the block max, then sum over groups per dim.
  if (sub == 0) {
    s_max[group] = run_max;
    s_sum[group] = run_sum;
  }
  __syncthreads();
  float block_max = -INFINITY;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) block_max = fmaxf(block_max, s_max[g]);
  const float w = exp2f(run_max - block_max);  // the block has >= 1 key, so block_max is finite
  float4* dst = reinterpret_cast<float4*>(&s_out[group][sub * kVec]);
  dst[0] = make_float4(acc[0] * w, acc[1] * w, acc[2] * w, acc[3] * w);
  dst[1] = make_float4(acc[4] * w, acc[5] * w, acc[6] * w, acc[7] * w);
  __syncthreads();
  if (tid < D) {
    float o = 0.f;
    float l = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      o += s_out[g][tid];
      l += s_sum[g] * exp2f(s_max[g] - block_max);
    }
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[row * D + tid] = from_float<T>(o / l);
    } else {
      const int64_t slot = row * p.num_splits + split;
      p.partial_out[slot * D + tid] = o;
      if (tid == 0) {
        p.partial_max[slot] = block_max;
        p.partial_sum[slot] = l;
      }
    }
  }
}

// Grid: (H, B), D threads: out[b, h, d] = sum_s 2^(max_s - M) out_s[d] / sum_s 2^(max_s - M) sum_s.
template <typename T, int D>
__global__ void __launch_bounds__(D) attention_decode_combine_kernel(const DecodeParams p) {
  // Scheduled while the split grid drains (programmatic dependent launch): let the next kernel be
  // scheduled too, and wait until the split grid's writes are visible.
  pdl_launch_dependents();
  pdl_wait();
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int d = threadIdx.x;
  const int64_t row = int64_t(seq) * p.num_heads + head;
  const int kv_len = p.seq_lens[seq];
  if (kv_len == 0) {
    static_cast<T*>(p.out)[row * D + d] = from_float<T>(0.f);
    return;
  }
  const int split_len = decode_split_len(kv_len, p.num_splits);
  const int live = (kv_len + split_len - 1) / split_len;
  const int64_t slot0 = row * p.num_splits;
  float m = -INFINITY;
  for (int s = 0; s < live; ++s) m = fmaxf(m, p.partial_max[slot0 + s]);
  float o = 0.f;
  float l = 0.f;
  for (int s = 0; s < live; ++s) {
    const float w = exp2f(p.partial_max[slot0 + s] - m);
    o = fmaf(w, p.partial_out[(slot0 + s) * D + d], o);
    l = fmaf(w, p.partial_sum[slot0 + s], l);
  }
  static_cast<T*>(p.out)[row * D + d] = from_float<T>(o / l);
}

}  // namespace attention
}  // namespace persimmon_rt
