// Development harness kernel (benchmarks/attention_variants.cu, `decode`): split-KV decode attention for
// Hopper (sm_90a) that streams the cache with bulk copies. Semantics: persimmon_rt/reference.py::
// attention_decode (the same DecodeParams, partials and combine formula as the shipped
// csrc/kernels/attention_decode.cuh, against which the harness checks it).
//
// In the [B, S, H, D] cache one key of every head is H * D contiguous elements, so a block that takes all
// heads of a range of keys reads two contiguous runs (K and V). One block a (split, sequence), one per
// SM: a producer thread copies STAGE_KEYS keys of K and of V a stage into a ring of STAGES stages with
// cp.async.bulk (evict-first in L2), and 256 consumer threads each hold VECS 8-element vectors of the
// key row (D / 8 lanes a head; warp-contiguous 16-byte shared loads, no bank conflicts), each running
// its head's online softmax over every key of the split: no merge inside the block. The question it
// answers: does a bulk-copy stream read the cache faster than the shipped register streaming, which
// reads it at about the device copy rate? COPIES != kCompute skips the arithmetic (the output is then
// garbage) and copies K and V (kCopyKV), K alone (kCopyK), or V from keys half a sequence away (kCopyKVShifted:
// are two streams at the same offsets of two equally aligned buffers slower than one?).
// The split count is fixed by the batch (one block an SM, CUDA-graph safe); the partials of many splits
// are merged by attention_decode_combine_wide_kernel, which spreads each (sequence, head)'s splits over
// THREADS / D lane groups instead of one loop.
#pragma once

#include <cstdint>

#include "kernels/attention_decode.cuh"
#include "kernels/ptx_sm90.cuh"
#include "bulk_copy.cuh"

namespace persimmon_rt {
namespace attention {

constexpr int kBulkConsumers = 256;  // consumer threads; one more warp issues the copies
constexpr int kBulkSplitAlign = 16;   // keys: short sequences use few splits

__device__ __forceinline__ int bulk_split_len(int kv_len, int num_splits) {
  const int share = (kv_len + num_splits - 1) / num_splits;
  return (share + kBulkSplitAlign - 1) / kBulkSplitAlign * kBulkSplitAlign;
}

// A split's stages: stage i holds keys first + i * STAGE_KEYS .. (at most STAGE_KEYS of them, below end).
// (Stages dealt round-robin to the splits, so that all blocks read neighbouring keys at once, read no
// faster: run A3, benchmarks/RESULTS.md.)
struct BulkStages {
  int first, end, count;
};

template <int STAGE_KEYS>
__device__ __forceinline__ BulkStages bulk_stages(const DecodeParams& p, int split, int kv_len) {
  const int split_len = bulk_split_len(kv_len, p.num_splits);
  const int begin = split * split_len, end = min(kv_len, begin + split_len);
  return {begin, end, begin < end ? (end - begin + STAGE_KEYS - 1) / STAGE_KEYS : 0};
}

__device__ __forceinline__ int bulk_live_splits(const DecodeParams& p, int kv_len) {
  const int split_len = bulk_split_len(kv_len, p.num_splits);
  return (kv_len + split_len - 1) / split_len;
}

// Shared memory of a variant: the ring, then its full / empty barriers and the stages' first keys.
template <typename T, int VECS, int STAGE_KEYS, int STAGES>
constexpr int bulk_decode_smem_bytes() {
  return STAGES * 2 * STAGE_KEYS * kBulkConsumers * kVec * VECS * int(sizeof(T)) + 2 * STAGES * 8 + STAGES * 4;
}

// Grid: (num_splits, B); block: kBulkConsumers + 32 threads; dynamic shared memory bulk_decode_smem_bytes.
// H * D must be kBulkConsumers * 8 * VECS; the cache 16-byte aligned.
enum BulkCopies : int { kCompute = 0, kCopyKV = 1, kCopyK = 2, kCopyKVShifted = 3 };

// DYNAMIC: instead of a fixed share, each block's producer claims the next kClaimStages stages of its
// sequence from claims[seq] (zeroed before the launch), one claim ahead, as the weight ring claims its
// units: no block waits on a slow one at the end. The combine then merges every split (some may have no
// keys). (Claims of one stage, run A5's first form, left the producer waiting on each atomic.)
constexpr int kClaimStages = 8;

template <typename T, int D, int VECS, int STAGE_KEYS, int STAGES, int COPIES, bool DYNAMIC>
__global__ void __launch_bounds__(kBulkConsumers + 32, 1)
    attention_decode_bulk_kernel(const DecodeParams p, unsigned* claims) {
  constexpr int kRowElems = kBulkConsumers * kVec * VECS;  // H * D: one key of every head
  constexpr int kRowBytes = kRowElems * int(sizeof(T));
  constexpr int kLanes = D / kVec;                         // lanes sharing one head
  static_assert(32 % kLanes == 0, "a head's lanes must sit in one warp");
  // Programmatic dependent launch: the previous kernel wrote q and the newest key.
  pdl_launch_dependents();
  pdl_wait();
#ifdef PRT_SM90A
  extern __shared__ __align__(128) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);  // [STAGES][K, V][STAGE_KEYS][kRowElems]
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * 2 * STAGE_KEYS * kRowBytes);
  uint64_t* empty = full + STAGES;
  int* stage_key = reinterpret_cast<int*>(empty + STAGES);  // a stage's first key; -1: no more stages

