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
// int8 -> fp16 is exact and costs one byte permute and one half2 subtraction per two weights, plus one
// xor per four: (v + 128) placed under the exponent of 1024 is the half 1024 + v + 128; no cvt. bf16 has
// too few mantissa bits for that, so there the same trick runs in fp32 (2^23 + v + 128) and the exact
// result is packed to bf16. The scale is applied once per output, in the epilogue, before bias, relu^2
// and residual (the epilogue is decode_linear.cuh's gemv_epilogue).
//
// Why the loop differs from the fp16 GEMV's. A 16-byte load carries 16 k here, 8 there, so with the same
// blocks a warp's share of K is covered in half the steps: at K = 4096, 8 warps and J = 4, a block is two
// loop steps long, and the per-block costs that the fp16 kernel spreads over four steps (the first
// load's round trip, the epilogue's barrier and its scale / bias reads, the block's exit and the next
// block's start, all with none of the block's weight bytes in flight) weigh twice as much. The
// configuration's knobs attack those costs (int8_linear.cu times them per shape):
// - STAGES = 2 keeps the next step's weights in registers too: they are requested before this step's
//   dequantize + mma (a chain of 4J dependent mma per accumulator), so a warp's stream never drains.
// - PERSISTENT: one wave of blocks (as many as fit on the device, sized by the launcher) walks the
//   16-row tiles with a grid stride; the next tile's first loads go out before this tile's epilogue,
//   so a block keeps bytes in flight across tiles and the per-block start and exit are paid once. The
//   shared-memory partials alternate between two buffers, so a tile costs one barrier.
// - Scale and bias (constants, like the weights) are read a tile ahead into registers, so the
//   epilogue does not wait for a DRAM round trip; the first tile's go out before the PDL wait.
// - With one x fragment and one stage, two accumulator chains (mma k-steps alternate between them)
//   halve the dependent-mma latency that delays the next step's loads.
//
// Blocks, split-K over warps and programmatic dependent launch are as in decode_linear.cuh; weights,
// scale and bias are read before the PDL wait (no predecessor writes them), x and residual after it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "decode_linear.cuh"
#include "dequantize_int8.cuh"
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
  // The folded LayerNorm (the kernel's LN_FOLD instance, decode_linear.cuh): ln_weight [K] of T, fp32 [N]
  // fold_scale = W ln_weight and fold_shift = W ln_bias + bias (W = scale * Wq; bias is then nullptr).
  const void* ln_weight = nullptr;
  const float* ln_fold_scale = nullptr;
  const float* ln_fold_shift = nullptr;
  float ln_fold_unscale = 1.f;
  float eps = 0.f;
};

// GemvConfig's RT, MT, J (here 64-k chunks per step), WARPS, MIN_BLOCKS; STAGES: loop steps of weights a
// warp holds in registers (1: the next step's loads go out after this step's mma, as in the fp16 GEMV;
// 2: before them); PERSISTENT: one wave of blocks walks the tiles (the launcher sizes the grid).
template <int RT_, int MT_, int J_, int WARPS_, int MIN_BLOCKS_, int STAGES_, bool PERSISTENT_>
struct Int8GemvConfig : GemvConfig<RT_, MT_, J_, WARPS_, MIN_BLOCKS_> {
  static_assert(STAGES_ == 1 || STAGES_ == 2, "one or two register stages");
  static constexpr int STAGES = STAGES_;
  static constexpr bool PERSISTENT = PERSISTENT_;
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
  float f[4];
  int8x4_to_floats(w, f);
  // Integers of at most 8 significant bits: their bf16 is the fp32's upper half, exactly.
  lo = __byte_perm(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632);
  hi = __byte_perm(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632);
}

// The two x words (b0, b1) of mma step s from a lane's 16 consecutive k (two 16-byte loads).
__device__ __forceinline__ uint32_t x_word(const uint4 (&xv)[2], int i) {
  const uint4& v = xv[i / 4];
  return (i % 4) == 0 ? v.x : (i % 4) == 1 ? v.y : (i % 4) == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int s) {
  return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w;
}

