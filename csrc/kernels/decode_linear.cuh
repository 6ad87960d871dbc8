// Decode GEMV with a fused LayerNorm prologue and epilogue: out = act(LN(x) W^T + bias) + residual,
// act = relu(.)^2 or identity, LN optional, fp32 accumulation and epilogue, rounded once.
// Semantics: persimmon_rt/reference.py::decode_linear.
//
// At decode batch sizes (M <= 16 rows) the op is a stream over W: every weight byte is read once and
// used for M multiply-adds, so the kernel is shaped for bytes in flight, not arithmetic.
//
// Tensor cores do the multiply-adds (mma.m16n8k16, W as the 16-row A operand, x as the 8-column B
// operand), because then a lane's registers can take W straight from 16-byte loads: a dot product does
// not care in which order it visits k, so lane (g = lane / 4, q = lane % 4) loads the 8 consecutive
// k of [32c + 8q, 32c + 8q + 8) of rows g and g + 8 of its 16-row tile, and feeds them to two mma
// k-steps (the first four k to step 0, the last four to step 1). x is loaded with the same
// permutation (lane g holds x row g), so the products pair up exactly as in the plain dot product.
// No shuffles, no per-element conversion: per 32 bytes of W a lane issues two loads and, per 8 rows of
// x, two mma.
//
// Block = WARPS warps on one tile of 16 * RT output features; the K range is split across the warps
// (split-K inside the block), so a narrow output (N = 4096) still gives 8 warps per 16 rows, every
// warp keeping J chunks x RT x 2 loads of 16 bytes in flight. The warps' fp32 partial sums meet in
// shared memory and the epilogue runs once per output on the full sum: no workspace, no second kernel.
//
// x (tiny, re-read by every block) is loaded through L1; W (read once) bypasses L1 so it cannot evict x.
//
// LayerNorm prologue (LN = true): every block computes mean and rstd of x's M rows itself (fp32, two
// passes: mean, then squared deviations, as reference.layernorm), with its first weight loads already
// in flight; the main loop then normalises each x fragment as it loads it (LN weight and bias come
// through L1 too) and rounds it to T before the mma, exactly as the separate layernorm op's output
// would be. x is at most 16 rows of a few KB and L2-resident, so the prologue costs one or two L2
// round trips per block and no launch.
//
// Programmatic dependent launch: the kernel lets its successor be scheduled at once, loads its first
// weights (constants: no predecessor writes them), and only then waits for the predecessor grid
// before it reads x or residual or writes out. The one-tile kernel with the folded LayerNorm or a residual
// also reads its epilogue's constants before the wait and its residual right after it (SlotInputs), so a
// block's end waits only for its partial sums.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {
namespace gemv {

struct DecodeLinearParams {
  const void* x;         // [M, K]  row stride ldx elements, unit column stride, 16-byte aligned rows
  const void* weight;    // [N, K]  contiguous, 16-byte aligned
  const void* bias;      // [N]  or nullptr
  const void* residual;  // [M, N]  contiguous, or nullptr; may alias out (read before written, same thread)
  void* out;             // [M, N]  contiguous; T or float (OutT)
  int64_t ldx;           // x row stride in elements, a multiple of 8
  int M;                 // 1..8 * MT; x rows >= M are never read
  int N;
  int K;                 // multiple of 8
  bool relu2;
  const void* ln_weight = nullptr;  // [K]  LN prologue (the kernel's LN instance) or folded LN; else unused
  const void* ln_bias = nullptr;    // [K]  or nullptr
  float eps = 0.f;
  // Folded LN (the kernel's LN_FOLD instance): fp32 [N] each, s = W ln_weight, c = W ln_bias + bias; the
  // product is multiplied by unscale (ln_weight may be scaled by a power of two to keep x * ln_weight finite).
  const float* ln_fold_scale = nullptr;
  const float* ln_fold_shift = nullptr;
  float ln_fold_unscale = 1.f;
};

// RT: 16-row tiles per block (each warp covers all of them, reusing its x fragment); MT: 8-row groups
// of x (M <= 8 * MT); J: 32-k chunks loaded per loop step; WARPS: K split of the block; MIN_BLOCKS:
// resident blocks per SM the register allocation must allow; L2_256B: weight loads ask L2 to fetch
// whole 256-byte segments.
template <int RT_, int MT_, int J_, int WARPS_, int MIN_BLOCKS_, bool L2_256B_ = true>
struct GemvConfig {
  static constexpr int RT = RT_, MT = MT_, J = J_, WARPS = WARPS_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr bool L2_256B = L2_256B_;
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kRowsPerBlock = 16 * RT;
  static constexpr int kMaxM = 8 * MT;
};

constexpr int kChunk = 32;  // k per chunk: 4 lanes x 8 elements

// 16-byte read-only load of streamed weights that skips L1; with L2_256B it also asks L2 to fetch the
// whole 256-byte segment (a warp reads J * 64 contiguous bytes of each of its rows per step).
template <bool L2_256B>
__device__ __forceinline__ uint4 ld_weight_16(const void* p) {
  if constexpr (L2_256B) {
    return ld_stream_16_l2_256(p);
  } else {
    return ld_stream_16(p);
  }
}

// 16-byte read-only load of x through L1 (every block re-reads x).
__device__ __forceinline__ uint4 ld_x_16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

template <typename OutT>
__device__ __forceinline__ void store_out(OutT* p, float v) {
  if constexpr (std::is_same_v<OutT, float>) {
    *p = v;
  } else {
    *p = from_float<OutT>(v);
  }
}

// The mma of one 32-k chunk: each 16-row weight tile (w[rt][0] rows g, w[rt][1] rows g + 8, 8 consecutive
// k a lane) times each 8-row x fragment. A fragment: a[0] rows g / k-slots 2q..2q+1, a[1] rows g+8, a[2]
// rows g / slots 2q+8..2q+9, a[3] rows g+8. Step 0 takes the lane's k 0..3 (.x, .y), step 1 its k 4..7
// (.z, .w).
template <typename T, int RT, int MT>
__device__ __forceinline__ void mma_chunk(float (&acc)[RT][MT][4], const uint4 (&w)[RT][2],
                                          const uint4 (&xv)[MT]) {
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    const uint32_t a0[4] = {w[rt][0].x, w[rt][1].x, w[rt][0].y, w[rt][1].y};
    const uint32_t a1[4] = {w[rt][0].z, w[rt][1].z, w[rt][0].w, w[rt][1].w};
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      mma_m16n8k16<T>(acc[rt][t], a0, xv[t].x, xv[t].y);
      mma_m16n8k16<T>(acc[rt][t], a1, xv[t].z, xv[t].w);
    }
  }
}

