// Decode GEMV over int8 weights: out = act(scale * (x Wq^T) + bias) + residual, Wq int8 [N, K] with one
// fp32 scale per output row (symmetric, per output channel), act = relu(.)^2 or identity; fp32
// accumulation and epilogue, rounded once. Semantics: persimmon_rt/reference.py::decode_linear_int8.
//
// The layout of decode_linear.cuh (read it first), at one byte per weight: lane (g = lane / 4,
// q = lane % 4) loads the 16 consecutive k of [64c + 16q, 64c + 16q + 16) of rows g and g + 8 of its
// 16-row tile with one 16-byte load each, so a chunk is 64 k and a load feeds four mma k-steps. Step s
// takes the lane's k 4s..4s+3 (byte s of each 32-bit word): its int8 quads become two half2 / bf162
// registers in place of the A fragment's k-slots (2q, 2q+1) and (2q+8, 2q+9), and x's fragment is
// loaded with the same permutation (32 bytes a lane: words 2s and 2s+1 are its k 4s..4s+3), so the
// products pair up as in the plain dot product.
//
// int8 -> fp16 is exact and costs one byte permute and one half2 subtraction per two weights:
// (v + 128) placed under the exponent of 1024 is the half 1024 + v + 128. bf16 has too few mantissa bits
// for that, so there the same trick runs in fp32 (2^23 + v + 128) and the exact result is packed to bf16.
//
// The scale is applied once per output in the epilogue, before bias, relu^2 and residual. Blocks, split-K
// over warps, the shared-memory reduction and programmatic dependent launch are as in decode_linear.cuh.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "decode_linear.cuh"
#include "ptx.cuh"

namespace persimmon_rt {
namespace gemv {

struct DecodeLinearInt8Params {
  const void* x;         // [M, K]  row stride ldx elements, unit column stride, 16-byte aligned rows
  const int8_t* weight;  // [N, K]  int8, contiguous, 16-byte aligned
  const float* scale;    // [N]  fp32 per-row scale
  const void* bias;      // [N]  or nullptr
  const void* residual;  // [M, N]  contiguous, or nullptr; may alias out (read before written, same thread)
  void* out;             // [M, N]  contiguous; T or float (OutT)
  int64_t ldx;           // x row stride in elements, a multiple of 8
  int M;                 // 1..8 * MT
  int N;
  int K;                 // multiple of 16
  bool relu2;
};

constexpr int kChunk8 = 64;  // k per chunk: 4 lanes x 16 int8 weights

// Four int8 (bytes of w, k order) as two pairs of T: lo = (k0, k1), hi = (k2, k3). Exact.
template <typename T>
__device__ __forceinline__ void int8x4_to_pairs(uint32_t w, uint32_t& lo, uint32_t& hi);

template <>
__device__ __forceinline__ void int8x4_to_pairs<__half>(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = w ^ 0x80808080u;                     // v + 128, as unsigned bytes
  const uint32_t lo_bits = __byte_perm(u, 0x64646464u, 0x5140);  // halves 0x64uu: 1024 + u
  const uint32_t hi_bits = __byte_perm(u, 0x64646464u, 0x7362);
  const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));  // 1152
  const __half2 l = __hsub2(*reinterpret_cast<const __half2*>(&lo_bits), bias);
  const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&hi_bits), bias);
  lo = *reinterpret_cast<const uint32_t*>(&l);
  hi = *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ void int8x4_to_pairs<__nv_bfloat16>(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = w ^ 0x80808080u;
  constexpr float kMagic = 8388736.f;  // 2^23 + 128: the float 0x4B0000uu is 2^23 + u
  float f[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440 + i)) - kMagic;
  const __nv_bfloat162 l = __floats2bfloat162_rn(f[0], f[1]);
  const __nv_bfloat162 h = __floats2bfloat162_rn(f[2], f[3]);
  lo = *reinterpret_cast<const uint32_t*>(&l);
  hi = *reinterpret_cast<const uint32_t*>(&h);
}

// The two x words (b0, b1) of mma step s from a lane's 16 consecutive k (two 16-byte loads).
__device__ __forceinline__ uint32_t x_word(const uint4 (&xv)[2], int i) {
  const uint4& v = xv[i / 4];
  return (i % 4) == 0 ? v.x : (i % 4) == 1 ? v.y : (i % 4) == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int s) {
  return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w;
}