// Grid: ceil(N / (16 * RT)) blocks, or fewer for a PERSISTENT configuration (at least one tile each); block
// b takes tiles b, b + gridDim.x, ... Cfg::kThreads threads. LN_FOLD: the folded LayerNorm (x times the
// LayerNorm weight staged by each warp over its K share, in M x fold_stage_stride(K) elements of dynamic
// shared memory; the statistics applied in the epilogue), as decode_linear_kernel's.
template <typename T, typename OutT, typename Cfg, bool LN_FOLD = false>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS)
    decode_linear_int8_kernel(const DecodeLinearInt8Params p) {
  constexpr int RT = Cfg::RT, MT = Cfg::MT, J = Cfg::J, WARPS = Cfg::WARPS, S = Cfg::STAGES;
  constexpr int kBufs = Cfg::PERSISTENT ? 2 : 1;  // partials alternate: a tile costs one barrier
  constexpr int kRounds = kEpilogueRounds<Cfg>;
  __shared__ float s_partial[kBufs][WARPS][RT * MT * 4][32];
  __shared__ float2 s_rowsum[LN_FOLD ? WARPS : 1][LN_FOLD ? Cfg::kMaxM : 1];
  extern __shared__ uint4 s_int8_fold_x[];

  pdl_launch_dependents();

  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int q = lane % 4;
  const int K = p.K;
  const int tiles = static_cast<int>(ceil_div(p.N, Cfg::kRowsPerBlock));
  // This warp's share of the chunks and the block's (tile, step) pairs (a non-persistent grid has a block
  // per tile: a compile-time 1 tile, so none of the tile walk is kept).
  const WarpShare share = warp_share<Cfg>(tiles, (K + kChunk8 - 1) / kChunk8);
  const int c_begin = share.c_begin, c_end = share.c_end, steps = share.steps, items = share.items;
  const auto in_range = [&](int c) { return c < c_end && c * kChunk8 + 16 * q < K; };
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  // Weight loads, one step at a time in (tile, step) order. A persistent block keeps a cursor (the next
  // tile and step to load); a block of one tile loads step `item`.
  int ld_tile = blockIdx.x, ld_step = 0;
  const auto load_weights = [&](uint4 (&w)[J][RT][2], int item) {
    load_weight_step<Cfg, kChunk8>(w, p.weight,
                                   static_cast<int64_t>(Cfg::PERSISTENT ? ld_tile : blockIdx.x) * Cfg::kRowsPerBlock,
                                   p.N, K, g, 16 * q, c_begin + (Cfg::PERSISTENT ? ld_step : item) * J, in_range);
    if (Cfg::PERSISTENT && ++ld_step == steps) {
      ld_step = 0;
      ld_tile += gridDim.x;
    }
  };

  const XRows<T, MT> xr(p.x, p.ldx, p.M, g, 16 * q);  // offset by the lane's 16-k slot
  // x fragments: row 8t + g of x, or of the staged x * ln_weight (folded LayerNorm).
  T* const s_x = reinterpret_cast<T*>(s_int8_fold_x);
  const T* x_frag[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t)
    x_frag[t] = LN_FOLD ? s_x + (xr.ok[t] ? 8 * t + g : 0) * fold_stage_stride(K) + 16 * q : xr.row[t];
  // Chunk c's x fragments (L1 / L2 hits). A step's are requested together at its start, while its
  // weights may still be arriving, unless they would take more than 32 registers (J x MT x 8): then
  // each chunk's go out just before its mma (measured by ptxas: either placement alone spills in some
  // configuration).
  constexpr bool kXPerChunk = J * MT > 4;
  const auto load_x = [&](int c, uint4 (&xv)[MT][2]) {
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        xv[t][e] = !(in_range(c) && xr.ok[t]) ? zero
                   : LN_FOLD ? *reinterpret_cast<const uint4*>(x_frag[t] + c * kChunk8 + 8 * e)
                             : ld_x_16(x_frag[t] + c * kChunk8 + 8 * e);
  };

  // Scale and bias of a tile are requested a tile ahead. With one x fragment they go into registers
  // (the outputs this thread finishes, rounds r of gemv_epilogue); the two-fragment configurations have
  // no registers to spare (they spill), so their thread 0 asks L2 for the tile's lines and the epilogue
  // reads them from there.
  // With the folded LayerNorm the bias slot holds fold_shift (which includes the bias) and fs the
  // fold_scale.
  constexpr bool kHeadInRegisters = MT == 1;
  const T* bias = static_cast<const T*>(p.bias);
  float sc[kRounds], bi[kRounds], fs[LN_FOLD ? kRounds : 1];
  const auto load_head = [&](int tile) {
    const int64_t n0 = static_cast<int64_t>(tile) * Cfg::kRowsPerBlock;
    if constexpr (kHeadInRegisters) {
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const int idx = static_cast<int>(threadIdx.x) + r * Cfg::kThreads;
        int64_t n;
        int m;
        epilogue_slot<Cfg>(idx, n0, n, m);
        const bool ok = idx < kEpilogueSlots<Cfg> && n < p.N;
        sc[r] = ok ? __ldg(p.scale + n) : 0.f;
        if constexpr (LN_FOLD) {
          bi[r] = ok ? __ldg(p.ln_fold_shift + n) : 0.f;
          fs[r] = ok ? __ldg(p.ln_fold_scale + n) : 0.f;
        } else {
          bi[r] = ok && bias != nullptr ? to_float(__ldg(bias + n)) : 0.f;
        }
      }
    } else if (threadIdx.x < RT && (RT == 1 || n0 + 16 * threadIdx.x < p.N)) {  // 16 rows: a line each
      prefetch_l2(p.scale + n0 + 16 * threadIdx.x);
      if constexpr (LN_FOLD) {
        prefetch_l2(p.ln_fold_scale + n0 + 16 * threadIdx.x);
        prefetch_l2(p.ln_fold_shift + n0 + 16 * threadIdx.x);
      } else if (bias != nullptr) {
        prefetch_l2(bias + n0 + 16 * threadIdx.x);
      }
    }
  };
  const float inv_k = 1.f / static_cast<float>(K);  // LN_FOLD only
  const auto head = [&](int r, int64_t n, int m, float y) {
    if constexpr (LN_FOLD) {  // unscale rstd (scale acc - mean s) + c
      const float2 st = fold_row_stats<WARPS, Cfg::kMaxM>(&s_rowsum[0][0], m, inv_k, p.eps, p.ln_fold_unscale);
      if constexpr (kHeadInRegisters) {
        return st.y * (y * sc[r] - st.x * fs[r]) + bi[r];
      } else {
        return st.y * (y * __ldg(p.scale + n) - st.x * __ldg(p.ln_fold_scale + n)) + __ldg(p.ln_fold_shift + n);
      }
    } else if constexpr (kHeadInRegisters) {
      return y * sc[r] + bi[r];
    } else {
      y *= __ldg(p.scale + n);
      return bias != nullptr ? y + to_float(__ldg(bias + n)) : y;
    }
  };

  // Accumulator chains: with one x fragment and one stage, mma k-steps alternate between two, so
  // consecutive mma do not wait on each other (the next step's loads wait behind them). Two x fragments
  // are already independent chains; with two stages the next loads are out before the mma.
  constexpr int kChains = MT == 1 && S == 1 ? 2 : 1;
  float acc[kChains][RT][MT][4];
  const auto clear = [&] {
#pragma unroll
    for (int a = 0; a < kChains; ++a)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[a][rt][t][i] = 0.f;
  };
  const auto mma_step = [&](const uint4 (&w)[J][RT][2], int step) {
    uint4 xs[kXPerChunk ? 1 : J][MT][2];
    if constexpr (!kXPerChunk) {
#pragma unroll
      for (int j = 0; j < J; ++j) load_x(c_begin + step * J + j, xs[j]);
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      if constexpr (kXPerChunk) load_x(c_begin + step * J + j, xs[0]);
      const uint4(&xv)[MT][2] = xs[kXPerChunk ? 0 : j];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t a[4];  // rows g / g + 8: k-slot pairs (2q, 2q+1) then (2q+8, 2q+9)
          int8x4_to_pairs<T>(word_of(w[j][rt][0], s), a[0], a[2]);
          int8x4_to_pairs<T>(word_of(w[j][rt][1], s), a[1], a[3]);
#pragma unroll
          for (int t = 0; t < MT; ++t)
            mma_m16n8k16<T>(acc[s % kChains][rt][t], a, x_word(xv[t], 2 * s), x_word(xv[t], 2 * s + 1));
        }
    }
  };
  clear();

  // The first S steps' weights and the first tile's scale and bias go out before the wait: constants,
  // their latency hidden under the predecessor's tail.
  uint4 wv[S][J][RT][2];