// LayerNorm statistics of x's M rows: s_stats[m] = (mean, rstd), fp32, two passes. Rows spread over
// the warps: P = WARPS / M (a power of two, at least 1) warps share a row, so one row (batch 1) is read
// by the whole block at two 16-byte loads a lane (K = 4096); more rows than warps take several rounds.
// The second pass re-reads x from L1. Ends with a barrier; every thread of the block must call it.
template <typename T, int WARPS>
__device__ __forceinline__ void ln_row_stats(const DecodeLinearParams& p, float2* s_stats, float* s_part) {
  static_assert((WARPS & (WARPS - 1)) == 0, "rows split over a power-of-two number of warps");
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int parts = 1;  // warps per row
  while (2 * parts * p.M <= WARPS) parts *= 2;
  const int rows_per_round = WARPS / parts;
  const int part = warp % parts;
  const int chunks = p.K / kVec;
  const float inv_k = 1.f / static_cast<float>(p.K);
  for (int base = 0; base < p.M; base += rows_per_round) {
    const int m = base + warp / parts;
    const bool row_ok = warp / parts < rows_per_round && m < p.M;  // warp-uniform
    const T* row = static_cast<const T*>(p.x) + static_cast<int64_t>(row_ok ? m : 0) * p.ldx;
    float sum = 0.f;
    if (row_ok) {
#pragma unroll 4
      for (int c = part * 32 + lane; c < chunks; c += 32 * parts) {
        float f[kVec];
        unpack8<T>(__ldg(reinterpret_cast<const uint4*>(row + c * kVec)), f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum += f[e];
      }
    }
    sum = group_sum<32>(sum);
    if (lane == 0) s_part[warp] = sum;
    __syncthreads();
    float mean = 0.f;
    if (row_ok) {
      const int first = warp - part;
      for (int w = 0; w < parts; ++w) mean += s_part[first + w];
      mean *= inv_k;
    }
    float sq = 0.f;
    if (row_ok) {
#pragma unroll 4
      for (int c = part * 32 + lane; c < chunks; c += 32 * parts) {
        float f[kVec];
        unpack8<T>(__ldg(reinterpret_cast<const uint4*>(row + c * kVec)), f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) sq += (f[e] - mean) * (f[e] - mean);
      }
    }
    sq = group_sum<32>(sq);
    if (lane == 0) s_part[WARPS + warp] = sq;
    __syncthreads();
    if (row_ok && part == 0 && lane == 0) {
      float var = 0.f;
      for (int w = 0; w < parts; ++w) var += s_part[WARPS + warp + w];
      s_stats[m] = make_float2(mean, rsqrtf(var * inv_k + p.eps));
    }
  }
  __syncthreads();
}

// One x fragment (8 consecutive k of one row) normalised: round((x - mean) * rstd * w + b), as the
// layernorm op computes and rounds its output.
template <typename T>
__device__ __forceinline__ uint4 ln_apply(uint4 xr, uint4 wr, uint4 br, float mean, float rstd) {
  float f[kVec], w[kVec], b[kVec];
  unpack8<T>(xr, f);
  unpack8<T>(wr, w);
  unpack8<T>(br, b);
#pragma unroll
  for (int e = 0; e < kVec; ++e) f[e] = (f[e] - mean) * rstd * w[e] + b[e];
  return pack8<T>(f);
}

// Folded LayerNorm: LN(x) W^T + bias = rstd (x * w) W^T - rstd mean s + c, with s = W w and c = W b + bias
// precomputed per weight, so no block needs the statistics before its last mma. One x vector (8 values):
// returns round(x * w), adds x and x^2 to the running sums. The pair product is exact in fp32 and correctly
// rounded by __hmul2: the same value as the fp32 product rounded to T.
template <typename T>
__device__ __forceinline__ uint4 ln_fold_apply(uint4 xr, uint4 wr, float& sum, float& sq) {
  using P = Pack2<T>;
  auto* x2 = reinterpret_cast<typename P::type*>(&xr);
  const auto* w2 = reinterpret_cast<const typename P::type*>(&wr);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = P::to_float2(x2[i]);
    sum += f.x + f.y;
    sq = fmaf(f.x, f.x, fmaf(f.y, f.y, sq));
    x2[i] = __hmul2(x2[i], w2[i]);
  }
  return xr;
}