// The epilogue: per-warp partials summed from shared memory, scale, bias, relu^2, residual, store.
template <typename T, typename OutT, typename Cfg, int kVals>
__device__ __forceinline__ void int8_epilogue(const DecodeLinearInt8Params& p, int64_t n0,
                                              const float (&s_partial)[Cfg::WARPS][kVals][32]) {
  constexpr int MT = Cfg::MT;
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  OutT* out = static_cast<OutT*>(p.out);
  for (int idx = threadIdx.x; idx < kVals * 32; idx += Cfg::kThreads) {
    const int v = idx / 32, ln = idx % 32;
    const int rt = v / (MT * 4), t = (v / 4) % MT, i = v % 4;
    const int64_t n = n0 + 16 * rt + ln / 4 + 8 * (i / 2);  // C fragment: as in decode_linear.cuh
    const int m = 8 * t + 2 * (ln % 4) + i % 2;
    if (n >= p.N || m >= p.M) continue;
    float y = 0.f;
#pragma unroll
    for (int w = 0; w < Cfg::WARPS; ++w) y += s_partial[w][v][ln];
    y *= __ldg(p.scale + n);
    if (bias != nullptr) y += to_float(bias[n]);
    if (p.relu2) {
      const float r = y < 0.f ? 0.f : y;  // keeps a NaN, as torch.relu does
      y = r * r;
    }
    const int64_t o = static_cast<int64_t>(m) * p.N + n;
    if (residual != nullptr) y += to_float(residual[o]);
    store_out(out + o, y);
  }
}

// Grid: ceil(N / (16 * RT)) blocks of Cfg::kThreads threads.
template <typename T, typename OutT, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS)
    decode_linear_int8_kernel(const DecodeLinearInt8Params p) {
  constexpr int RT = Cfg::RT, MT = Cfg::MT, J = Cfg::J, WARPS = Cfg::WARPS;
  constexpr int kVals = RT * MT * 4;
  __shared__ float s_partial[WARPS][kVals][32];

  pdl_launch_dependents();

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4;
  const int q = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::kRowsPerBlock;
  const int K = p.K;

  const int8_t* w_row[RT][2];
  bool w_ok[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + 16 * rt + 8 * h + g;
      w_ok[rt][h] = n < p.N;
      w_row[rt][h] = p.weight + (w_ok[rt][h] ? n : 0) * K + 16 * q;
    }
  const T* x_row[MT];
  bool x_ok[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    const int m = 8 * t + g;
    x_ok[t] = m < p.M;
    x_row[t] = static_cast<const T*>(p.x) + (x_ok[t] ? m : 0) * p.ldx + 16 * q;
  }

  const int chunks = (K + kChunk8 - 1) / kChunk8;
  const int per_warp = (chunks + WARPS - 1) / WARPS;
  const int c_begin = warp * per_warp;
  const int c_end = min(chunks, c_begin + per_warp);

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][t][i] = 0.f;

  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  uint4 wv[J][RT][2];
  const auto in_range = [&](int c) { return c < c_end && c * kChunk8 + 16 * q < K; };
  const auto load_weights = [&](int c) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const bool ok = in_range(c + j);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[j][rt][h] = ok && w_ok[rt][h] ? ld_weight_16<Cfg::L2_256B>(w_row[rt][h] + (c + j) * kChunk8) : zero;
    }
  };
  if (c_begin < c_end) load_weights(c_begin);  // constants: in flight before the wait
  pdl_wait();

  for (int c = c_begin; c < c_end; c += J) {
    uint4 xv[J][MT][2];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const bool ok = in_range(c + j);
#pragma unroll
      for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          xv[j][t][e] = ok && x_ok[t] ? ld_x_16(x_row[t] + (c + j) * kChunk8 + 8 * e) : zero;
    }
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t a[4];  // rows g / g + 8: k-slot pairs (2q, 2q+1) then (2q+8, 2q+9)
          int8x4_to_pairs<T>(word_of(wv[j][rt][0], s), a[0], a[2]);
          int8x4_to_pairs<T>(word_of(wv[j][rt][1], s), a[1], a[3]);
#pragma unroll
          for (int t = 0; t < MT; ++t)
            mma_m16n8k16<T>(acc[rt][t], a, x_word(xv[j][t], 2 * s), x_word(xv[j][t], 2 * s + 1));
        }
    if (c + J < c_end) load_weights(c + J);
  }

#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) s_partial[warp][(rt * MT + t) * 4 + i][lane] = acc[rt][t][i];
  __syncthreads();
  int8_epilogue<T, OutT, Cfg, kVals>(p, n0, s_partial);
}

}  // namespace gemv
}  // namespace persimmon_rt