#pragma unroll
  for (int s = 0; s < S; ++s)
    if (s < items) load_weights(wv[s], s);
  load_head(blockIdx.x);
  pdl_wait();
  if constexpr (LN_FOLD) {  // a chunk is 64 k: 8 vectors
    fold_stage_x<T, Cfg>(static_cast<const T*>(p.x), static_cast<const T*>(p.ln_weight), p.ldx, p.M, K,
                         c_begin * (kChunk8 / kVec), max(c_begin, c_end) * (kChunk8 / kVec), s_x, s_rowsum);
  }

  // The tile's epilogue: the chains summed, then gemv_epilogue (one barrier) into s_partial[buf].
  const auto finish_tile = [&](int tile, int buf) {
    float sum[RT][MT][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          sum[rt][t][i] = kChains == 1 ? acc[0][rt][t][i] : acc[0][rt][t][i] + acc[kChains - 1][rt][t][i];
    gemv_epilogue<T, OutT, Cfg>(s_partial[buf], sum, static_cast<int64_t>(tile) * Cfg::kRowsPerBlock, p.M, p.N,
                                p.relu2, p.residual, p.out, head);
  };

  int tile = blockIdx.x, step = 0, buf = 0;  // the tile and step being computed (persistent walk)
  for (int base = 0; base < items; base += S) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int item = base + s;
      if (item >= items) break;  // block-uniform when persistent (no barrier in the loop otherwise)
      const int st = Cfg::PERSISTENT ? step : item;
      mma_step(wv[s], st);
      if (item + S < items) load_weights(wv[s], item + S);  // in flight through the epilogue below
      if constexpr (Cfg::PERSISTENT) {
        if (++step < steps) continue;
        finish_tile(tile, buf);
        clear();
        buf ^= 1;
        tile += gridDim.x;
        step = 0;
        if (tile < tiles) load_head(tile);
      }
    }
  }
  if constexpr (!Cfg::PERSISTENT) finish_tile(blockIdx.x, 0);  // the block's one tile
}

}  // namespace gemv
}  // namespace persimmon_rt
