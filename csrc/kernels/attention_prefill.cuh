// Causal flash attention of packed new tokens over their sequence's KV cache (prefill and chunked
// prefill). Semantics: persimmon_rt/reference.py::attention_prefill.
//
// One block owns BLOCK_M consecutive queries of one (sequence, head). Its queries live in registers as
// mma A fragments; key/value tiles of BLOCK_N positions stream through shared memory, double-buffered
// with cp.async, so tile t+1 loads while tile t is multiplied. Scores S = Q K^T and O += P V run on
// mma.sync m16n8k16 with fp32 accumulators; the softmax is online (running row max and sum in fp32,
// base 2 with scale * log2(e) folded into one FMA). Each warp owns 16 * WARP_M query rows, so every key
// or value fragment read from shared memory feeds WARP_M mma's.
#pragma once

#include <cstdint>

#include "attention_common.cuh"

namespace persimmon_rt {
namespace attention {

struct PrefillParams {
  const void* q;                // [T, H, D]
  const void* k_cache;          // [B, S, H, D]
  const void* v_cache;          // [B, S, H, D]
  const int32_t* cu_seqlens_q;  // [B + 1]  sequence b owns queries [cu[b], cu[b+1])
  const int32_t* seq_lens;      // [B]  keys of sequence b after this chunk (must be <= S and >= its queries)
  void* out;                    // [T, H, D]
  int num_heads;                // H
  int cache_len;                // S
  float scale_log2;             // softmax scale * log2(e)
};

template <int HEAD_DIM, int WARP_M, int NUM_WARPS, int BLOCK_N>
struct PrefillTile {
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kWarpM = WARP_M;      // m16 row tiles per warp
  static constexpr int kThreads = 32 * NUM_WARPS;
  static constexpr int kBlockM = 16 * WARP_M * NUM_WARPS;
  static constexpr int kBlockN = BLOCK_N;
  // Q tile, then two stages of K, then two stages of V.
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * HEAD_DIM * 2;
  static_assert(HEAD_DIM % 64 == 0, "rows must be whole 128-byte swizzle periods");
  static_assert(BLOCK_N % 16 == 0, "P V consumes keys 16 at a time");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows, D] tile. Chunks are XOR-swizzled by
// the row's low 3 bits so the 8 rows an ldmatrix phase reads at one column hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// cp.async ROWS rows of D elements (global rows `row_stride` elements apart) into a swizzled tile; rows
// >= valid_rows are zero-filled so padding keys contribute 0 * V, never 0 * garbage (NaN).
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(T* tile, const T* gmem, int64_t row_stride, int valid_rows,
                                                int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; ++i) {
    const int id = tid + i * THREADS;
    const int row = id / kChunksPerRow;
    const int chunk = id % kChunksPerRow;
    const bool valid = row < valid_rows;
    const T* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    cp_async_16(tile + swizzle<D>(row, chunk), src, valid);
  }
}

// Grid: (H, ceil(max_q_len / kBlockM), B); blockIdx.y counts down the query tiles, so all heads' longest
// tiles (most keys) start first and the short ones fill the tail. (Launching each head's tiles together
// instead, for L2 reuse of its K/V, measured 15 % slower at 2K tokens, 6 % at 8K, and no better at 16K.)
template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 2) attention_prefill_kernel(const PrefillParams p) {
  constexpr int D = Tile::kHeadDim;
  constexpr int BM = Tile::kBlockM;
  constexpr int BN = Tile::kBlockN;
  constexpr int WM = Tile::kWarpM;
  constexpr int KD = D / 16;   // k16 steps over head_dim in Q K^T
  constexpr int NS = BN / 8;   // n8 score tiles per key tile
  constexpr int NO = D / 8;    // n8 output tiles over head_dim

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);  // [BM, D]
  T* s_k = s_q + BM * D;                // [2, BN, D]
  T* s_v = s_k + 2 * BN * D;            // [2, BN, D]

  const int head = blockIdx.x;
  const int seq = blockIdx.z;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int q_begin = p.cu_seqlens_q[seq];
  const int n_q = p.cu_seqlens_q[seq + 1] - q_begin;
  if (m0 >= n_q) return;
  const int kv_len = p.seq_lens[seq];
  const int rows = min(BM, n_q - m0);
  const int pos0 = kv_len - n_q + m0;              // position of the block's first query
  const int kv_end = pos0 + rows;                  // keys [0, kv_end) are visible to some row
  const int n_tiles = kv_end > 0 ? (kv_end + BN - 1) / BN : 0;
  const int n_unmasked = max(0, (pos0 + 1) / BN);  // tiles entirely at or before the first query

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp_row0 = (tid >> 5) * 16 * WM;
  const int64_t tok_stride = int64_t(p.num_heads) * D;  // between tokens in q/out and positions in a cache
  const T* g_q = static_cast<const T*>(p.q) + (q_begin + m0) * tok_stride + head * D;
  const int64_t kv_offset = int64_t(seq) * p.cache_len * tok_stride + head * D;
  const T* g_k = static_cast<const T*>(p.k_cache) + kv_offset;
  const T* g_v = static_cast<const T*>(p.v_cache) + kv_offset;

  auto load_kv = [&](int tile, int stage) {
    const int64_t key0 = int64_t(tile) * BN;
    const int valid = min(BN, kv_end - tile * BN);
    load_tile_async<T, BN, D, Tile::kThreads>(s_k + stage * BN * D, g_k + key0 * tok_stride, tok_stride, valid, tid);
    load_tile_async<T, BN, D, Tile::kThreads>(s_v + stage * BN * D, g_v + key0 * tok_stride, tok_stride, valid, tid);
  };

  load_tile_async<T, BM, D, Tile::kThreads>(s_q, g_q, tok_stride, rows, tid);
  cp_async_commit();
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  uint32_t q_frag[WM][KD][4];
#pragma unroll
  for (int mt = 0; mt < WM; ++mt)
