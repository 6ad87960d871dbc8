// The greedy decode step's tail in two launches: every row's argmax over its fp32 logits (the next token),
// then each row's move to the next position. Semantics: persimmon_rt/reference.py::greedy_advance.
//
// torch's argmax plus the four one-element updates of DecodeState.advance were six launches, ~15 us of a
// 4.4 ms step at batch 1, the argmax alone 8 us: its 32 blocks read the 1 MB of logits slowly. Here up to
// kGreedyMaxChunks blocks a row each reduce a contiguous chunk to its best (value, index) pair, and one
// block a row reduces those, writes the token and advances the row. The order matches torch.argmax: a NaN
// beats every number, and among equals the lowest index wins, so the result is independent of the chunking.
#pragma once

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {
namespace sampling {

constexpr int kGreedyThreads = 256;
constexpr int kGreedyMaxChunks = 128;      // chunks a row, at most (the finishing block reduces them)
constexpr int kGreedyChunkFloats = 4096;   // floats a chunk, at least (16 KB: a few loads per thread)

// How a row of `vocab` values is cut into chunks (one block each): at least kGreedyChunkFloats a chunk, at
// most kGreedyMaxChunks chunks, chunks a multiple of 4 values so that 16-byte loads stay aligned.
struct RowChunking {
  int64_t chunk;  // values a chunk
  int chunks;     // chunks a row
};

inline RowChunking row_chunking(int64_t vocab) {
  int64_t wanted = ceil_div(vocab, kGreedyChunkFloats);
  wanted = wanted < 1 ? 1 : (wanted > kGreedyMaxChunks ? kGreedyMaxChunks : wanted);
  const int64_t chunk = ceil_div(ceil_div(vocab, wanted), 4) * 4;
  return {chunk, static_cast<int>(ceil_div(vocab, chunk))};
}

struct ArgmaxPair {
  float value;
  int index;  // INT_MAX: no element seen
};

__device__ __forceinline__ bool is_nan_bits(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// Whether (a) ranks before (b) in torch.argmax's order. Written on the bits so fast-math cannot drop it.
__device__ __forceinline__ bool argmax_before(const ArgmaxPair& a, const ArgmaxPair& b) {
  const bool na = is_nan_bits(a.value), nb = is_nan_bits(b.value);
  if (na != nb) return na;
  if (a.value != b.value && !na) return a.value > b.value;
  return a.index < b.index;
}

__device__ __forceinline__ ArgmaxPair better(const ArgmaxPair& a, const ArgmaxPair& b) {
  return argmax_before(a, b) ? a : b;
}

// The block's best pair (valid in every thread after the call). Every thread must call it.
__device__ __forceinline__ ArgmaxPair block_best(ArgmaxPair mine) {
  __shared__ ArgmaxPair s_warp[kGreedyThreads / 32];
  __shared__ ArgmaxPair s_best;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    ArgmaxPair other{__shfl_xor_sync(0xffffffffu, mine.value, off), __shfl_xor_sync(0xffffffffu, mine.index, off)};
    mine = better(mine, other);
  }
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = mine;
  __syncthreads();
  if (threadIdx.x < 32) {
    mine = threadIdx.x < kGreedyThreads / 32 ? s_warp[threadIdx.x] : ArgmaxPair{-INFINITY, INT_MAX};
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      ArgmaxPair other{__shfl_xor_sync(0xffffffffu, mine.value, off), __shfl_xor_sync(0xffffffffu, mine.index, off)};
      mine = better(mine, other);
    }
    if (threadIdx.x == 0) s_best = mine;
  }
  __syncthreads();
  return s_best;
}

// Grid (chunks, B): block (c, b) writes the best pair of logits[b, c * chunk : (c + 1) * chunk) to
// partial[b * chunks + c]. vec4: V % 4 == 0 and logits 16-byte aligned.
template <bool VEC4>
__global__ void __launch_bounds__(kGreedyThreads) argmax_chunks_kernel(const float* logits, int64_t vocab,
                                                                      int64_t chunk, ArgmaxPair* partial) {
  // Programmatic dependent launch: the logits come from the previous kernel (the lm_head GEMV).
  pdl_launch_dependents();
  pdl_wait();
  const int64_t row = blockIdx.y, begin = blockIdx.x * chunk, end = min(vocab, begin + chunk);
  const float* x = logits + row * vocab;
  ArgmaxPair best{-INFINITY, INT_MAX};
  if constexpr (VEC4) {
#pragma unroll 4
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kGreedyThreads) {
      const float4 v = *reinterpret_cast<const float4*>(x + i);  // chunk and begin are multiples of 4
      best = better(best, {v.x, static_cast<int>(i)});
      best = better(best, {v.y, static_cast<int>(i + 1)});
      best = better(best, {v.z, static_cast<int>(i + 2)});
      best = better(best, {v.w, static_cast<int>(i + 3)});
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kGreedyThreads) best = better(best, {x[i], static_cast<int>(i)});
  }
  best = block_best(best);
  if (threadIdx.x == 0) partial[row * gridDim.x + blockIdx.x] = best;
}

// Grid (B): row b's token from its chunks' pairs, then the row moves on by active[b] (0 or 1). (A template
// only so that every file including this header may define it.)
template <int THREADS = kGreedyThreads>
__global__ void __launch_bounds__(THREADS) greedy_finish_kernel(const ArgmaxPair* partial, int chunks,
                                                               int64_t* tokens, int64_t* positions, int64_t* slots,
                                                               int32_t* seq_lens, const int32_t* active) {
  static_assert(THREADS == kGreedyThreads, "block_best is sized for kGreedyThreads");
  pdl_launch_dependents();
  pdl_wait();
  const int row = blockIdx.x;
  ArgmaxPair best{-INFINITY, INT_MAX};
  for (int c = threadIdx.x; c < chunks; c += THREADS) best = better(best, partial[row * chunks + c]);
  best = block_best(best);
  if (threadIdx.x == 0) {
    tokens[row] = best.index;
    const int32_t step = active[row];
    positions[row] += step;
    slots[row] += step;
    seq_lens[row] += step;
  }
}

}  // namespace sampling
}  // namespace persimmon_rt
