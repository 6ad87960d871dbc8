// Causal flash attention of packed new tokens over their sequence's KV cache on Hopper (sm_90a): the op
// of attention_prefill.cuh (semantics: persimmon_rt/reference.py::attention_prefill) on warpgroup MMA
// fed by the bulk tensor copy engine. head_dim 64 or 128.
//
// One block owns BLOCK_M = 64 * CONSUMERS consecutive queries of one (sequence, head), in warpgroups:
// - warpgroup 0, the producer: one thread copies the block's Q tile once, then the K and V tiles of
//   BLOCK_N keys into a ring of STAGES shared-memory slots (cp.async.bulk.tensor, 128-byte swizzle).
//   Each slot has a "full" mbarrier (completed by the copy's bytes) and an "empty" one (one arrival per
//   consumer warp once its tensor-core reads of the slot are done); K and V have separate rings, so the
//   scores of a tile can start before its values land.
// - warpgroups 1..CONSUMERS, the consumers: 64 query rows each. S = Q K^T is one wgmma m64nBLOCK_Nk16 per
//   16 of head_dim, both operands in shared memory; the online softmax (base 2, running max and sum in
//   fp32) runs on the accumulators in registers; P, rounded to T, is the register A operand of
//   O += P V (wgmma m64n64k16, V MN-major in shared memory). The S of tile t is issued together with
//   the P V of tile t - 1, so a warpgroup's softmax of tile t overlaps its P V on the tensor cores; with
//   PINGPONG the consumers also take turns issuing (named barriers), so that one's softmax overlaps the
//   others' products rather than coinciding with them.
// The producer gives most of its registers to the consumers (setmaxnreg).
//
// head_dim 128: Q, K and V tiles are kept as two 64-column halves, each laid out exactly as a head_dim 64
// tile (one 128-byte swizzle row per key or query, its own bulk copy). S = Q K^T walks the k steps of both
// halves; O += P V is two m64n64k16 products per 16 keys, one per half of V, into the two halves of O.
//
// At head_dim 64 a tile's exponentials (MUFU, 16 a clock per SM) take about as long as its tensor-core
// work, and the softmax's other instructions fill most of the remaining issue slots, so the config also
// carries options of the softmax that trade these against each other (PrefillSm90Config).
#pragma once

#include <cstdint>

#include "attention_common.cuh"
#include "attention_prefill.cuh"  // PrefillParams
#include "ptx_sm90.cuh"

namespace persimmon_rt {
namespace attention {

// Softmax options, each a template parameter so that benchmarks/attention_variants.cu times them in
// combination (the defaults are the plain online softmax):
// - EXP_POLY16: of every 16 exponentials of an unmasked tile, this many run on the FMA pipe (exp2_poly)
//   instead of the MUFU, so that both pipes work; 0 = all on the MUFU.
// - MAX_SLACK < 0: the running max follows every tile and O is rescaled after every tile. >= 0: a row's
//   reference max moves only when a tile's max exceeds it by more than MAX_SLACK (log2 units), so P stays
//   <= 2^MAX_SLACK (far inside fp16 and bf16), and a warp rescales O only when one of its rows moved,
//   which after the first tiles of a long row is rare.
// - ROWSUM_MMA: the row sums of P come from the tensor cores (P times a tile of ones, wgmma m64n8k16 per 16
//   keys) instead of one FADD per element; they are then sums of P as rounded to T, as P V uses it.
// - POLY_DEGREE: degree of exp2_poly's polynomial (3, 4 or 5).
template <int CONSUMERS, int BLOCK_N, int STAGES, bool PINGPONG, int BLOCKS_PER_SM = 1, int EXP_POLY16 = 0,
          int MAX_SLACK = -1, bool ROWSUM_MMA = false, int POLY_DEGREE = 3, int HEAD_DIM = 64>
struct PrefillSm90Config {
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kHalves = HEAD_DIM / 64;  // 64-column halves of a tile (above)
  static constexpr int kRowBytes = 128;          // a key's or query's row within one half: one swizzle row
  static constexpr int kConsumers = CONSUMERS;
  static constexpr int kBlockM = 64 * CONSUMERS;
  static constexpr int kBlockN = BLOCK_N;
  static constexpr int kStages = STAGES;
  static constexpr bool kPingpong = PINGPONG && CONSUMERS > 1;
  static constexpr int kThreads = 128 * (CONSUMERS + 1);
  // Two blocks per SM overlap one's prologue and epilogue with the other's work, at half the registers.
  static constexpr int kBlocksPerSm = BLOCKS_PER_SM;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegsFit = (65536 / kBlocksPerSm - 128 * kProducerRegs) / (128 * CONSUMERS) / 8 * 8;
  static constexpr int kConsumerRegs = kConsumerRegsFit < 240 ? kConsumerRegsFit : 240;
  static constexpr int kExpPoly16 = EXP_POLY16;
  static constexpr int kPolyChunks = EXP_POLY16 * BLOCK_N / 8 / 16;  // 8-key chunks of a tile on exp2_poly
  static constexpr int kMaxSlack = MAX_SLACK;
  static constexpr bool kRowsumMma = ROWSUM_MMA;
  static constexpr int kPolyDegree = POLY_DEGREE;
  // Shared memory, byte offsets from a 1024-aligned base: Q, the K ring, the V ring, the tile of ones
  // (ROWSUM_MMA), then the mbarriers (Q full; K full, V full, K empty, V empty per stage). Each Q tile and
  // ring slot holds its halves one after the other.
  static constexpr int kQHalfBytes = kBlockM * kRowBytes;
  static constexpr int kHalfTileBytes = kBlockN * kRowBytes;
  static constexpr int kTileBytes = kHalves * kHalfTileBytes;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kHalves * kQHalfBytes;
  static constexpr int kVOffset = kKOffset + STAGES * kTileBytes;
  static constexpr int kOnesOffset = kVOffset + STAGES * kTileBytes;
  static constexpr int kOnesBytes = ROWSUM_MMA ? 1024 : 0;  // 8 rows of 128 bytes: B of m64n8k16, K-major
  static constexpr int kBarrierOffset = kOnesOffset + kOnesBytes;
  static constexpr int kSmemBytes = 1024 + kBarrierOffset + 8 * (1 + 4 * STAGES);  // + alignment slack
  // Named barriers: 1..CONSUMERS the issue turns, then one for the consumers together.
  static constexpr int kTurnBarrier = 1;
  static constexpr int kConsumerBarrier = 1 + CONSUMERS;

