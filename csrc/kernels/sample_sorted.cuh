// Sampling with temperature, top-k and top-p from the sorted logits, after torch.sort: the softmax, both
// filters and the exponential race in three launches. Semantics: persimmon_rt/reference.py::sample_sorted.
//
// torch's version (sampling.py before this op) ran ~45 kernels a step: 0.22 ms at batch 1 and 0.72 ms at
// batch 8, most of it a one-block-a-row cumsum over the 262144 sorted probabilities. Here each row is cut
// into chunks of ranks; every chunk block:
//   1. sums e_r = exp((s_r - s_0) / T) over its ranks r < k (s sorted descending, so s_0 is the max);
//   2. takes its offset from the earlier chunks' sums, scans its ranks (before_r = sum of e_j, j < r), keeps
//      rank r if r == 0 or before_r < top_p * Z (Z the row's sum: the unnormalised form of torch's
//      cumsum(probs) - probs < top_p), and reduces e_r / noise_r over the kept ranks to its best;
//   3. one block a row picks the best chunk's rank and writes order[rank]; a row with temperature <= 0
//      takes the argmax of its raw logits instead (greedy_advance.cuh's order), as torch.where did.
// The noise is torch's exponential_ over the sorted positions, so a seed draws what it drew before.
#pragma once

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "greedy_advance.cuh"
#include "ptx.cuh"

namespace persimmon_rt {
namespace sampling {

constexpr int kSampleThreads = kGreedyThreads;
constexpr float kMinTemperature = 1e-6f;   // as sampling.py: temperature.clamp_min(1e-6)

struct SampleParams {
  const float* logits;          // [B, V]  raw (temperature-0 rows take their argmax)
  const float* sorted_logits;   // [B, V]  descending
  const int64_t* order;         // [B, V]  index of each sorted position
  const float* noise;           // [B, V]  Exp(1) draws, one per sorted position
  const float* temperature;     // [B]
  const int64_t* top_k;         // [B]  <= 0: off
  const float* top_p;           // [B]
  int64_t* tokens;              // [B]  out
  float* chunk_sum;             // [B, chunks]  workspace
  ArgmaxPair* chunk_best;       // [B, chunks]  the race's best rank a chunk (argmax of logits for T <= 0)
  int64_t vocab;
  int64_t chunk;                // ranks a chunk
  int chunks;
};

__device__ __forceinline__ int64_t row_k(const SampleParams& p, int64_t row) {
  const int64_t k = p.top_k[row];
  return k <= 0 || k > p.vocab ? p.vocab : k;
}

// A sampled row's sorted logits s and what turns them into weights relative to the row's max:
// e_r = exp((s_r - s_0) / T) = exp2((s_r - s_0) * scale_log2).
struct SortedRow {
  const float* s;
  float s0;
  float scale_log2;

  __device__ __forceinline__ SortedRow(const SampleParams& p, int64_t row)
      : s(p.sorted_logits + row * p.vocab),
        s0(s[0]),
        scale_log2(1.4426950408889634f / fmaxf(p.temperature[row], kMinTemperature)) {}