// Row stride (elements) of the folded LayerNorm's staged x: 16 bytes of padding put rows g = 0..7 of a
// fragment load in different banks.
__host__ __device__ constexpr int64_t fold_stage_stride(int64_t K) { return K + kVec; }

// The folded LayerNorm's prologue, per warp: x * w of every row over the warp's own chunks [c_begin, c_end)
// (the only ones its main loop reads) into shared memory (row stride fold_stage_stride(K)), and the warp's
// (sum x, sum x^2) of every row into s_rowsum[warp][m] (the epilogue adds the warps'). The warp's lanes
// share its vectors, so every lane does useful work (in the main loop only the lanes holding x rows would,
// 4 of 32 at one row: 3-7 us slower per GEMV on the H200), and no warp waits for another.
template <typename T, typename Cfg>
__device__ __forceinline__ void fold_stage_x(const T* x, const T* w, int64_t ldx, int M, int K, int v_begin, int v_end,
                                             T* s_x, float2 (&s_rowsum)[Cfg::WARPS][Cfg::kMaxM]) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t stride = fold_stage_stride(K);
#pragma unroll 1
  for (int m = 0; m < M; ++m) {
    float sum = 0.f, sq = 0.f;
#pragma unroll 2
    for (int v = v_begin + lane; v < v_end; v += 32) {
      const uint4 xs = ln_fold_apply<T>(ld_x_16(x + m * ldx + kVec * v), ld_x_16(w + kVec * v), sum, sq);
      *reinterpret_cast<uint4*>(s_x + m * stride + kVec * v) = xs;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
      sq += __shfl_xor_sync(0xffffffffu, sq, o);
    }
    if (lane == 0) s_rowsum[warp][m] = make_float2(sum, sq);
  }
  __syncwarp();
}

// Row m's (mean, unscale * rstd) from the warps' sums of fold_stage_x (fp32, E[x^2] - mean^2 clamped at 0).
template <int WARPS, int MAX_M>
__device__ __forceinline__ float2 fold_row_stats(const float2* s_rowsum, int m, float inv_k, float eps,
                                                 float unscale) {
  float xs = 0.f, xq = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const float2 r = s_rowsum[w * MAX_M + m];
    xs += r.x;
    xq += r.y;
  }
  const float mean = xs * inv_k;
  return make_float2(mean, rsqrtf(fmaxf(xq * inv_k - mean * mean, 0.f) + eps) * unscale);
}

// ---- the epilogue, shared with decode_linear_int8.cuh ------------------------------------------------
// The warps' fp32 partial sums meet in shared memory as s_partial[warp][v][lane], v = (rt * MT + t) * 4 + i
// (accumulator i of tile rt and x fragment t): lane-contiguous stores and loads, free of bank conflicts.
// Output slot idx = 32 v + lane of the block is finished by thread idx % kThreads, in round idx / kThreads.

template <typename Cfg>
constexpr int kEpilogueSlots = Cfg::RT * Cfg::MT * 4 * 32;

// Rounds of the epilogue per thread (a compile-time count, so callers can keep per-round registers).
template <typename Cfg>
constexpr int kEpilogueRounds = (kEpilogueSlots<Cfg> + Cfg::kThreads - 1) / Cfg::kThreads;

// Output feature n and x row m of slot idx of the tile that starts at row n0. The C fragment: c[i] is
// (row g + 8 (i / 2), column 2q + i % 2) of the 16x8 tile.
template <typename Cfg>
__device__ __forceinline__ void epilogue_slot(int idx, int64_t n0, int64_t& n, int& m) {
  const int v = idx / 32, ln = idx % 32;
  const int rt = v / (Cfg::MT * 4), t = (v / 4) % Cfg::MT, i = v % 4;
  n = n0 + 16 * rt + ln / 4 + 8 * (i / 2);
  m = 8 * t + 2 * (ln % 4) + i % 2;
}