  static_assert(BLOCK_N == 64 || BLOCK_N == 128, "S tiles are wgmma m64n64 or m64n128 (ptx_sm90.cuh)");
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head_dim 64 or 128: one or two 64-column halves");
  static_assert(STAGES >= 2, "the producer fills one slot while the consumers read another");
  static_assert(kBlockM <= 256 && kBlockN <= 256, "a TMA box has at most 256 rows");
  static_assert(kConsumerBarrier <= 15, "named barrier ids end at 15");
  static_assert(kConsumerRegs >= 96, "registers for the S, P and O fragments");
  static_assert(kSmemBytes <= 227 * 1024 / kBlocksPerSm, "shared memory of kBlocksPerSm blocks per SM");
  static_assert(EXP_POLY16 >= 0 && EXP_POLY16 <= 16 && kPolyChunks * 16 * 8 == EXP_POLY16 * BLOCK_N,
                "EXP_POLY16 / 16 of a tile's 8-key chunks must be a whole number of chunks");
  static_assert(POLY_DEGREE >= 3 && POLY_DEGREE <= 5, "exp2_poly has polynomials of degree 3 to 5");
  static_assert(MAX_SLACK <= 15, "P <= 2^MAX_SLACK must stay below fp16's largest finite value (and x <= 16 for "
                "exp2_poly)");
};

// The Q, K and V tensor maps are built on the host per launch (they hold the global addresses) and passed
// by value as a __grid_constant__ parameter, where the copy engine reads them.
struct PrefillSm90Params {
  CUtensorMap q_map;  // q as [T, H * D], boxes of [kBlockM, 64] (one half of a tile)
  CUtensorMap k_map;  // k_cache as [B * S, H * D], boxes of [kBlockN, 64]
  CUtensorMap v_map;  // v_cache likewise
  PrefillParams p;
};

// What one block works on; every field is the same in all its threads.
struct PrefillSm90Block {
  int head, seq;
  int m0;       // first query of the block within its sequence
  int q_begin;  // the sequence's first query in q / out
  int rows;     // queries of the block (<= kBlockM)
  int pos0;     // position of the block's first query
  int kv_len;   // keys of the sequence
  int n_tiles;  // key tiles the block reads: keys [0, pos0 + rows)
};

template <typename Cfg>
struct PrefillSm90Smem {
  unsigned char* base;  // 1024-byte aligned
  __device__ uint64_t* bars() const { return reinterpret_cast<uint64_t*>(base + Cfg::kBarrierOffset); }
  __device__ uint64_t* q_full() const { return bars(); }
  __device__ uint64_t* k_full(int s) const { return bars() + 1 + s; }
  __device__ uint64_t* v_full(int s) const { return bars() + 1 + Cfg::kStages + s; }
  __device__ uint64_t* k_empty(int s) const { return bars() + 1 + 2 * Cfg::kStages + s; }
  __device__ uint64_t* v_empty(int s) const { return bars() + 1 + 3 * Cfg::kStages + s; }
  // Half h of the Q tile at q() + h * kQHalfBytes, of a K or V slot at k(s) / v(s) + h * kHalfTileBytes.
  __device__ unsigned char* q() const { return base + Cfg::kQOffset; }
  __device__ unsigned char* k(int s) const { return base + Cfg::kKOffset + s * Cfg::kTileBytes; }
  __device__ unsigned char* v(int s) const { return base + Cfg::kVOffset + s * Cfg::kTileBytes; }
  __device__ unsigned char* ones() const { return base + Cfg::kOnesOffset; }
};

// Slot and phase parity of a tile in a ring of STAGES slots, stepped tile by tile (no divisions).
template <int STAGES>
struct PrefillSm90Ring {
  int slot = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++slot == STAGES) {
      slot = 0;
      phase ^= 1;
    }
  }
};