  __device__ __forceinline__ float weight(int64_t r) const { return exp2f((s[r] - s0) * scale_log2); }
};

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float s_warp[kSampleThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kSampleThreads / 32; ++w) total += s_warp[w];
  __syncthreads();  // s_warp is reused by the next call
  return total;
}

// Exclusive prefix of v over the block's threads, in thread order.
__device__ __forceinline__ float block_exclusive_scan(float v) {
  __shared__ float s_warp[kSampleThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float inclusive = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float up = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += up;
  }
  if (lane == 31) s_warp[warp] = inclusive;
  __syncthreads();
  float warp_offset = 0.f;
#pragma unroll
  for (int w = 0; w < kSampleThreads / 32; ++w)
    if (w < warp) warp_offset += s_warp[w];
  __syncthreads();
  return warp_offset + inclusive - v;
}

// (The kernels are templates only so that every file including this header may define them.)

// Grid (chunks, B). Step 1, and for temperature-0 rows the chunk's argmax of the raw logits.
template <int THREADS = kSampleThreads>
__global__ void __launch_bounds__(THREADS) sample_chunk_sums_kernel(const SampleParams p) {
  static_assert(THREADS == kSampleThreads, "the block reductions are sized for kSampleThreads");
  // Programmatic dependent launch: the sorted logits and the noise come from the kernels before.
  pdl_launch_dependents();
  pdl_wait();
  const int64_t row = blockIdx.y, begin = blockIdx.x * p.chunk, end = min(p.vocab, begin + p.chunk);
  const float t = p.temperature[row];
  if (t <= 0.f) {
    const float* x = p.logits + row * p.vocab;
    ArgmaxPair best{-INFINITY, INT_MAX};
    for (int64_t i = begin + threadIdx.x; i < end; i += kSampleThreads) best = better(best, {x[i], static_cast<int>(i)});
    best = block_best(best);
    if (threadIdx.x == 0) p.chunk_best[row * p.chunks + blockIdx.x] = best;
    return;
  }
  const SortedRow sorted(p, row);
  const int64_t stop = min(end, row_k(p, row));
  float sum = 0.f;
  for (int64_t r = begin + threadIdx.x; r < stop; r += kSampleThreads) sum += sorted.weight(r);
  sum = block_sum(sum);
  if (threadIdx.x == 0) p.chunk_sum[row * p.chunks + blockIdx.x] = sum;
}

// Grid (chunks, B). Step 2: each thread scans a contiguous run of the chunk's ranks.
template <int THREADS = kSampleThreads>
__global__ void __launch_bounds__(THREADS) sample_chunk_race_kernel(const SampleParams p) {
  static_assert(THREADS == kSampleThreads, "the block reductions are sized for kSampleThreads");
  pdl_launch_dependents();
  pdl_wait();
  const int64_t row = blockIdx.y;
  if (p.temperature[row] <= 0.f) return;
  const int64_t begin = blockIdx.x * p.chunk, end = min(p.vocab, begin + p.chunk);
  const float* sums = p.chunk_sum + row * p.chunks;
  float offset = 0.f, z = 0.f;
  for (int c = 0; c < p.chunks; ++c) {  // a few dozen floats, the same for every thread
    z += sums[c];
    if (c < static_cast<int>(blockIdx.x)) offset += sums[c];
  }
  const SortedRow sorted(p, row);
  const float* noise = p.noise + row * p.vocab;
  const int64_t k = row_k(p, row);
  const float mass = p.top_p[row] * z;
  const int64_t run = (end - begin + kSampleThreads - 1) / kSampleThreads;
  const int64_t r0 = begin + threadIdx.x * run, r1 = min(end, r0 + run);
  float mine = 0.f;
  for (int64_t r = r0; r < min(r1, k); ++r) mine += sorted.weight(r);
  float before = offset + block_exclusive_scan(mine);
  ArgmaxPair best{-INFINITY, INT_MAX};
  for (int64_t r = r0; r < min(r1, k); ++r) {
    const float e = sorted.weight(r);
    if (r == 0 || before < mass) best = better(best, {e / noise[r], static_cast<int>(r)});
    before += e;
  }
  best = block_best(best);
  if (threadIdx.x == 0) p.chunk_best[row * p.chunks + blockIdx.x] = best;
}

// Grid (B). Step 3.
template <int THREADS = kSampleThreads>
__global__ void __launch_bounds__(THREADS) sample_finish_kernel(const SampleParams p) {
  static_assert(THREADS == kSampleThreads, "the block reductions are sized for kSampleThreads");
  pdl_launch_dependents();
  pdl_wait();
  const int64_t row = blockIdx.x;
  const bool greedy = p.temperature[row] <= 0.f;
  const int64_t k = row_k(p, row);
  ArgmaxPair best{-INFINITY, INT_MAX};
  for (int c = threadIdx.x; c < p.chunks; c += kSampleThreads)
    if (greedy || c * p.chunk < k) best = better(best, p.chunk_best[row * p.chunks + c]);
  best = block_best(best);
  if (threadIdx.x == 0) {
    const int64_t at = best.index == INT_MAX ? 0 : best.index;  // no kept rank (NaN logits): the first
    p.tokens[row] = greedy ? at : p.order[row * p.vocab + at];
  }
}

}  // namespace sampling
}  // namespace persimmon_rt