// Stores this warp's accumulators into s_partial and waits for the block (the epilogues' first step).
template <typename Cfg>
__device__ __forceinline__ void store_partials(float (&s_partial)[Cfg::WARPS][Cfg::RT * Cfg::MT * 4][32],
                                               const float (&acc)[Cfg::RT][Cfg::MT][4]) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int rt = 0; rt < Cfg::RT; ++rt)
#pragma unroll
    for (int t = 0; t < Cfg::MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) s_partial[warp][(rt * Cfg::MT + t) * 4 + i][lane] = acc[rt][t][i];
  __syncthreads();
}

// Stores this warp's accumulators, waits for the block, then finishes each output of the tile at n0:
// y = sum of the warps' partials, y = head(round, n, m, y) (bias; the int8 GEMV's scale and folded
// LayerNorm too), relu^2, + residual, one rounding into out. Every thread of the block must call it (one
// barrier); s_partial must not be rewritten before the block's next barrier.
template <typename T, typename OutT, typename Cfg, typename Head>
__device__ __forceinline__ void gemv_epilogue(float (&s_partial)[Cfg::WARPS][Cfg::RT * Cfg::MT * 4][32],
                                              const float (&acc)[Cfg::RT][Cfg::MT][4], int64_t n0, int M, int N,
                                              bool relu2, const void* residual_, void* out_, Head head) {
  store_partials<Cfg>(s_partial, acc);

  const T* residual = static_cast<const T*>(residual_);
  OutT* out = static_cast<OutT*>(out_);
#pragma unroll
  for (int r = 0; r < kEpilogueRounds<Cfg>; ++r) {
    const int idx = static_cast<int>(threadIdx.x) + r * Cfg::kThreads;
    int64_t n;
    int m;
    epilogue_slot<Cfg>(idx, n0, n, m);
    if (idx >= kEpilogueSlots<Cfg> || n >= N || m >= M) continue;
    float y = 0.f;
#pragma unroll
    for (int w = 0; w < Cfg::WARPS; ++w) y += s_partial[w][idx / 32][idx % 32];
    y = head(r, n, m, y);
    if (relu2) {
      const float a = y < 0.f ? 0.f : y;  // not fmaxf: relu must keep a NaN, as torch.relu does
      y = a * a;
    }
    const int64_t o = static_cast<int64_t>(m) * N + n;
    if (residual != nullptr) y += to_float(residual[o]);
    store_out(out + o, y);
  }
}

// One output's epilogue inputs, read long before its partial sums meet: the per-output constants (bias, or
// the folded LayerNorm's shift and scale) before the kernel's dependency wait, the residual right after it.
// Then a block's epilogue waits only for its partial sums, not for another memory round trip at its end.
// In every configuration of decode_linear_kernel a thread finishes at most one output of its tile
// (kEpilogueRounds == 1).
// bias and residual stay in T until the epilogue: converting them at once would make the warp wait for the
// load right there.
template <typename T>
struct SlotInputs {
  float shift = 0.f, scale = 0.f;  // folded LayerNorm
  T bias, residual;                // read only where p.bias / p.residual are given
};

template <typename T, typename Cfg, bool FOLD>
__device__ __forceinline__ SlotInputs<T> load_slot_constants(const DecodeLinearParams& p, int64_t n0) {
  static_assert(kEpilogueRounds<Cfg> == 1, "one output a thread");
  SlotInputs<T> in;
  int64_t n;
  int m;
  epilogue_slot<Cfg>(threadIdx.x, n0, n, m);
  if (threadIdx.x < kEpilogueSlots<Cfg> && n < p.N && m < p.M) {
    if constexpr (FOLD) {
      in.shift = __ldg(p.ln_fold_shift + n);
      in.scale = __ldg(p.ln_fold_scale + n);
    } else if (p.bias != nullptr) {
      in.bias = __ldg(static_cast<const T*>(p.bias) + n);
    }
  }
  return in;
}

// After the dependency wait (the residual is the previous kernels' output). Plain load: residual may alias
// out, which this thread alone writes, later.
template <typename T, typename Cfg>
__device__ __forceinline__ void load_slot_residual(SlotInputs<T>& in, const DecodeLinearParams& p, int64_t n0) {
  int64_t n;
  int m;
  epilogue_slot<Cfg>(threadIdx.x, n0, n, m);
  if (p.residual != nullptr && threadIdx.x < kEpilogueSlots<Cfg> && n < p.N && m < p.M)
    in.residual = static_cast<const T*>(p.residual)[static_cast<int64_t>(m) * p.N + n];
}