// The producer thread: Q once, then K and V tile by tile as the consumers free the slots.
template <typename Cfg>
__device__ __forceinline__ void prefill_sm90_produce(const PrefillSm90Params& prm, const PrefillSm90Block& b,
                                                     const PrefillSm90Smem<Cfg>& sm) {
  using namespace sm90;
  prefetch_tensor_map(&prm.q_map);
  prefetch_tensor_map(&prm.k_map);
  prefetch_tensor_map(&prm.v_map);
  const int col = b.head * Cfg::kHeadDim;
  mbar_arrive_expect_tx(sm.q_full(), Cfg::kHalves * Cfg::kQHalfBytes);
#pragma unroll
  for (int h = 0; h < Cfg::kHalves; ++h)
    tma_load_2d(sm.q() + h * Cfg::kQHalfBytes, &prm.q_map, col + 64 * h, b.q_begin + b.m0, sm.q_full());
  int row = b.seq * prm.p.cache_len;  // the launcher checks B * S fits an int
  PrefillSm90Ring<Cfg::kStages> ring;
  for (int t = 0; t < b.n_tiles; ++t, row += Cfg::kBlockN, ring.advance()) {
    const int s = ring.slot;
    const uint32_t empty_parity = ring.phase ^ 1;
    mbar_wait(sm.k_empty(s), empty_parity);
    mbar_arrive_expect_tx(sm.k_full(s), Cfg::kTileBytes);
#pragma unroll
    for (int h = 0; h < Cfg::kHalves; ++h)
      tma_load_2d(sm.k(s) + h * Cfg::kHalfTileBytes, &prm.k_map, col + 64 * h, row, sm.k_full(s));
    mbar_wait(sm.v_empty(s), empty_parity);
    mbar_arrive_expect_tx(sm.v_full(s), Cfg::kTileBytes);
#pragma unroll
    for (int h = 0; h < Cfg::kHalves; ++h)
      tma_load_2d(sm.v(s) + h * Cfg::kHalfTileBytes, &prm.v_map, col + 64 * h, row, sm.v_full(s));
  }
}

// 2^f for f in [-1/2, 1/2]: minimax polynomials for the relative error, in Horner form on FMAs. Maximum
// relative errors (fp32 evaluation): degree 3 7.5e-5, 4 2.7e-6, 5 2.1e-7; fp16 rounds P to 4.9e-4.
template <int DEGREE>
__device__ __forceinline__ float exp2_poly_frac(float f) {
  if constexpr (DEGREE == 3) {
    return fmaf(fmaf(fmaf(5.517166853e-02f, f, 2.426111251e-01f), f, 6.932609677e-01f), f, 9.999280572e-01f);
  } else if constexpr (DEGREE == 4) {
    float p = fmaf(9.570102207e-03f, f, 5.591785908e-02f);
    p = fmaf(p, f, 2.402474433e-01f);
    p = fmaf(p, f, 6.931217909e-01f);
    return fmaf(p, f, 9.999992847e-01f);
  } else {
    float p = fmaf(1.327647245e-03f, f, 9.675540961e-03f);
    p = fmaf(p, f, 5.550713092e-02f);
    p = fmaf(p, f, 2.402212024e-01f);
    p = fmaf(p, f, 6.931469440e-01f);
    return fmaf(p, f, 1.000000119e+00f);
  }
}

// 2^x on the FMA pipe for x = 128 y - 112, y in [0, 1] (so x in [-112, 16]): the caller computes y with
// one saturating FMA from the score, which also clamps x (-inf and NaN included) where n below stays in
// the exponent's range; 2^-112 in place of a smaller P weighs nothing beside the row's largest P of >= 1.
// x = n + f with n the nearest integer: t = 128 y + (1.5 * 2^23 - 112) rounds to 1.5 * 2^23 + n, an
// integer whose low mantissa bits are n, and f = 128 y - (t - (1.5 * 2^23 - 112)) is exact; 2^f comes from
// the polynomial and n is added to its exponent bits (the low 9 bits of t shifted there are n mod 2^9,
// which the 32-bit add absorbs). 8 instructions with the caller's FFMA.SAT, against FFMA + MUFU (a MUFU
// instruction of a warp takes 8 of its clocks).
constexpr float kExp2PolyWidth = 128.f;
constexpr float kExp2PolyLow = -112.f;

template <int DEGREE>
__device__ __forceinline__ float exp2_poly(float y) {
  constexpr float kBias = 12582912.f + kExp2PolyLow;  // 1.5 * 2^23 - 112: an integer, exact in fp32
  const float t = fmaf(y, kExp2PolyWidth, kBias);
  const float f = fmaf(y, kExp2PolyWidth, __fadd_rn(kBias, -t));  // _rn: not merged into the FMA
  const uint32_t p = __float_as_uint(exp2_poly_frac<DEGREE>(f));
  return __uint_as_float(p + (__float_as_uint(t) << 23));
}

