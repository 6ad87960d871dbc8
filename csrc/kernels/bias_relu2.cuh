// out = relu(x + bias)^2, in fp32, rounded once (the prefill MLP epilogue after the cuBLAS up-projection).
//
// Block = 128 threads x kBiasRelu2Rows rows: each thread loads its 16-byte bias chunk once and then
// kBiasRelu2Rows x chunks (all loads issued before the first use), so the kernel streams x -> out at
// copy speed. Rows loop with a grid stride because gridDim.y is capped (kMaxGridDimYZ).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace persimmon_rt {

constexpr int kBiasRelu2Threads = 128;
constexpr int kBiasRelu2Rows = 4;

template <typename T>
__global__ void __launch_bounds__(kBiasRelu2Threads) bias_relu2_kernel(
    const T* x,                    // [N, F]
    const T* __restrict__ bias,    // [F]
    T* out,                        // [N, F]  may alias x (each element is read before it is written)
    int64_t rows, int64_t features) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kBiasRelu2Threads + threadIdx.x) * kVec;
  if (col >= features) return;  // no shuffles or barriers below
  float b[kVec];
  load8(bias + col, b);
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * kBiasRelu2Rows; r0 < rows;
       r0 += static_cast<int64_t>(gridDim.y) * kBiasRelu2Rows) {
    uint4 v[kBiasRelu2Rows];
#pragma unroll
    for (int i = 0; i < kBiasRelu2Rows; ++i)
      if (r0 + i < rows) v[i] = load16(x + (r0 + i) * features + col);
#pragma unroll
    for (int i = 0; i < kBiasRelu2Rows; ++i) {
      if (r0 + i < rows) {
        float a[kVec];
        unpack8<T>(v[i], a);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float y = a[e] + b[e];
          const float r = y < 0.f ? 0.f : y;  // not fmaxf: relu must keep a NaN, as torch.relu does
          a[e] = r * r;
        }
        store8(out + (r0 + i) * features + col, a);
      }
    }
  }
}

}  // namespace persimmon_rt
