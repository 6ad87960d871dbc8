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
// qkv_attention_decode_split_kernel (below) is the same split kernel with the new token's
// QK-LayerNorm, rotary and cache write in front, reading the raw projection instead of q.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention_common.cuh"
#include "qk_norm_rope_cache.cuh"

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

// The keys [k_begin, k_end) of one split of (seq, head), 1 <= k_end - k_begin: each lane group runs
// its own online softmax, the block merges the groups and writes out[row] (one split) or the split's
// partials. q: this lane's 8 dims of the query, pre-scaled to log2 units. With NEW_KEY and `has_new`,
// the split's last key k_end - 1 comes from shared memory (new_kv: k then v, [2][D / 8] 16-byte chunks)
// instead of the cache.
template <typename T, int D, int THREADS, int UNROLL, bool NEW_KEY>
__device__ __forceinline__ void decode_split_attend(const DecodeParams& p, int seq, int head, int split, int k_begin,
                                                    int k_end, const float (&q)[kVec], const uint4* new_kv,
                                                    bool has_new) {
  constexpr int kLanes = D / kVec;            // lanes sharing one key
  constexpr int kGroups = THREADS / kLanes;   // keys per load round
  constexpr int kStep = kGroups * UNROLL;     // keys per loop iteration
  static_assert(32 % kLanes == 0, "a key's lanes must sit in one warp");

  __shared__ float s_max[kGroups];
  __shared__ float s_sum[kGroups];
  __shared__ __align__(16) float s_out[kGroups][D];

  const int tid = threadIdx.x;
  const int64_t row = int64_t(seq) * p.num_heads + head;  // (b, h) row of q, out and the partials
  const int sub = tid % kLanes;   // which 8 dims of the key this lane holds
  const int group = tid / kLanes;

  const int64_t tok_stride = int64_t(p.num_heads) * D;
  const int64_t kv_offset = int64_t(seq) * p.cache_len * tok_stride + head * D + sub * kVec;
  const T* g_k = static_cast<const T*>(p.k_cache) + kv_offset;
  const T* g_v = static_cast<const T*>(p.v_cache) + kv_offset;

  float run_max = -INFINITY;
  float run_sum = 0.f;
  float acc[kVec] = {};
  // One loop step: UNROLL keys a lane group, base + u * kGroups + group. PATCH: the new key may be
  // among them (only the last step's can be).
  const auto step = [&](int base, auto patch) {
    uint4 kr[UNROLL], vr[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int key = base + u * kGroups + group;
      if (key < k_end) {
        if (decltype(patch)::value && has_new && key == k_end - 1) {
          kr[u] = new_kv[sub];
          vr[u] = new_kv[kLanes + sub];
        } else {
          kr[u] = ld_stream_16(g_k + key * tok_stride);
          vr[u] = ld_stream_16(g_v + key * tok_stride);
        }
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
  };
  if constexpr (NEW_KEY) {
    // The same steps as below, the last one peeled: the hot loop carries no new-key test (which cost
    // registers it does not have to spare).
    const int last = k_begin + (k_end - 1 - k_begin) / kStep * kStep;
    for (int base = k_begin; base < last; base += kStep) step(base, std::false_type{});
    step(last, std::true_type{});
  } else {
    for (int base = k_begin; base < k_end; base += kStep) step(base, std::false_type{});
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

// Zeros for an idle sequence's (seq, head) output row; with several splits the combine writes them.
template <typename T, int D>
__device__ __forceinline__ void decode_idle_output(const DecodeParams& p, int seq, int head) {
  const int64_t row = int64_t(seq) * p.num_heads + head;
  if (p.num_splits == 1 && threadIdx.x < D / 2)
    reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + row * D)[threadIdx.x] = pack2<T>(0.f, 0.f);
}

// Grid: (num_splits, H, B). MIN_BLOCKS caps registers so that many blocks stay resident.
template <typename T, int D, int THREADS, int UNROLL, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) attention_decode_split_kernel(const DecodeParams p) {
  // Programmatic dependent launch: let the next kernel (the combine, or whatever follows a single
  // split) be scheduled now, then wait for the previous one (qk_norm_rope_cache writes q and the
  // cache) before reading anything.
  pdl_launch_dependents();
  pdl_wait();

  const int split = blockIdx.x;
  const int head = blockIdx.y;
  const int seq = blockIdx.z;
  const int kv_len = p.seq_lens[seq];
  if (kv_len == 0) {
    decode_idle_output<T, D>(p, seq, head);
    return;
  }
  const int split_len = decode_split_len(kv_len, p.num_splits);
  const int k_begin = split * split_len;
  if (k_begin >= kv_len) return;
  const int k_end = min(kv_len, k_begin + split_len);

  float q[kVec];  // this lane's 8 dims of the query, pre-scaled to log2 units
  load8(static_cast<const T*>(p.q) + (int64_t(seq) * p.num_heads + head) * D + threadIdx.x % (D / kVec) * kVec, q);
#pragma unroll
  for (int i = 0; i < kVec; ++i) q[i] *= p.scale_log2;
  decode_split_attend<T, D, THREADS, UNROLL, false>(p, seq, head, split, k_begin, k_end, q, nullptr, false);
}

// ---- qkv_attention_decode: QK-LayerNorm + rotary + cache write of the new token, fused in -------------
// Semantics: persimmon_rt/reference.py::qkv_attention_decode (= qk_norm_rope_cache, then attention_decode).
// Every block that has keys recomputes the new token's q and k from the raw qkv row of its (b, h) (one
// 16-byte load a lane of an L2-resident row, a D-wide LayerNorm and R/2 sin/cos) and takes the new key
// from shared memory, so no block waits for another; split 0 alone writes k and v into the cache. This
// replaces a kernel boundary a layer (launch, ramp-up, the dependency wait) and q's round trip through
// memory. The arithmetic is qk_norm_rope_cache's, statement for statement (rope_sincos, load_affine, the
// LayerNorm dividing by a runtime head_dim), q and k are rounded to T where that kernel stores them, and
// the splits and key order are attention_decode's, so the result should equal the unfused pair's bit
// for bit (tests/test_qkv_attention_decode.py checks it).
//
// The cache write does not race the streaming loads (ld.global.nc assumes data the kernel does not
// write): for an active row the slot is the last key, b * S + seq_lens[b] - 1, which every block takes
// from shared memory instead; an idle row (seq_lens[b] == 0) writes inside its own cache row, which no
// block reads. The writer checks this and traps otherwise.

struct QkvDecodeParams {
  DecodeParams attn;         // q unused; k_cache / v_cache are also written (at slot_mapping)
  const void* qkv;           // [B, H, 3, D]  strides (stride_b, stride_h, stride_s, 1)
  const void* positions;     // [B] int32 / int64
  const float* inv_freq;     // [R / 2]
  const void* q_weight;      // [D] or null (null: no LayerNorm)
  const void* q_bias;        // [D] or null
  const void* k_weight;      // [D] or null
  const void* k_bias;        // [D] or null
  const void* slot_mapping;  // [B] int32 / int64
  int64_t stride_b, stride_h, stride_s;
  int head_dim;              // D at run time: the LayerNorm's divisor, as in qk_norm_rope_cache
  int rotary_dim;            // R
  bool positions_int64, slots_int64;
  float eps;
};

// The new token of (seq, head): q, k (normalised, rotated, rounded to T) and v, as [3][D / 8] 16-byte
// chunks in `s_new`; split 0 also writes k and v at `slot`. Every thread of the block must call it.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void qkv_new_token(const QkvDecodeParams& p, int seq, int head, bool writer, int64_t slot,
                                              uint4 (*s_new)[D / kVec]) {
  constexpr int kLanes = D / kVec;
  static_assert(THREADS >= 3 * kLanes && THREADS % 32 == 0, "one lane per 8 dims of q, k and v");
  __shared__ float s_cos[D / 2], s_sin[D / 2];
  __shared__ float s_rot[2][D];  // LayerNorm'd q and k: the rotate-half partners

  const int tid = threadIdx.x;
  const int part = tid / kLanes;  // 0: q, 1: k, 2: v, 3+: no vector (zeros through the shuffles)
  const int d0 = (tid % kLanes) * kVec;
  const int R = p.rotary_dim, half = R / 2;
  uint4 raw = make_uint4(0, 0, 0, 0);
  if (part < 3)
    raw = load16(static_cast<const T*>(p.qkv) + seq * p.stride_b + head * p.stride_h + part * p.stride_s + d0);
  const float pos = static_cast<float>(load_index(p.positions, p.positions_int64, seq));
  for (int j = tid; j < half; j += THREADS) rope_sincos(pos * p.inv_freq[j], s_sin[j], s_cos[j]);

  float x[kVec];
  unpack8<T>(raw, x);
  if (p.q_weight != nullptr) {  // as the reference: both LayerNorms or neither
    // Groups of kLanes lanes are aligned in a warp: q's and k's statistics never mix, and every lane
    // runs the shuffles (idle ones hold zeros).
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += x[e];
    sum = group_sum<kLanes>(sum);
    const float mean = sum / p.head_dim;
    float sq = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) sq += (x[e] - mean) * (x[e] - mean);
    sq = group_sum<kLanes>(sq);
    const float rstd = rsqrtf(sq / p.head_dim + p.eps);
    float w[kVec], b[kVec];
    unpack8<T>(load_affine<T>(part == 1 ? p.k_weight : p.q_weight, d0, part < 2, 1.f), w);
    unpack8<T>(load_affine<T>(part == 1 ? p.k_bias : p.q_bias, d0, part < 2, 0.f), b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) x[e] = (x[e] - mean) * rstd * w[e] + b[e];
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e)
    if (part < 2 && d0 + e < R) s_rot[part][d0 + e] = x[e];
  __syncthreads();  // s_rot, s_cos, s_sin
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const int i = d0 + e;
    if (part < 2 && i < R) {
      // out[i] = x[i] cos - x[i + R/2] sin  (i < R/2);  out[i] = x[i] cos + x[i - R/2] sin  (i >= R/2)
      const bool first = i < half;
      const int j = first ? i : i - half, partner = first ? i + half : i - half;
      const float c = s_cos[j], s = first ? -s_sin[j] : s_sin[j];
      x[e] = x[e] * c + s_rot[part][partner] * s;
    }
  }
  if (part < 3) {
    const uint4 v = part < 2 ? pack8<T>(x) : raw;
    s_new[part][d0 / kVec] = v;
    if (writer && part > 0) {
      void* cache = part == 1 ? const_cast<void*>(p.attn.k_cache) : const_cast<void*>(p.attn.v_cache);
      store16(static_cast<T*>(cache) + (slot * p.attn.num_heads + head) * D + d0, v);
    }
  }
  __syncthreads();  // s_new
}