// min(max(a * b + c, 0), 1) in one FFMA.SAT (fmaf then __saturatef compiles to two instructions).
__device__ __forceinline__ float fma_sat(float a, float b, float c) {
  float d;
  asm("fma.rn.sat.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}

// y of exp2_poly for x = s * scale_log2 + neg_ref, with y_scale = scale_log2 / 128 and
// y_bias = exp2_poly_bias(neg_ref).
__device__ __forceinline__ float exp2_poly_bias(float neg_ref) {
  return fmaf(neg_ref, 1.f / kExp2PolyWidth, -kExp2PolyLow / kExp2PolyWidth);
}

// A consumer thread's online-softmax state for its two rows.
struct PrefillSm90Rows {
  float m[2];      // reference max of each row (scaled, log2 units); -inf before its first visible key
  float l[2];      // running sum of P over this thread's columns (unused with ROWSUM_MMA)
  float alpha[2];  // the factor O (and the tensor-core sums) take before the next P V
  bool rescale;    // whether that factor may differ from 1 (with MAX_SLACK >= 0 the same in the warp)
};

// Whether 8-key chunk i of an unmasked tile takes exp2_poly: kPolyChunks of the tile's chunks, spread out.
template <typename Cfg>
__host__ __device__ constexpr bool prefill_sm90_poly_chunk(int i) {
  return Cfg::kPolyChunks > 0 && (i * Cfg::kPolyChunks) % (Cfg::kBlockN / 8) < Cfg::kPolyChunks;
}

// mx[h][0] = max of mx[h][0 .. 2W) for both rows, halving W per level.
template <int W, int N>
__device__ __forceinline__ void prefill_sm90_fold_max(float (&mx)[2][N]) {
#pragma unroll
  for (int i = 0; i < W; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) mx[h][i] = fmaxf(mx[h][i], mx[h][i + W]);
  if constexpr (W > 1) prefill_sm90_fold_max<W / 2>(mx);
}

// Online softmax of one S tile held as the m64nNk16 accumulator fragment (ptx_sm90.cuh): this thread's
// rows are `pos` and `pos + 8` (positions), its columns key0 + 8i + {0, 1}. Scores of keys after a row's
// position become -inf first when `masked` (tiles that cross the diagonal). On return s holds
// exp2(s * scale_log2 - m) against the updated reference max m, and r's alpha and l are updated (see
// PrefillSm90Config for MAX_SLACK and ROWSUM_MMA). POLY: the chunks of prefill_sm90_poly_chunk take
// exp2_poly (only for unmasked tiles: masked scores must come out exactly 0).
template <typename Cfg, bool POLY>
__device__ __forceinline__ void prefill_sm90_softmax(float (&s)[Cfg::kBlockN / 2], PrefillSm90Rows& r, bool masked,
                                                     int key0, int pos, float scale_log2) {
  constexpr int NS = Cfg::kBlockN / 2;
  if (masked) {
#pragma unroll
    for (int i = 0; i < NS / 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (key0 + 8 * i + e > pos + 8 * h) s[4 * i + 2 * h + e] = -INFINITY;  // select: garbage NaN goes too
  }
  // Row maxima as trees over both rows (depth log2(NS / 2)): a chain of NS / 2 dependent FMNMX per row
  // would hold back every exponential of the tile for its latency.
  float mx[2][NS / 4];
#pragma unroll
  for (int i = 0; i < NS / 4; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) mx[h][i] = fmaxf(s[4 * i + 2 * h], s[4 * i + 2 * h + 1]);
  prefill_sm90_fold_max<NS / 8>(mx);
#pragma unroll
  for (int lanes = 1; lanes <= 2; lanes *= 2)  // the 4 lanes of a quad share the row
#pragma unroll
    for (int h = 0; h < 2; ++h) mx[h][0] = fmaxf(mx[h][0], __shfl_xor_sync(0xffffffffu, mx[h][0], lanes));
  const float tile_max[2] = {mx[0][0] * scale_log2, mx[1][0] * scale_log2};
  if constexpr (Cfg::kMaxSlack < 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float new_max = fmaxf(r.m[h], tile_max[h]);
      // A row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
      r.alpha[h] = exp2f(r.m[h] - (new_max == -INFINITY ? 0.f : new_max));
      r.m[h] = new_max;
    }
    r.rescale = true;
  } else {
    const bool grow0 = tile_max[0] > r.m[0] + float(Cfg::kMaxSlack);
    const bool grow1 = tile_max[1] > r.m[1] + float(Cfg::kMaxSlack);
    r.rescale = __any_sync(0xffffffffu, grow0 || grow1);  // warp-uniform, so the skip skips instructions
    if (r.rescale) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float new_max = (h == 0 ? grow0 : grow1) ? tile_max[h] : r.m[h];
        r.alpha[h] = exp2f(r.m[h] - (new_max == -INFINITY ? 0.f : new_max));
        r.m[h] = new_max;
        if constexpr (!Cfg::kRowsumMma) r.l[h] *= r.alpha[h];
      }
    }
  }
  const float y_scale = scale_log2 * (1.f / kExp2PolyWidth);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float neg_ref = r.m[h] == -INFINITY ? 0.f : -r.m[h];
    const float y_bias = exp2_poly_bias(neg_ref);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < NS / 4; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * i + 2 * h + e];
        if (POLY && prefill_sm90_poly_chunk<Cfg>(i))
          x = exp2_poly<Cfg::kPolyDegree>(fma_sat(x, y_scale, y_bias));
        else
          x = exp2f(fmaf(x, scale_log2, neg_ref));
        sum = i == 0 && e == 0 ? x : sum + x;
      }
    if constexpr (!Cfg::kRowsumMma) {
      if constexpr (Cfg::kMaxSlack < 0) r.l[h] = r.l[h] * r.alpha[h] + sum;
      else r.l[h] += sum;
    }
  }
}