#pragma unroll
    for (int kd = 0; kd < KD; ++kd)
      ldmatrix_x4(q_frag[mt][kd], s_q + swizzle<D>(warp_row0 + mt * 16 + (lane & 15), kd * 2 + (lane >> 4)));

  float o_acc[WM][NO][4] = {};
  float row_max[WM][2];  // running max of scaled scores (log2 units) of rows lane/4 and lane/4 + 8
  float row_sum[WM][2];  // this thread's share of the running sum; the quad's 4 shares add up at the end
#pragma unroll
  for (int mt = 0; mt < WM; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[mt][r] = -INFINITY;
      row_sum[mt][r] = 0.f;
    }

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < n_tiles) load_kv(t + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning "tile t"
    cp_async_wait<1>();
    __syncthreads();

    const T* k_tile = s_k + stage * BN * D;
    const T* v_tile = s_v + stage * BN * D;

    float s[WM][NS][4] = {};
#pragma unroll
    for (int kd = 0; kd < KD; ++kd)
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t kb[4];  // B fragments of score tiles 2np and 2np+1
        ldmatrix_x4(kb, k_tile + swizzle<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3), kd * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < WM; ++mt) {
          mma_m16n8k16<T>(s[mt][2 * np], q_frag[mt][kd], kb[0], kb[1]);
          mma_m16n8k16<T>(s[mt][2 * np + 1], q_frag[mt][kd], kb[2], kb[3]);
        }
      }

    if (t >= n_unmasked) {  // the diagonal tiles: key > query position -> -inf
#pragma unroll
      for (int mt = 0; mt < WM; ++mt)
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = t * BN + nt * 8 + (lane & 3) * 2 + (e & 1);
            const int pos = pos0 + warp_row0 + mt * 16 + (lane >> 2) + (e >> 1) * 8;
            if (key > pos) s[mt][nt][e] = -INFINITY;
          }
    }

#pragma unroll
    for (int mt = 0; mt < WM; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float new_max = fmaxf(row_max[mt][r], mx * p.scale_log2);
        // A row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        const float ref = new_max == -INFINITY ? 0.f : new_max;
        const float alpha = exp2f(row_max[mt][r] - ref);
        row_max[mt][r] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            s[mt][nt][e] = exp2f(fmaf(s[mt][nt][e], p.scale_log2, -ref));
            sum += s[mt][nt][e];
          }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < NO; ++dt) {
          o_acc[mt][dt][2 * r] *= alpha;
          o_acc[mt][dt][2 * r + 1] *= alpha;
        }
      }

    // The C fragments of score tiles 2kk, 2kk+1 are, rounded to T, the A fragment of keys 16kk..16kk+15.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[WM][4];
#pragma unroll
      for (int mt = 0; mt < WM; ++mt) {
        pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < NO / 2; ++dp) {
        uint32_t vb[4];  // B fragments of output tiles 2dp and 2dp+1
        const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        ldmatrix_x4_trans(vb, v_tile + swizzle<D>(key, dp * 2 + (lane >> 4)));
#pragma unroll
        for (int mt = 0; mt < WM; ++mt) {
          mma_m16n8k16<T>(o_acc[mt][2 * dp], pa[mt], vb[0], vb[1]);
          mma_m16n8k16<T>(o_acc[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's cp.async overwrites this stage
  }

  T* g_o = static_cast<T*>(p.out) + (q_begin + m0) * tok_stride + head * D;
#pragma unroll
  for (int mt = 0; mt < WM; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;  // l == 0 only for rows that see no key (invalid input)
      const int row = warp_row0 + mt * 16 + (lane >> 2) + r * 8;
      if (row < rows) {
        T* dst = g_o + row * tok_stride + (lane & 3) * 2;
#pragma unroll
        for (int dt = 0; dt < NO; ++dt)
          *reinterpret_cast<uint32_t*>(dst + dt * 8) =
              pack2<T>(o_acc[mt][dt][2 * r] * inv, o_acc[mt][dt][2 * r + 1] * inv);
      }
    }
}

}  // namespace attention
}  // namespace persimmon_rt