// The fp16 GEMV's epilogue (the same sum and epilogue as gemv_epilogue, which the int8 GEMV uses, as a
// plain strided loop: through gemv_epilogue the fp16 decode step measured 0.19 ms slower at one row and
// 0.22 ms at eight on the H200, benchmarks/RESULTS.md run K). Stores this warp's accumulators into
// s_partial, waits for the block, then finishes each output of the tile at n0. Every thread of the block
// must call it (one barrier); s_partial must not be rewritten before the block's next barrier.
// FOLD (the folded LayerNorm): the warps' row sums s_rowsum (fold_stage_x, written before the barrier) give
// each row's mean and rstd (fp32, E[x^2] - mean^2, clamped at 0), and y = unscale rstd (acc - mean s) + c
// takes the bias's place.
// use_pre: the output's bias / fold constants and residual come from `pre` (load_slot_constants,
// load_slot_residual) instead of memory.
template <typename T, typename OutT, typename Cfg, bool FOLD = false>
__device__ __forceinline__ void strided_epilogue(float (&s_partial)[Cfg::WARPS][Cfg::RT * Cfg::MT * 4][32],
                                                 const float (&acc)[Cfg::RT][Cfg::MT][4], int64_t n0,
                                                 const DecodeLinearParams& p, const float2* s_rowsum = nullptr,
                                                 const SlotInputs<T>& pre = SlotInputs<T>{}, bool use_pre = false) {
  constexpr int kVals = Cfg::RT * Cfg::MT * 4;
  store_partials<Cfg>(s_partial, acc);

  const float inv_k = 1.f / static_cast<float>(p.K);  // FOLD only
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  OutT* out = static_cast<OutT*>(p.out);
  for (int idx = threadIdx.x; idx < kVals * 32; idx += Cfg::kThreads) {
    int64_t n;
    int m;
    epilogue_slot<Cfg>(idx, n0, n, m);
    if (n >= p.N || m >= p.M) continue;
    float y = 0.f, xs = 0.f, xq = 0.f;
#pragma unroll
    for (int w = 0; w < Cfg::WARPS; ++w) {
      y += s_partial[w][idx / 32][idx % 32];
      if constexpr (FOLD) {
        const float2 r = s_rowsum[w * Cfg::kMaxM + m];  // s_rowsum[WARPS][kMaxM]
        xs += r.x;
        xq += r.y;
      }
    }
    if constexpr (FOLD) {
      const float mean = xs * inv_k;
      const float var = fmaxf(xq * inv_k - mean * mean, 0.f);
      const float rstd = rsqrtf(var + p.eps) * p.ln_fold_unscale;
      y = use_pre ? rstd * (y - mean * pre.scale) + pre.shift
              : rstd * (y - mean * p.ln_fold_scale[n]) + p.ln_fold_shift[n];
    } else if (bias != nullptr) {
      y += to_float(use_pre ? pre.bias : bias[n]);
    }
    if (p.relu2) {
      const float r = y < 0.f ? 0.f : y;  // not fmaxf: relu must keep a NaN, as torch.relu does
      y = r * r;
    }
    const int64_t o = static_cast<int64_t>(m) * p.N + n;
    if (residual != nullptr) y += to_float(use_pre ? pre.residual : residual[o]);
    store_out(out + o, y);
  }
}

// A warp's contiguous share of a K range of `chunks` chunks, walked in loop steps of J chunks (chunks past
// it predicated off), and, in a persistent grid, the block's tiles: the bookkeeping of the pipelined loops
// (decode_linear_pipelined_kernel, decode_linear_int8_kernel). In a persistent block every warp walks the
// same number of steps, since each tile ends in a barrier; a block of one tile has no barrier before its
// epilogue, so each warp walks its own steps there (none for a warp past the end of K).
struct WarpShare {
  int my_tiles;  // tiles this block finishes (1 unless persistent)
  int c_begin, c_end;
  int steps;     // loop steps per tile
  int items;     // (tile, step) pairs this warp walks
};

template <typename Cfg>
__device__ __forceinline__ WarpShare warp_share(int tiles, int chunks) {
  WarpShare s;
  const int warp = threadIdx.x / 32;
  s.my_tiles = Cfg::PERSISTENT ? (tiles - 1 - static_cast<int>(blockIdx.x)) / static_cast<int>(gridDim.x) + 1 : 1;
  const int per_warp = (chunks + Cfg::WARPS - 1) / Cfg::WARPS;
  s.c_begin = warp * per_warp;
  s.c_end = min(chunks, s.c_begin + per_warp);
  s.steps = (per_warp + Cfg::J - 1) / Cfg::J;
  s.items = Cfg::PERSISTENT ? s.my_tiles * s.steps : (s.c_end - s.c_begin + Cfg::J - 1) / Cfg::J;
  return s;
}