  const int split = blockIdx.x;
  const int seq = blockIdx.y;
  const int tid = threadIdx.x;
  const int kv_len = p.seq_lens[seq];
  const int64_t seq_elems = int64_t(seq) * kRowElems;  // this sequence's q / out row (all heads)
  if (kv_len == 0) {  // an idle row: zeros (the combine writes them when there are splits)
    if (p.num_splits == 1 && split == 0 && tid < kBulkConsumers) {
#pragma unroll
      for (int i = 0; i < VECS; ++i)
        store16(static_cast<T*>(p.out) + seq_elems + (i * kBulkConsumers + tid) * kVec, make_uint4(0, 0, 0, 0));
    }
    return;
  }
  const BulkStages st = bulk_stages<STAGE_KEYS>(p, split, kv_len);
  if (!DYNAMIC && st.count == 0) return;
  const int end = DYNAMIC ? kv_len : st.end;
  constexpr int kClaimKeys = kClaimStages * STAGE_KEYS;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbar_init(&full[s], 1);
      sm90::mbar_init(&empty[s], kBulkConsumers / 32);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer warp leaves below

  if (tid >= kBulkConsumers) {
    if (tid == kBulkConsumers) {
      const uint64_t policy = harness::evict_first_policy();
      const T* k_src = static_cast<const T*>(p.k_cache) + int64_t(seq) * p.cache_len * kRowElems;
      const T* v_src = static_cast<const T*>(p.v_cache) + int64_t(seq) * p.cache_len * kRowElems;
      unsigned claim = DYNAMIC ? atomicAdd(claims + seq, 1u) : 0;
      unsigned next_claim = DYNAMIC ? atomicAdd(claims + seq, 1u) : 0;  // its latency hides behind a claim
      for (int s = 0;; ++s) {
        const int slot = s % STAGES;
        int key0 = s < st.count ? st.first + s * STAGE_KEYS : -1;
        if (DYNAMIC) {
          if (s > 0 && s % kClaimStages == 0) {
            claim = next_claim;
            next_claim = atomicAdd(claims + seq, 1u);
          }
          const int64_t first = int64_t(claim) * kClaimKeys + (s % kClaimStages) * STAGE_KEYS;
          key0 = first < kv_len ? static_cast<int>(first) : -1;  // later claims are all past the end
        }
        sm90::mbar_wait(&empty[slot], ((s / STAGES) & 1) ^ 1);
        stage_key[slot] = key0;
        if (key0 < 0) {
          sm90::mbar_arrive(&full[slot]);  // the end (the arrival releases stage_key)
          break;
        }
        const uint32_t bytes = min(STAGE_KEYS, end - key0) * kRowBytes;
        sm90::mbar_arrive_expect_tx(&full[slot], COPIES == kCopyK ? bytes : 2 * bytes);
        T* dst = ring + slot * 2 * STAGE_KEYS * kRowElems;
        harness::bulk_copy_evict_first(dst, k_src + int64_t(key0) * kRowElems, bytes, &full[slot], policy);
        const int v_key = COPIES == kCopyKVShifted ? (key0 + kv_len / 2) % (kv_len - STAGE_KEYS + 1) : key0;
        if (COPIES != kCopyK)
          harness::bulk_copy_evict_first(dst + STAGE_KEYS * kRowElems, v_src + int64_t(v_key) * kRowElems, bytes,
                                         &full[slot], policy);
      }
    }
    return;
  }

