// Dequantization of an int8 weight with per-row fp32 scales: out[n, k] = round_T(w[n, k] * scale[n]),
// the product in fp32, rounded once. Prefill runs each projection's dequantized copy through cuBLAS, so
// this is a pure stream (1 byte read, 2 written per weight): one 16-byte load and two 16-byte stores a
// thread per step, grid-stride. Semantics: persimmon_rt/reference.py::dequantize_int8.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {

// Grid-stride over the N * K / 16 groups of 16 weights (K % 16 == 0: a group never spans two rows).
template <typename T>
__global__ void __launch_bounds__(256) dequantize_int8_kernel(const int8_t* __restrict__ w,
                                                              const float* __restrict__ scale, T* __restrict__ out,
                                                              int64_t groups, int groups_per_row) {
  pdl_launch_dependents();
  pdl_wait();  // out may be a buffer the previous kernel still reads
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < groups; i += stride) {
    const uint4 raw = ld_stream_16(w + i * 16);
    const float s = __ldg(scale + i / groups_per_row);
    const int8_t* b = reinterpret_cast<const int8_t*>(&raw);
    float lo[kVec], hi[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      lo[e] = static_cast<float>(b[e]) * s;
      hi[e] = static_cast<float>(b[kVec + e]) * s;
    }
    store8(out + i * 16, lo);
    store8(out + i * 16 + kVec, hi);
  }
}

}  // namespace persimmon_rt