// x rows 8t + g of a lane's fragments (t < MT), offset by its column slot `col`: rows past M are never
// read (clamped to row 0, predicated off by ok).
template <typename T, int MT>
struct XRows {
  const T* row[MT];
  bool ok[MT];
  __device__ __forceinline__ XRows(const void* x, int64_t ldx, int M, int g, int col) {
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      const int m = 8 * t + g;
      ok[t] = m < M;
      row[t] = static_cast<const T*>(x) + (ok[t] ? m : 0) * ldx + col;
    }
  }
};

// One loop step's weights for the pipelined loops (fp16 and int8): J chunks x RT tiles x 2 rows
// (n0 + 16 rt + 8 h + g) of 16 bytes a lane, chunk c at element (c * CHUNK + col) of its row; rows past
// N and chunks outside the warp's share (in_range) read as zeros.
template <typename Cfg, int CHUNK, typename E, typename InRange>
__device__ __forceinline__ void load_weight_step(uint4 (&w)[Cfg::J][Cfg::RT][2], const E* weight, int64_t n0, int N,
                                                 int K, int g, int col, int c0, InRange in_range) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int rt = 0; rt < Cfg::RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + 16 * rt + 8 * h + g;
      const bool row_ok = n < N;
      const E* row = weight + (row_ok ? n : 0) * K + col;
#pragma unroll
      for (int j = 0; j < Cfg::J; ++j)
        w[j][rt][h] = row_ok && in_range(c0 + j) ? ld_weight_16<Cfg::L2_256B>(row + (c0 + j) * CHUNK) : zero;
    }
}

// Grid: ceil(N / (16 * RT)) blocks of Cfg::kThreads threads. LN: the LayerNorm prologue; LN_FOLD: the
// folded LayerNorm (fold_stage_x, then the main loop over the staged x; not with LN).
template <typename T, typename OutT, typename Cfg, bool LN = false, bool LN_FOLD = false>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS) decode_linear_kernel(const DecodeLinearParams p) {
  static_assert(!(LN && LN_FOLD), "one LayerNorm form at a time");
  constexpr int RT = Cfg::RT, MT = Cfg::MT, J = Cfg::J, WARPS = Cfg::WARPS;
  constexpr int kVals = RT * MT * 4;  // accumulator floats per lane
  __shared__ float s_partial[WARPS][kVals][32];
  // LN prologue: per-row (mean, rstd) and per-warp partial sums (empty arrays cost nothing otherwise).
  __shared__ float2 s_stats[LN ? Cfg::kMaxM : 1];
  __shared__ float s_part[LN ? 2 * WARPS : 1];
  // Folded LN: per-warp (sum x, sum x^2) of each row; x * w staged in dynamic shared memory
  // (M x fold_stage_stride(K) elements, the launch's dynamic size).
  __shared__ float2 s_rowsum[LN_FOLD ? WARPS : 1][LN_FOLD ? Cfg::kMaxM : 1];
  extern __shared__ uint4 s_fold_x[];

  pdl_launch_dependents();

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4;
  const int q = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::kRowsPerBlock;
  const int K = p.K;

  // Row pointers of this lane's weight rows (n0 + 16 rt + 8 h + g), already offset by its 8-element column
  // slot; rows past the end are never read (clamped, predicated off). x rows: XRows.
  const T* w_row[RT][2];
  bool w_ok[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + 16 * rt + 8 * h + g;
      w_ok[rt][h] = n < p.N;
      w_row[rt][h] = static_cast<const T*>(p.weight) + (w_ok[rt][h] ? n : 0) * K + 8 * q;
    }
  const XRows<T, MT> xr(p.x, p.ldx, p.M, g, 8 * q);

  // This warp's contiguous share of the chunks.
  const int chunks = (K + kChunk - 1) / kChunk;
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
  // The weight loads of one loop step: J chunks x RT tiles x 2 rows of 16 bytes a lane.
  uint4 wv[J][RT][2];
  const auto load_weights = [&](int c) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const bool ok = c + j < c_end && (c + j) * kChunk + 8 * q < K;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[j][rt][h] = ok && w_ok[rt][h] ? ld_weight_16<Cfg::L2_256B>(w_row[rt][h] + (c + j) * kChunk) : zero;
    }
  };
  // The first step's weights go out before the wait: they are constants, and the predecessor's tail hides
  // their latency. So do the epilogue's constants, and the residual right after the wait, where that was
  // measured to pay on the H200 (benchmarks/RESULTS.md, runs E1-E3): the folded LayerNorm's, and a GEMV's that
  // adds into the residual stream (-0.11 ms a token at one row); a GEMV with a bias alone lost (+0.07 ms a
  // step at eight rows). Not with the LN prologue, whose registers are taken.
  if (c_begin < c_end) load_weights(c_begin);
  const bool early = !LN && (LN_FOLD || p.residual != nullptr);
  SlotInputs<T> pre;
  if (early) pre = load_slot_constants<T, Cfg, LN_FOLD>(p, n0);
  pdl_wait();
  if (early) load_slot_residual<T, Cfg>(pre, p, n0);

  float ln_mean[MT], ln_rstd[MT];
  const T* ln_w = LN ? static_cast<const T*>(p.ln_weight) + 8 * q : nullptr;
  T* const s_x = reinterpret_cast<T*>(s_fold_x);
  // x fragments of the main loop: row 8t + g of the staged x, or of x.
  const T* x_frag[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t)
    x_frag[t] = LN_FOLD ? s_x + (xr.ok[t] ? 8 * t + g : 0) * fold_stage_stride(K) + 8 * q : xr.row[t];
  if constexpr (LN_FOLD) {
    fold_stage_x<T, Cfg>(static_cast<const T*>(p.x), static_cast<const T*>(p.ln_weight), p.ldx, p.M, K,
                         c_begin * (kChunk / kVec), max(c_begin, c_end) * (kChunk / kVec), s_x, s_rowsum);
  }
  const T* ln_b = LN && p.ln_bias != nullptr ? static_cast<const T*>(p.ln_bias) + 8 * q : nullptr;
  if constexpr (LN) {
    ln_row_stats<T, WARPS>(p, s_stats, s_part);
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      const float2 st = s_stats[xr.ok[t] ? 8 * t + g : 0];
      ln_mean[t] = st.x;
      ln_rstd[t] = st.y;
    }
  }

  for (int c = c_begin; c < c_end; c += J) {
    bool ok[J];
#pragma unroll
    for (int j = 0; j < J; ++j) ok[j] = c + j < c_end && (c + j) * kChunk + 8 * q < K;

    // This step's weights are in flight (issued before the wait, or at the end of the previous step);
    // x comes from L1 / L2.
    uint4 xv[J][MT];
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        if constexpr (LN_FOLD) {
          xv[j][t] = ok[j] && xr.ok[t] ? *reinterpret_cast<const uint4*>(x_frag[t] + (c + j) * kChunk) : zero;
        } else {
          xv[j][t] = ok[j] && xr.ok[t] ? ld_x_16(x_frag[t] + (c + j) * kChunk) : zero;
        }
      }