// The softmax of tile S with the masked tiles on the MUFU alone (one copy of the code when nothing
// takes exp2_poly).
template <typename Cfg>
__device__ __forceinline__ void prefill_sm90_softmax_tile(float (&s)[Cfg::kBlockN / 2], PrefillSm90Rows& r,
                                                          bool masked, int key0, int pos, float scale_log2) {
  if constexpr (Cfg::kPolyChunks > 0) {
    if (masked) prefill_sm90_softmax<Cfg, false>(s, r, true, key0, pos, scale_log2);
    else prefill_sm90_softmax<Cfg, true>(s, r, false, key0, pos, scale_log2);
  } else {
    prefill_sm90_softmax<Cfg, false>(s, r, masked, key0, pos, scale_log2);
  }
}

// S = Q K^T for one key tile: head_dim / 16 k steps, each 32 bytes further along both operands' rows (four
// a half, then on to the next half). q_lo and k_lo: the low words of the tiles' descriptors (sw128_desc_lo).
template <typename T, typename Cfg>
__device__ __forceinline__ void prefill_sm90_scores(float (&s)[Cfg::kBlockN / 2], uint32_t q_lo, uint32_t k_lo) {
#pragma unroll
  for (int j = 0; j < Cfg::kHeadDim / 16; ++j) {
    const uint32_t q_at = q_lo + (j / 4) * (Cfg::kQHalfBytes >> 4) + 2 * (j % 4);
    const uint32_t k_at = k_lo + (j / 4) * (Cfg::kHalfTileBytes >> 4) + 2 * (j % 4);
    sm90::WgmmaSS<T, Cfg::kBlockN>::run(s, sm90::sw128_desc_of_lo(q_at), sm90::sw128_desc_of_lo(k_at), j > 0);
  }
}

// O += P V for one key tile: BLOCK_N / 16 k steps of 16 keys, each 16 rows (2048 bytes) further into V,
// one m64n64k16 per half of V into that half of O; with ROWSUM_MMA also the row sums of P into ls, from
// the ones tile.
template <typename T, typename Cfg>
__device__ __forceinline__ void prefill_sm90_values(float (&o)[Cfg::kHalves][32], float (&ls)[4],
                                                    const uint32_t (&pa)[Cfg::kBlockN / 16][4], uint32_t v_lo,
                                                    uint32_t ones_lo) {
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockN / 16; ++kk) {
#pragma unroll
    for (int h = 0; h < Cfg::kHalves; ++h)
      sm90::WgmmaRS<T, 64>::run(
          o[h], pa[kk], sm90::sw128_desc_of_lo(v_lo + ((h * Cfg::kHalfTileBytes + kk * 16 * Cfg::kRowBytes) >> 4)), 1);
    if constexpr (Cfg::kRowsumMma) sm90::WgmmaRSKMajor<T, 8>::run(ls, pa[kk], sm90::sw128_desc_of_lo(ones_lo), 1);
  }
}

// The S accumulators of keys 16kk..16kk+15 (chunks 2kk, 2kk+1), rounded to T, are the register A
// fragment of the P V step over those keys (the two fragment layouts in ptx_sm90.cuh line up).
template <typename T, int NS>
__device__ __forceinline__ void prefill_sm90_pack_p(uint32_t (&pa)[NS / 8][4], const float (&s)[NS]) {
#pragma unroll
  for (int kk = 0; kk < NS / 8; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) pa[kk][j] = pack2<T>(s[8 * kk + 2 * j], s[8 * kk + 2 * j + 1]);
}

