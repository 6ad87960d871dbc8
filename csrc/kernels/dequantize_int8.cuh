// Dequantization of an int8 weight with per-row fp32 scales: out[n, k] = round_T(w[n, k] * scale[n]),
// the product in fp32, rounded once. Prefill runs each projection's dequantized copy through cuBLAS, so
// this is a pure stream (1 byte read, 2 written per weight). Each thread takes kDequantUnroll groups of 16
// weights a step, grid-stride, and issues all their 16-byte loads before its first store: with one load in
// flight per thread the stream was latency-bound (2.65 TB/s on the H200, copy 4.2). Index is 32-bit where
// the groups fit (the division by the groups of a row is the costliest instruction of the loop).
// Semantics: persimmon_rt/reference.py::dequantize_int8.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {

constexpr int kDequantUnroll = 4;

// Grid-stride over the N * K / 16 groups of 16 weights (K % 16 == 0: a group never spans two rows).
template <typename T, typename Index>
__global__ void __launch_bounds__(256) dequantize_int8_kernel(const int8_t* __restrict__ w,
                                                              const float* __restrict__ scale, T* __restrict__ out,
                                                              Index groups, Index groups_per_row) {
  pdl_launch_dependents();
  pdl_wait();  // out may be a buffer the previous kernel still reads
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index base = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; base < groups;
       base += kDequantUnroll * stride) {
    uint4 raw[kDequantUnroll];
    float s[kDequantUnroll];
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const Index i = base + u * stride;
      if (i < groups) {
        raw[u] = ld_stream_16(w + static_cast<int64_t>(i) * 16);
        s[u] = __ldg(scale + i / groups_per_row);
      }
    }
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const Index i = base + u * stride;
      if (i < groups) {
        const int8_t* b = reinterpret_cast<const int8_t*>(&raw[u]);
        float lo[kVec], hi[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          lo[e] = static_cast<float>(b[e]) * s[u];
          hi[e] = static_cast<float>(b[kVec + e]) * s[u];
        }
        T* dst = out + static_cast<int64_t>(i) * 16;
        store8(dst, lo);
        store8(dst + kVec, hi);
      }
    }
  }
}

}  // namespace persimmon_rt