#pragma unroll
    for (int j = 0; j < J; ++j) {
      if constexpr (LN) {  // normalise chunk j's x fragments just before their mma
        const uint4 lw = ok[j] ? ld_x_16(ln_w + (c + j) * kChunk) : zero;
        const uint4 lb = ok[j] && ln_b != nullptr ? ld_x_16(ln_b + (c + j) * kChunk) : zero;
#pragma unroll
        for (int t = 0; t < MT; ++t)
          if (ok[j] && xr.ok[t]) xv[j][t] = ln_apply<T>(xv[j][t], lw, lb, ln_mean[t], ln_rstd[t]);
      }
      mma_chunk<T, RT, MT>(acc, wv[j], xv[j]);
    }
    if (c + J < c_end) load_weights(c + J);
  }

  strided_epilogue<T, OutT, Cfg, LN_FOLD>(s_partial, acc, n0, p, &s_rowsum[0][0], pre, early);
}


// ---- the pipelined loop (no LayerNorm prologue; the folded LayerNorm optional) --------------------------
// PipelinedGemvConfig adds the int8 GEMV's two knobs (decode_linear_int8.cuh explains them) to a
// GemvConfig: STAGES = 2 requests a warp's next step of weights before this step's mma, so its stream
// never drains between steps; PERSISTENT launches one wave of blocks that walk the 16-row tiles with a
// grid stride, the next tile's first weights in flight through this tile's epilogue, so the per-block
// start, exit and first round trip are paid once per wave slot rather than once per tile (the waves'
// tail is then a fraction of one tile, not of one block's whole share). The epilogue is the plain
// strided loop of decode_linear_kernel; persistent blocks alternate two partial buffers (one barrier a
// tile). LN_FOLD: the folded LayerNorm of decode_linear_kernel, x staged once a block (fold_stage_x) for
// all its tiles: a persistent grid stages it once an SM slot instead of once a 16-row tile.
template <int RT_, int MT_, int J_, int WARPS_, int MIN_BLOCKS_, int STAGES_, bool PERSISTENT_>
struct PipelinedGemvConfig : GemvConfig<RT_, MT_, J_, WARPS_, MIN_BLOCKS_> {
  static_assert(STAGES_ == 1 || STAGES_ == 2, "one or two register stages");
  static constexpr int STAGES = STAGES_;
  static constexpr bool PERSISTENT = PERSISTENT_;
};