// Issue turns of the consumer warpgroups (PINGPONG): warpgroup c waits for turn barrier c, issues, then
// opens barrier c + 1 (mod CONSUMERS). Warpgroup 0 skips its first wait and the last warpgroup its last
// opening, so every barrier sees as many arrivals as waits. Each warpgroup takes n_tiles + 1 turns.
template <typename Cfg>
__device__ __forceinline__ void prefill_sm90_turn_wait(int c, bool first) {
  if constexpr (Cfg::kPingpong)
    if (!(c == 0 && first)) sm90::named_barrier_sync<Cfg::kTurnBarrier, Cfg::kConsumers>(c, 256);
}

template <typename Cfg>
__device__ __forceinline__ void prefill_sm90_turn_done(int c, bool last) {
  if constexpr (Cfg::kPingpong)
    if (!(c == Cfg::kConsumers - 1 && last))
      sm90::named_barrier_arrive<Cfg::kTurnBarrier, Cfg::kConsumers>((c + 1) % Cfg::kConsumers, 256);
}

// Rows of the last V tile at or past the sequence's end hold whatever the cache holds there (NaN in the
// tests); their P is 0, but 0 * NaN is NaN, so the consumers zero them in shared memory before the last
// P V. Only the block holding the sequence's last query can see such keys.
template <typename Cfg>
__device__ __forceinline__ void prefill_sm90_zero_tail(const PrefillSm90Block& b, unsigned char* v_tile, int c) {
  const int first_bad = b.kv_len - (b.n_tiles - 1) * Cfg::kBlockN;  // >= 1: the tile holds key pos0 + rows - 1
  if (first_bad >= Cfg::kBlockN) return;                             // the same in every consumer thread
  constexpr int kChunksPerRow = Cfg::kRowBytes / 16;
  for (int h = 0; h < Cfg::kHalves; ++h)
    for (int i = first_bad * kChunksPerRow + c * 128 + int(threadIdx.x % 128); i < Cfg::kBlockN * kChunksPerRow;
         i += 128 * Cfg::kConsumers)  // whole rows: the swizzle stays inside
      *reinterpret_cast<uint4*>(v_tile + h * Cfg::kHalfTileBytes + 16 * i) = make_uint4(0, 0, 0, 0);
  sm90::fence_proxy_async_smem();
  sm90::named_barrier_sync<Cfg::kConsumerBarrier>(128 * Cfg::kConsumers);
}

// O / l, rounded to T, for this thread's two rows (those inside the block's queries). l: this thread's
// share of the row sums (summed over the quad here), or with ROWSUM_MMA the whole sums. o[h][4i + 2r + e]
// is column 64h + 8i + 2(lane % 4) + e of row r.
template <typename T, typename Cfg>
__device__ __forceinline__ void prefill_sm90_store(const PrefillParams& p, const PrefillSm90Block& b,
                                                   const float (&o)[Cfg::kHalves][32], const float (&l)[2], int row) {
  const int lane = threadIdx.x % 32;
  const int64_t tok_stride = int64_t(p.num_heads) * Cfg::kHeadDim;
  T* g_o = static_cast<T*>(p.out) + (b.q_begin + b.m0) * tok_stride + b.head * Cfg::kHeadDim + 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    if constexpr (!Cfg::kRowsumMma) {
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // sum == 0 only for rows that see no key (invalid input)
    if (row + 8 * r < b.rows) {
      T* dst = g_o + (row + 8 * r) * tok_stride;
#pragma unroll
      for (int h = 0; h < Cfg::kHalves; ++h)
#pragma unroll
        for (int i = 0; i < 8; ++i)
          *reinterpret_cast<uint32_t*>(dst + 64 * h + 8 * i) =
              pack2<T>(o[h][4 * i + 2 * r] * inv, o[h][4 * i + 2 * r + 1] * inv);
    }
  }
}

