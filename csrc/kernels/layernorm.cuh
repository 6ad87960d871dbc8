// LayerNorm over the last dim with an optional fused residual add:
//
//   r = round_to_dtype(x + residual);  residual_out = r;  out = (r - mean) / sqrt(var + eps) * weight + bias
//
// One block per row, the whole row in registers (CPT 16-byte chunks per thread, kept packed so a
// 16384-wide row costs 32 registers), statistics in fp32 with the two-pass (mean, then squared
// deviations) formula of the reference. Memory traffic is the minimum: x (and residual) read once,
// out (and residual_out) written once; weight and bias come from L2 after the first rows.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {

constexpr unsigned kLayerNormPrefetchRows = 256;

// Normalises one row held in registers (CPT 16-byte chunks per thread, chunk c = threadIdx.x + i * THREADS,
// zeros past the row) and writes it to `out` ([C], may alias the row's source). Every thread of the block
// calls it (block reductions). Shared by layernorm_kernel and the fused all-reduce + LayerNorm.
template <typename T, int THREADS, int CPT>
__device__ __forceinline__ void layernorm_row(const uint4 (&v)[CPT], const T* __restrict__ weight,
                                              const T* __restrict__ bias, T* out, int hidden, float eps,
                                              float (&scratch)[2][THREADS / 32]) {
  const int chunks = hidden / kVec;
  float sum = 0.f;  // chunks past the row are zeros and add nothing
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    float a[kVec];
    unpack8<T>(v[i], a);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += a[e];
  }
  const float mean = block_sum<THREADS>(sum, scratch[0]) / hidden;

  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    if (threadIdx.x + i * THREADS < chunks) {  // a padding zero's deviation must not count
      float a[kVec];
      unpack8<T>(v[i], a);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sq += (a[e] - mean) * (a[e] - mean);
    }
  }
  const float rstd = rsqrtf(block_sum<THREADS>(sq, scratch[1]) / hidden + eps);

  // Every weight/bias load before the first out store (out may alias x, so the compiler keeps stores
  // and later loads in order): one round trip instead of CPT.
  uint4 w[CPT], b[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = threadIdx.x + i * THREADS;
    if (c < chunks) {
      w[i] = load16(weight + c * kVec);
      b[i] = load16(bias + c * kVec);
    }
  }
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = threadIdx.x + i * THREADS;
    if (c < chunks) {
      float a[kVec], fw[kVec], fb[kVec];
      unpack8<T>(v[i], a);
      unpack8<T>(w[i], fw);
      unpack8<T>(b[i], fb);
#pragma unroll
      for (int e = 0; e < kVec; ++e) a[e] = (a[e] - mean) * rstd * fw[e] + fb[e];
      store8(out + c * kVec, a);
    }
  }
}

template <typename T, int THREADS, int CPT, bool RESIDUAL>
__global__ void __launch_bounds__(THREADS) layernorm_kernel(
    const T* x,                      // [N, C]
    const T* __restrict__ weight,    // [C]
    const T* __restrict__ bias,      // [C]
    T* out,                          // [N, C]  may alias x
    const T* residual,               // [N, C]  (RESIDUAL only)
    T* residual_out,                 // [N, C]  (RESIDUAL only) may alias residual
    int hidden, float eps) {
  __shared__ float scratch[2][THREADS / 32];
  // Programmatic dependent launch: let the next kernel be scheduled; x and residual come from the
  // previous one.
  pdl_launch_dependents();
  pdl_wait();
  const int chunks = hidden / kVec;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * hidden;

  uint4 v[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = threadIdx.x + i * THREADS;
    v[i] = make_uint4(0, 0, 0, 0);
    if (c < chunks) v[i] = load16(x + row + c * kVec);
  }
  // With few rows (decode) the kernel is latency-bound and weight/bias are likely cold: start them
  // towards L2 now, one request per 128-byte line, so the loads after the reductions hit. Many rows
  // find them in L2 already and skip this (the branch is grid-uniform).
  if (gridDim.x <= kLayerNormPrefetchRows) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = threadIdx.x + i * THREADS;
      if (c < chunks && c % 8 == 0) {
        prefetch_l2(weight + c * kVec);
        prefetch_l2(bias + c * kVec);
      }
    }
  }
  if constexpr (RESIDUAL) {
    // All residual loads before the first residual_out store: the two may alias, so the compiler
    // could not hoist a load above an earlier store itself.
    uint4 r[CPT];
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = threadIdx.x + i * THREADS;
      r[i] = make_uint4(0, 0, 0, 0);
      if (c < chunks) r[i] = load16(residual + row + c * kVec);
    }
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = threadIdx.x + i * THREADS;
      float a[kVec], b[kVec];
      unpack8<T>(v[i], a);
      unpack8<T>(r[i], b);
#pragma unroll
      for (int e = 0; e < kVec; ++e) a[e] += b[e];
      v[i] = pack8<T>(a);  // the rounded sum is what gets normalised (zeros past the row stay zeros)
      if (c < chunks) store16(residual_out + row + c * kVec, v[i]);
    }
  }

  layernorm_row<T, THREADS, CPT>(v, weight, bias, out + row, hidden, eps, scratch);
}

}  // namespace persimmon_rt