// Grid: (num_splits, H, B), as attention_decode_split_kernel; the combine kernel is shared.
template <typename T, int D, int THREADS, int UNROLL, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) qkv_attention_decode_split_kernel(const QkvDecodeParams p) {
  // Programmatic dependent launch: qkv comes from the previous kernel (the QKV GEMV).
  pdl_launch_dependents();
  pdl_wait();

  __shared__ uint4 s_new[3][D / kVec];  // the new token's q, k, v

  const DecodeParams& a = p.attn;
  const int split = blockIdx.x;
  const int head = blockIdx.y;
  const int seq = blockIdx.z;
  const int kv_len = a.seq_lens[seq];
  const bool writer = split == 0;
  const int split_len = kv_len > 0 ? decode_split_len(kv_len, a.num_splits) : 0;
  const int k_begin = split * split_len;
  if (!writer && k_begin >= kv_len) return;  // no keys and nothing to write

  const int64_t slot = load_index(p.slot_mapping, p.slots_int64, seq);
  const int64_t row_begin = int64_t(seq) * a.cache_len;
  if (writer && (slot < row_begin || slot >= row_begin + a.cache_len ||
                 (kv_len > 0 && slot != row_begin + kv_len - 1))) {
    if (threadIdx.x == 0 && head == 0)
      printf("persimmon_rt qkv_attention_decode: slot_mapping[%d] = %lld, seq_lens[%d] = %d: the slot must be "
             "b * S + seq_lens[b] - 1 (S = %d), or in row b when seq_lens[b] = 0\n",
             seq, static_cast<long long>(slot), seq, kv_len, a.cache_len);
    __trap();
  }

  qkv_new_token<T, D, THREADS>(p, seq, head, writer, slot, s_new);
  if (kv_len == 0) {
    decode_idle_output<T, D>(a, seq, head);
    return;
  }
  const int k_end = min(kv_len, k_begin + split_len);

  float q[kVec];  // as attention_decode_split_kernel, from the rounded q
  unpack8<T>(s_new[0][threadIdx.x % (D / kVec)], q);
#pragma unroll
  for (int i = 0; i < kVec; ++i) q[i] *= a.scale_log2;
  decode_split_attend<T, D, THREADS, UNROLL, true>(a, seq, head, split, k_begin, k_end, q, s_new[1],
                                                  k_end == kv_len);
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