// Consumer warpgroup c: rows 64c..64c+63 of the block.
// Tile t's turn issues S_t = Q K_t^T and then O += P_{t-1} V_{t-1}; the softmax of S_t runs while P V
// does. Only the next turn waits for that P V, then rescales O and packs P_t (still in s as fp32): the
// wait stays after the softmax this way, where the compiler keeps it (a wait placed between the two in
// the same basic block is scheduled ahead of the softmax, which then no longer overlaps anything).
template <typename T, typename Cfg>
__device__ __forceinline__ void prefill_sm90_consume(const PrefillSm90Params& prm, const PrefillSm90Block& b,
                                                     const PrefillSm90Smem<Cfg>& sm, int c) {
  using namespace sm90;
  constexpr int BN = Cfg::kBlockN;
  constexpr uint32_t kTileLo = Cfg::kTileBytes >> 4;  // one ring slot in descriptor units
  const int tid = threadIdx.x % 128;
  const int lane = tid % 32;
  const int row = 64 * c + 16 * (tid / 32) + lane / 4;  // this thread's first row in the block; second + 8
  const int pos = b.pos0 + row;
  const int wg_pos0 = b.pos0 + 64 * c;
  const int n_full = wg_pos0 + 1 > 0 ? (wg_pos0 + 1) / BN : 0;  // tiles visible to every row: no mask
  const int col0 = 2 * (lane % 4);
  const uint32_t q_lo = sw128_desc_lo(smem_addr(sm.q() + 64 * c * Cfg::kRowBytes));  // in half 0
  const uint32_t k_lo = sw128_desc_lo(smem_addr(sm.k(0)));
  const uint32_t v_lo = sw128_desc_lo(smem_addr(sm.v(0)));
  const uint32_t ones_lo = sw128_desc_lo(smem_addr(sm.ones()));
  const float scale_log2 = prm.p.scale_log2;

  float s[BN / 2];
  uint32_t pa[BN / 16][4];
  float o[Cfg::kHalves][32];  // the m64n64 accumulators of each half of O
#pragma unroll
  for (int h = 0; h < Cfg::kHalves; ++h)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[h][i] = 0.f;
  float ls[4] = {0.f, 0.f, 0.f, 0.f};  // ROWSUM_MMA: the row sums, rows r and r + 8 in ls[0] and ls[2]
  PrefillSm90Rows rows{{-INFINITY, -INFINITY}, {0.f, 0.f}, {0.f, 0.f}, false};

  // Before issuing P_{t-1} V_{t-1}: P V of t - 2 is done (its V slot, v_free when t >= 2, is free), O is
  // rescaled to the reference max of t - 1, and P_{t-1} is packed (its registers were P V t - 2's operand).
  auto finish_previous = [&](int v_free) {
    wgmma_wait<0>();
    reg_fence(o);
    reg_fence(pa);
    if constexpr (Cfg::kRowsumMma) reg_fence(ls);
    if (v_free >= 0 && lane == 0) mbar_arrive(sm.v_empty(v_free));
    if (rows.rescale) {
#pragma unroll
      for (int h = 0; h < Cfg::kHalves; ++h)
#pragma unroll
        for (int i = 0; i < 32; ++i) o[h][i] *= rows.alpha[(i / 2) % 2];  // o[h][4j + 2r + e]: row r
      if constexpr (Cfg::kRowsumMma)
#pragma unroll
        for (int i = 0; i < 4; ++i) ls[i] *= rows.alpha[i / 2];
    }
    prefill_sm90_pack_p<T>(pa, s);
  };

  mbar_wait(sm.q_full(), 0);
  if (b.n_tiles > 0) {  // the same in the whole block, so the turns stay matched
    mbar_wait(sm.k_full(0), 0);
    prefill_sm90_turn_wait<Cfg>(c, true);
    reg_fence(s);
    wgmma_fence();
    prefill_sm90_scores<T, Cfg>(s, q_lo, k_lo);
    wgmma_commit();
    prefill_sm90_turn_done<Cfg>(c, false);
    wgmma_wait<0>();
    reg_fence(s);
    if (lane == 0) mbar_arrive(sm.k_empty(0));
    prefill_sm90_softmax_tile<Cfg>(s, rows, 0 >= n_full, col0, pos, scale_log2);  // alpha 0: o stays 0

    PrefillSm90Ring<Cfg::kStages> prev;  // the slot of tile t - 1
    int v_free = -1;                     // and of t - 2, once there is one
    for (int t = 1; t < b.n_tiles; ++t) {
      PrefillSm90Ring<Cfg::kStages> cur = prev;
      cur.advance();
      mbar_wait(sm.k_full(cur.slot), cur.phase);
      mbar_wait(sm.v_full(prev.slot), prev.phase);
      finish_previous(v_free);
      prefill_sm90_turn_wait<Cfg>(c, false);
      reg_fence(s);
      reg_fence(o);
      reg_fence(pa);
      if constexpr (Cfg::kRowsumMma) reg_fence(ls);
      wgmma_fence();
      prefill_sm90_scores<T, Cfg>(s, q_lo, k_lo + cur.slot * kTileLo);
      wgmma_commit();
      prefill_sm90_values<T, Cfg>(o, ls, pa, v_lo + prev.slot * kTileLo, ones_lo);
      wgmma_commit();
      prefill_sm90_turn_done<Cfg>(c, false);
      wgmma_wait<1>();  // the scores, the older group
      reg_fence(s);
      if (lane == 0) mbar_arrive(sm.k_empty(cur.slot));
      prefill_sm90_softmax_tile<Cfg>(s, rows, t >= n_full, t * BN + col0, pos, scale_log2);
      v_free = prev.slot;
      prev = cur;
    }

    // The values of the last tile.
    mbar_wait(sm.v_full(prev.slot), prev.phase);
    finish_previous(v_free);
    prefill_sm90_zero_tail<Cfg>(b, sm.v(prev.slot), c);  // before the turn: it waits for every consumer
    prefill_sm90_turn_wait<Cfg>(c, false);
    reg_fence(o);
    reg_fence(pa);
    if constexpr (Cfg::kRowsumMma) reg_fence(ls);
    wgmma_fence();
    prefill_sm90_values<T, Cfg>(o, ls, pa, v_lo + prev.slot * kTileLo, ones_lo);
    wgmma_commit();
    prefill_sm90_turn_done<Cfg>(c, true);
    wgmma_wait<0>();
    reg_fence(o);
    if constexpr (Cfg::kRowsumMma) reg_fence(ls);
  }
  if constexpr (Cfg::kRowsumMma) {
    const float l[2] = {ls[0], ls[2]};
    prefill_sm90_store<T, Cfg>(prm.p, b, o, l, row);
  } else {
    prefill_sm90_store<T, Cfg>(prm.p, b, o, rows.l, row);
  }
}