// Grid: ceil(N / (16 * RT)) blocks, or with PERSISTENT at most MIN_BLOCKS per SM (each with a tile).
// LN_FOLD: dynamic shared memory M x fold_stage_stride(K) elements, as decode_linear_kernel's.
template <typename T, typename OutT, typename Cfg, bool LN_FOLD = false>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS)
    decode_linear_pipelined_kernel(const DecodeLinearParams p) {
  constexpr int RT = Cfg::RT, MT = Cfg::MT, J = Cfg::J, WARPS = Cfg::WARPS, S = Cfg::STAGES;
  constexpr int kBufs = Cfg::PERSISTENT ? 2 : 1;
  constexpr int kVals = RT * MT * 4;
  __shared__ float s_partial[kBufs][WARPS][kVals][32];
  __shared__ float2 s_rowsum[LN_FOLD ? WARPS : 1][LN_FOLD ? Cfg::kMaxM : 1];
  extern __shared__ uint4 s_fold_x[];

  pdl_launch_dependents();

  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int q = lane % 4;
  const int K = p.K;
  const WarpShare share = warp_share<Cfg>(static_cast<int>(ceil_div(p.N, Cfg::kRowsPerBlock)),
                                          (K + kChunk - 1) / kChunk);
  const int c_begin = share.c_begin, c_end = share.c_end, steps = share.steps, items = share.items;
  const auto in_range = [&](int c) { return c < c_end && c * kChunk + 8 * q < K; };
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  // Weight loads one step at a time in (tile, step) order; a persistent block keeps a cursor.
  int ld_tile = blockIdx.x, ld_step = 0;
  const auto load_weights = [&](uint4 (&w)[J][RT][2], int item) {
    load_weight_step<Cfg, kChunk>(w, static_cast<const T*>(p.weight),
                                  static_cast<int64_t>(Cfg::PERSISTENT ? ld_tile : blockIdx.x) * Cfg::kRowsPerBlock,
                                  p.N, K, g, 8 * q, c_begin + (Cfg::PERSISTENT ? ld_step : item) * J, in_range);
    if (Cfg::PERSISTENT && ++ld_step == steps) {
      ld_step = 0;
      ld_tile += gridDim.x;
    }
  };

  const XRows<T, MT> xr(p.x, p.ldx, p.M, g, 8 * q);
  // x fragments of the main loop: row 8t + g of the staged x (LN_FOLD), or of x.
  T* const s_x = reinterpret_cast<T*>(s_fold_x);
  const T* x_frag[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t)
    x_frag[t] = LN_FOLD ? s_x + (xr.ok[t] ? 8 * t + g : 0) * fold_stage_stride(K) + 8 * q : xr.row[t];

  float acc[RT][MT][4];
  const auto clear = [&] {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[rt][t][i] = 0.f;
  };
  // One step: its x fragments (L1 / L2) requested together, then the mma of decode_linear_kernel.
  const auto mma_step = [&](const uint4 (&w)[J][RT][2], int step) {
    uint4 xv[J][MT];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int c = c_begin + step * J + j;
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        if constexpr (LN_FOLD) {
          xv[j][t] = in_range(c) && xr.ok[t] ? *reinterpret_cast<const uint4*>(x_frag[t] + c * kChunk) : zero;
        } else {
          xv[j][t] = in_range(c) && xr.ok[t] ? ld_x_16(x_frag[t] + c * kChunk) : zero;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < J; ++j) mma_chunk<T, RT, MT>(acc, w[j], xv[j]);
  };

  const auto finish_tile = [&](int tile, int buf) {
    strided_epilogue<T, OutT, Cfg, LN_FOLD>(s_partial[buf], acc, static_cast<int64_t>(tile) * Cfg::kRowsPerBlock, p,
                                            &s_rowsum[0][0]);
  };

  clear();
  // The first S steps' weights go out before the wait: constants, their latency under the predecessor's
  // tail.
  uint4 wv[S][J][RT][2];
#pragma unroll
  for (int s = 0; s < S; ++s)
    if (s < items) load_weights(wv[s], s);
  pdl_wait();
  if constexpr (LN_FOLD) {  // s_rowsum is read after the epilogue's barrier
    fold_stage_x<T, Cfg>(static_cast<const T*>(p.x), static_cast<const T*>(p.ln_weight), p.ldx, p.M, K,
                         c_begin * (kChunk / kVec), max(c_begin, c_end) * (kChunk / kVec), s_x, s_rowsum);
  }

  int tile = blockIdx.x, step = 0, buf = 0;  // the tile and step being computed (persistent walk)
  for (int base = 0; base < items; base += S) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int item = base + s;
      if (item >= items) break;  // block-uniform when persistent (no barrier in the loop otherwise)
      mma_step(wv[s], Cfg::PERSISTENT ? step : item);
      if (item + S < items) load_weights(wv[s], item + S);  // in flight through the epilogue below
      if constexpr (Cfg::PERSISTENT) {
        if (++step < steps) continue;
        finish_tile(tile, buf);
        clear();
        buf ^= 1;
        tile += gridDim.x;
        step = 0;
      }
    }
  }
  if constexpr (!Cfg::PERSISTENT) finish_tile(blockIdx.x, 0);  // the block's one tile
}

}  // namespace gemv
}  // namespace persimmon_rt
