// Dequantization of an int8 weight with per-row fp32 scales: out[n, k] = round_T(w[n, k] * scale[n]),
// the product in fp32, rounded once. Prefill runs each projection's dequantized copy through cuBLAS, so
// this is a pure stream: 1 byte read and 2 written per weight. Semantics:
// persimmon_rt/reference.py::dequantize_int8.
//
// A thread takes groups of 8 weights: an 8-byte load, one 16-byte store, so each warp-wide store writes
// 512 contiguous bytes. (With 16 weights a thread, a 16-byte load and two 16-byte stores, each store
// instruction wrote 16-byte pieces 32 bytes apart: 2.6 TB/s on the H200, the same with no arithmetic at
// all; this layout reaches 3.7 against a 4.1 TB/s copy: benchmarks/RESULTS.md.) Each thread requests U
// groups a grid apart before converting any, and int8 -> fp32 is exact without a cvt: (v + 128) placed
// under the exponent of 2^23, minus 2^23 + 128.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {

constexpr int kDequantizeUnroll = 4;  // groups of 8 in flight per thread

// The four int8 of a word (k order) as exact floats (also the bf16 int8 GEMV's conversion).
__device__ __forceinline__ void int8x4_to_floats(uint32_t word, float* f) {
  const uint32_t u = word ^ 0x80808080u;  // v + 128, as unsigned bytes; the float 0x4B0000uu is 2^23 + u
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440 + i)) - 8388736.f;
}

// Grid-stride over the N * K / 8 groups of 8 weights (K % 8 == 0: a group never spans two rows). Index (the
// group index and its division by the row length) is int where every index the loop forms fits (the
// launcher checks), else int64_t; addresses are 64-bit either way.
template <typename T, typename Index>
__global__ void __launch_bounds__(256) dequantize_int8_kernel(const int8_t* __restrict__ w,
                                                              const float* __restrict__ scale, T* __restrict__ out,
                                                              Index groups, Index groups_per_row) {
  constexpr int U = kDequantizeUnroll;
  pdl_launch_dependents();
  pdl_wait();  // out may be a buffer the previous kernel still reads
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i0 = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i0 < groups; i0 += U * stride) {
    uint2 raw[U];
    float s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const Index i = i0 + u * stride;
      raw[u] = i < groups ? ld_stream_8(w + static_cast<int64_t>(i) * 8) : make_uint2(0u, 0u);
      s[u] = i < groups ? __ldg(scale + i / groups_per_row) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const Index i = i0 + u * stride;
      if (i >= groups) break;
      float f[kVec];
      int8x4_to_floats(raw[u].x, f);
      int8x4_to_floats(raw[u].y, f + 4);
#pragma unroll
      for (int e = 0; e < kVec; ++e) f[e] *= s[u];
      store8(out + static_cast<int64_t>(i) * 8, f);
    }
  }
}

}  // namespace persimmon_rt