// Grid: (H, ceil(max_q_len / kBlockM), B), blockIdx.y counting down the query tiles so that all heads'
// longest tiles (most keys) start first, as in attention_prefill_kernel.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kBlocksPerSm)
    attention_prefill_sm90_kernel(const __grid_constant__ PrefillSm90Params prm) {
#ifdef PRT_SM90A
  const PrefillParams& p = prm.p;
  PrefillSm90Block b;
  b.head = blockIdx.x;
  b.seq = blockIdx.z;
  b.m0 = (gridDim.y - 1 - blockIdx.y) * Cfg::kBlockM;
  b.q_begin = p.cu_seqlens_q[b.seq];
  const int n_q = p.cu_seqlens_q[b.seq + 1] - b.q_begin;
  if (b.m0 >= n_q) return;  // the whole block: nothing below has started
  b.kv_len = p.seq_lens[b.seq];
  b.rows = min(Cfg::kBlockM, n_q - b.m0);
  b.pos0 = b.kv_len - n_q + b.m0;
  const int kv_end = b.pos0 + b.rows;
  b.n_tiles = kv_end > 0 ? (kv_end + Cfg::kBlockN - 1) / Cfg::kBlockN : 0;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const PrefillSm90Smem<Cfg> sm{smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023)};
  if constexpr (Cfg::kRowsumMma) {
    if (threadIdx.x < Cfg::kOnesBytes / 16) {
      const uint32_t one = pack2<T>(1.f, 1.f);
      reinterpret_cast<uint4*>(sm.ones())[threadIdx.x] = make_uint4(one, one, one, one);
      sm90::fence_proxy_async_smem();  // read by wgmma (the async proxy) after the __syncthreads below
    }
  }
  if (threadIdx.x == 0) {
    sm90::mbar_init(sm.q_full(), 1);
    for (int s = 0; s < Cfg::kStages; ++s) {
      sm90::mbar_init(sm.k_full(s), 1);
      sm90::mbar_init(sm.v_full(s), 1);
      sm90::mbar_init(sm.k_empty(s), 4 * Cfg::kConsumers);  // one arrival per consumer warp
      sm90::mbar_init(sm.v_empty(s), 4 * Cfg::kConsumers);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    sm90::setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) prefill_sm90_produce<Cfg>(prm, b, sm);
  } else {
    sm90::setmaxnreg_inc<Cfg::kConsumerRegs>();
    // Through a shuffle the compiler knows the warpgroup index is the same in the whole warp, so the
    // ring slots and wgmma descriptors derived from it stay in uniform registers.
    prefill_sm90_consume<T, Cfg>(prm, b, sm, __shfl_sync(0xffffffffu, warpgroup - 1, 0));
  }
#endif
}

// Builds the tensor maps and launches. Preconditions (the caller checks): head_dim Cfg::kHeadDim,
// num_tokens >= 1, batch * cache_len in [1, INT32_MAX], tensors 16-byte aligned; a device and a build with sm_90a.
template <typename T, typename Cfg>
void launch_attention_prefill_sm90(const PrefillParams& p, int num_tokens, int batch, int max_q_len,
                                   cudaStream_t stream) {
  const int64_t q_tiles = ceil_div(max_q_len, Cfg::kBlockM);
  PRT_REQUIRE(q_tiles <= kMaxGridDimYZ, "max_q_len must be <= " + std::to_string(int64_t{kMaxGridDimYZ} * Cfg::kBlockM) +
                                            " (query tiles of " + std::to_string(Cfg::kBlockM) + " rows on grid y)");
  const uint64_t width = uint64_t(p.num_heads) * Cfg::kHeadDim;  // elements per token (q) or position (cache)
  const uint64_t cache_rows = uint64_t(batch) * p.cache_len;
  constexpr CUtensorMapDataType dtype = tensor_map_dtype<T>();
  PrefillSm90Params prm;
  prm.q_map = make_tensor_map_sw128(p.q, num_tokens, width, width, Cfg::kBlockM, dtype);
  prm.k_map = make_tensor_map_sw128(p.k_cache, cache_rows, width, width, Cfg::kBlockN, dtype);
  prm.v_map = make_tensor_map_sw128(p.v_cache, cache_rows, width, width, Cfg::kBlockN, dtype);
  prm.p = p;
  const auto kernel = attention_prefill_sm90_kernel<T, Cfg>;
  PRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  const dim3 grid(p.num_heads, static_cast<unsigned>(q_tiles), batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(prm);
  PRT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace attention
}  // namespace persimmon_rt