  // Vector i of this thread: elements (i * kBulkConsumers + tid) * 8 .. + 7 of the key row, i.e. of
  // head (i * kBulkConsumers + tid) / kLanes.
  float q[VECS][kVec], acc[VECS][kVec], run_max[VECS], run_sum[VECS];
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    load8(static_cast<const T*>(p.q) + seq_elems + (i * kBulkConsumers + tid) * kVec, q[i]);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      q[i][e] *= p.scale_log2;
      acc[i][e] = 0.f;
    }
    run_max[i] = -INFINITY;
    run_sum[i] = 0.f;
  }

  for (int s = 0;; ++s) {
    const int slot = s % STAGES;
    sm90::mbar_wait(&full[slot], (s / STAGES) & 1);
    const int key0 = stage_key[slot];
    if (key0 < 0) break;
    const int n = min(STAGE_KEYS, end - key0);  // keys in this stage (block-uniform)
    if (COPIES != kCompute) {
      __syncwarp();
      if (tid % 32 == 0) sm90::mbar_arrive(&empty[slot]);
      continue;
    }
    const uint4* ks = reinterpret_cast<const uint4*>(ring + slot * 2 * STAGE_KEYS * kRowElems);
    const uint4* vs = ks + STAGE_KEYS * kRowElems / kVec;
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      float sc[STAGE_KEYS];
#pragma unroll
      for (int j = 0; j < STAGE_KEYS; ++j) {
        float k[kVec];
        unpack8<T>(j < n ? ks[j * (kRowElems / kVec) + i * kBulkConsumers + tid] : make_uint4(0, 0, 0, 0), k);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(q[i][e], k[e], dot);
        dot = group_sum<kLanes>(dot);
        sc[j] = j < n ? dot : -INFINITY;
      }
      float mx = sc[0];
#pragma unroll
      for (int j = 1; j < STAGE_KEYS; ++j) mx = fmaxf(mx, sc[j]);
      const float new_max = fmaxf(run_max[i], mx);  // finite: the stage has a key
      const float alpha = exp2f(run_max[i] - new_max);
      run_max[i] = new_max;
      run_sum[i] *= alpha;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[i][e] *= alpha;
#pragma unroll
      for (int j = 0; j < STAGE_KEYS; ++j) {
        if (j < n) {  // past n the slot holds an older stage's values (maybe inf or NaN)
          const float pr = exp2f(sc[j] - new_max);
          run_sum[i] += pr;
          float v[kVec];
          unpack8<T>(vs[j * (kRowElems / kVec) + i * kBulkConsumers + tid], v);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[i][e] = fmaf(pr, v[e], acc[i][e]);
        }
      }
    }
    __syncwarp();
    if (tid % 32 == 0) sm90::mbar_arrive(&empty[slot]);
  }

#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int elem = (i * kBulkConsumers + tid) * kVec;  // head * D + d0
    if (p.num_splits == 1) {
      float o[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) o[e] = acc[i][e] / run_sum[i];
      store8(static_cast<T*>(p.out) + seq_elems + elem, o);
    } else {
      const int64_t slot = (int64_t(seq) * p.num_heads + elem / D) * p.num_splits + split;
      float4* dst = reinterpret_cast<float4*>(p.partial_out + slot * D + elem % D);
      dst[0] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      dst[1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
      if (elem % D == 0) {
        p.partial_max[slot] = run_max[i];
        p.partial_sum[slot] = run_sum[i];
      }
    }
  }
#endif
}

// Grid: (H, B), THREADS threads: the combine of attention_decode_combine_kernel for many splits. Lane
// group g (THREADS / D of them) takes splits g, g + G, ...; the groups are merged in shared memory.
template <typename T, int D, int THREADS, bool DYNAMIC>
__global__ void __launch_bounds__(THREADS) attention_decode_combine_wide_kernel(const DecodeParams p) {
  constexpr int G = THREADS / D;
  static_assert(THREADS % D == 0 && G >= 1, "whole lane groups of D");
  __shared__ float s_max[G], s_sum[G];
  __shared__ float s_out[G][D];
  pdl_launch_dependents();
  pdl_wait();
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int d = threadIdx.x % D;
  const int g = threadIdx.x / D;
  const int64_t row = int64_t(seq) * p.num_heads + head;
  const int kv_len = p.seq_lens[seq];
  if (kv_len == 0) {
    if (g == 0) static_cast<T*>(p.out)[row * D + d] = from_float<T>(0.f);
    return;
  }
  const int live = DYNAMIC ? p.num_splits : bulk_live_splits(p, kv_len);
  const int64_t slot0 = row * p.num_splits;
  float m = -INFINITY;
#pragma unroll 4
  for (int s = g; s < live; s += G) m = fmaxf(m, p.partial_max[slot0 + s]);
  float o = 0.f, l = 0.f;
#pragma unroll 4
  for (int s = g; s < live; s += G) {
    const float split_max = p.partial_max[slot0 + s];  // -inf: a split without keys (DYNAMIC)
    const float w = split_max == -INFINITY ? 0.f : exp2f(split_max - m);
    o = fmaf(w, p.partial_out[(slot0 + s) * D + d], o);
    l = fmaf(w, p.partial_sum[slot0 + s], l);
  }
  s_out[g][d] = o;
  if (d == 0) {
    s_max[g] = m;  // -inf for a group without splits (its o and l are 0)
    s_sum[g] = l;
  }
  __syncthreads();
  if (g != 0) return;
  float block_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < G; ++j) block_max = fmaxf(block_max, s_max[j]);
  float out = 0.f, sum = 0.f;
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const float w = s_max[j] == -INFINITY ? 0.f : exp2f(s_max[j] - block_max);  // some split has keys
    out = fmaf(w, s_out[j][d], out);
    sum = fmaf(w, s_sum[j], sum);
  }
  static_cast<T*>(p.out)[row * D + d] = from_float<T>(out / sum);
}

}  // namespace attention
}  // namespace persimmon_rt
