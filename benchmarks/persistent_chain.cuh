// Development harness, not a shipped kernel: a decode layer's four GEMVs (QKV, dense, MLP-up + relu^2,
// MLP-down; one row, fp16 activations, fp16 or int8 weights) for L layers in ONE persistent kernel, to
// measure what a step without kernel boundaries could stream. benchmarks/bench_persistent_chain.py builds
// it (persistent_chain.cu, a torch-free library) and times it beside the shipped decode_linear launches;
// benchmarks/RESULTS.md, runs Y2-Y9, has the numbers.
//
// One block per SM, three roles:
// - a producer thread claims work units of each op in turn (atomicAdd on the op's counter, so SMs that
//   stream faster take more), publishes each claim in a shared-memory unit queue, and copies the unit's
//   weight pages into a ring of R pages with cp.async.bulk. It never waits for activations: while the
//   consumers wait for an op's input, the ring fills with that op's first pages.
// - C consumer warps read every claim; at an op's first unit (or a new K chunk of it) they stage the op's
//   input x in shared memory, then multiply their pages (page sequence number % C: a slot always feeds
//   the same warp) and hand per-warp partial sums to the finishers.
// - FW finisher warps (unit k is finisher k % FW's) sum the partials; a tile split over K chunks writes
//   its chunk's partial to [tile][chunk] and the last chunk to finish (an acq_rel counter) sums them in
//   chunk order, so results do not depend on timing; then bias, relu^2, residual, fp16 store.
//
// Dependencies. Activations start as kEmpty (0xffff, a NaN no output is rounded to): consumers poll x and
// finishers poll the residual until no element is kEmpty, so data and signal arrive in one L2 round trip.
// The polls must be strong loads (ld.relaxed.gpu): ptxas hoists a weak ld.global.cg out of the polling
// loop, which then never reloads. kCounterWait additionally waits for the previous op's completion counter
// before staging (one more round trip; with it the weak polls were harmless, runs Y8-Y9). MLP-down's units
// are numbered chunk-major, so its first units need only MLP-up's first rows (full_x = 0).
//
// Weights are pre-packed by the harness into pages of 16 rows x PK k in mma.sync A-fragment order
// ([tile][k page][k step][lane][8 halves]): a consumer reads its fragment with one 16-byte shared load.
// LAYOUT 1 leaves the weights as the engine keeps them ([N, K] row-major, what cuBLAS reads at prefill) and
// copies a page with TMA tensor copies (OpDesc::map, made by persistent_chain.cu): boxes of 16 rows x 256
// elements, no swizzle (one box a page at fp16, PK = 256); consumers read decode_linear(_int8).cuh's lane
// order (rows g and g + 8, 16 consecutive bytes), two rows a bank conflict apart. It streams at ~4.3 TB/s
// against the packed pages' ~4.6 (runs Z2-Z3). 16 one-row bulk copies a page streamed at 1.6 TB/s (run Z1:
// the copy count, not the bytes, limits); 128-byte-swizzled boxes of 16 x 64 never completed (runs Z2-Z3,
// cause not found) and were dropped.
//
// Per-op launches (kPdl, bench --per-op): one launch per op, each with programmatic dependent launch; the
// producer starts streaming the op's weights at once, the other warps wait for the previous grid
// (griddepcontrol.wait) before they read anything it wrote. Variants small enough for two blocks per SM
// let the next op's block stream beside the current op's tail: the separate-kernel form of the ring.
// INT8: int8 weights with an fp32 scale per output row (the shipped scheme), pages of one byte a weight
// ([tile][k page][k step pair][lane][2 steps x 8 bytes]), converted to fp16 in registers as the shipped
// int8 GEMV does; the scale is applied once per output by the finisher.
#pragma once

#include <cuda.h>
#include <cuda_fp16.h>

#include "kernels/decode_linear_int8.cuh"
#include "kernels/ptx_sm90.cuh"
#include "bulk_copy.cuh"

namespace persimmon_rt {
namespace chain {

using sm90::fence_barrier_init;
using sm90::mbar_arrive;
using sm90::mbar_arrive_expect_tx;
using sm90::mbar_init;
using sm90::mbar_wait;
using sm90::named_barrier_sync;
using harness::bulk_copy_evict_first;
using harness::evict_first_policy;
using harness::tma_2d_evict_first;

struct OpDesc {
  const char* w;           // packed pages (see above), or the row-major weights (LAYOUT 1-2)
  const float* scale;      // [N] fp32 per-row scales of int8 weights, else null
  const __half* bias;      // [N] or null
  const __half* x;         // [K]
  const __half* residual;  // [N] or null
  __half* out;             // [N]
  float* partial;          // [N / 16][K chunks][16]
  unsigned* tile_count;    // [N / 16], zero at launch
  const CUtensorMap* map;  // LAYOUT 1-2: the row-major weights' tensor map (64-byte aligned), else null
  int N, K, relu2, full_x;  // full_x: all of x before any unit (a LayerNorm would need it), else per K chunk
};

constexpr int kMaxK = 16384;
constexpr int kRedBufs = 8;
constexpr int kUnitQueue = 8;
constexpr unsigned short kEmpty = 0xffff;

enum Flags : int { kRingOnly = 1, kCounterWait = 2, kPdl = 4 };

// LAYOUT 1: a box row, 256 elements (the most a box dimension may hold).
template <bool INT8>
constexpr int box_bytes() { return INT8 ? 256 : 512; }

template <int PK, bool INT8>
constexpr int piece_bytes() { return PK * (INT8 ? 1 : 2); }  // one row of a page

template <int PK, bool INT8>
constexpr int page_bytes() { return 16 * piece_bytes<PK, INT8>(); }

template <int PK, int R, int C, int CH, int FW, bool INT8, int LAYOUT>
constexpr int chain_smem_bytes() {
  return R * page_bytes<PK, INT8>() + kMaxK * 2 + kRedBufs * C * 16 * 4 + kUnitQueue * 8 +
         (2 * R + 2 * kRedBufs + 2 * kUnitQueue) * 8;
}

// Two blocks fit on an SM (228 KiB of shared memory, 1 KiB of it reserved per block): the register budget
// is set for two, so the next op's block can be resident beside this one's.
template <int PK, int R, int C, int CH, int FW, bool INT8, int LAYOUT>
constexpr int chain_min_blocks() {
  return chain_smem_bytes<PK, R, C, CH, FW, INT8, LAYOUT>() <= 113 * 1024 ? 2 : 1;
}


__device__ __forceinline__ unsigned ld_acquire_gpu_u32(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Strong loads for polling (a weak load may be hoisted out of the loop).
__device__ __forceinline__ uint4 ld_relaxed_gpu_16(const void* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ unsigned short ld_relaxed_gpu_u16(const void* p) {
  unsigned short v;
  asm volatile("ld.relaxed.gpu.global.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ float ld_relaxed_gpu_f32(const float* p) {
  float v;
  asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned atom_add_acq_rel_gpu(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

__device__ __forceinline__ void red_add_release_gpu(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ bool has_empty(const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  bool empty = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) empty |= (w[i] & 0xffffu) == kEmpty || (w[i] >> 16) == kEmpty;
  return empty;
}

// A poll that has waited a second is a bug (every input is produced within microseconds): stop the kernel
// with a message instead of hanging the device. Returns false until then.
__device__ __noinline__ void stop_waiting(const char* what) {  // out of line: printf's stack stays here
  printf("persistent_chain: block %d thread %d waited 1 s for %s\n", blockIdx.x, threadIdx.x, what);
  __trap();
}

__device__ __forceinline__ bool timed_out(uint64_t start, const char* what) {
  if (globaltimer_ns() - start < 1000000000ull) return false;
  stop_waiting(what);
  return true;
}

// A unit is CH consecutive pages of one 16-row tile (a K chunk), numbered chunk-major.
struct Unit {
  int tile, chunk, chunks;
};

__device__ __forceinline__ Unit unit_of(const OpDesc& d, int unit, int PK, int CH) {
  const int tiles = d.N / 16;
  return {unit % tiles, unit / tiles, d.K / PK / CH};
}

// counters: done[n_ops] (tiles finished, for the counter wait and the trace), next[n_ops] (claims).
// trace (optional): [n_ops][blocks][2] globaltimer ns: x staged (first time per op), last tile finished.
template <int PK, int R, int C, int CH, int FW, bool INT8, int LAYOUT>
__global__ void __launch_bounds__((C + FW + 1) * 32, (chain_min_blocks<PK, R, C, CH, FW, INT8, LAYOUT>()))
    chain_kernel(const OpDesc* __restrict__ ops, int n_ops, unsigned* done, unsigned* next, int flags,
                 unsigned long long* trace) {
  static_assert(R % C == 0, "a ring slot must always feed the same consumer warp");
  static_assert(kRedBufs % FW == 0, "a reduction buffer must always go to the same finisher");
  static_assert(LAYOUT != 1 || piece_bytes<PK, INT8>() % box_bytes<INT8>() == 0, "a page is whole boxes");
  constexpr int kBoxBytes = box_bytes<INT8>();
#ifdef PRT_SM90A
  constexpr int PB = page_bytes<PK, INT8>(), SB = PB;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  __half* xs = reinterpret_cast<__half*>(smem + R * SB);
  float* red = reinterpret_cast<float*>(xs + kMaxK);  // [kRedBufs][C][16]
  int2* queue = reinterpret_cast<int2*>(red + kRedBufs * C * 16);
  uint64_t* full = reinterpret_cast<uint64_t*>(queue + kUnitQueue);
  uint64_t* empty = full + R;
  uint64_t* red_full = empty + R;
  uint64_t* red_empty = red_full + kRedBufs;
  uint64_t* queue_full = red_empty + kRedBufs;
  uint64_t* queue_empty = queue_full + kUnitQueue;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int S = gridDim.x, s = blockIdx.x;
  const bool ring_only = flags & kRingOnly;
  if (threadIdx.x == 0) {
    for (int r = 0; r < R; ++r) {
      mbar_init(&full[r], 1);
      mbar_init(&empty[r], 1);
    }
    for (int b = 0; b < kRedBufs; ++b) {
      mbar_init(&red_full[b], C);
      mbar_init(&red_empty[b], 1);
    }
    for (int e = 0; e < kUnitQueue; ++e) {
      mbar_init(&queue_full[e], 1);
      mbar_init(&queue_empty[e], C + FW);
    }
    fence_barrier_init();
  }
  if (flags & kPdl) pdl_launch_dependents();  // the next op's blocks may become resident now
  __syncthreads();

  if (warp == C + FW) {  // producer
    if (lane == 0) {
      const uint64_t policy = evict_first_policy();
      uint32_t seq = 0, k = 0;
      for (int i = 0; i <= n_ops;) {
        int unit = 0;
        if (i < n_ops) {
          unit = static_cast<int>(atomicAdd(&next[i], 1u));
          if (unit >= (ops[i].N / 16) * (ops[i].K / PK / CH)) {  // this op is all claimed
            ++i;
            continue;
          }
        }
        const int e = k % kUnitQueue;
        mbar_wait(&queue_empty[e], ((k / kUnitQueue) & 1) ^ 1);
        queue[e] = make_int2(i, unit);  // i == n_ops: the end
        mbar_arrive(&queue_full[e]);
        ++k;
        if (i == n_ops) break;
        const Unit u = unit_of(ops[i], unit, PK, CH);
        const long K = ops[i].K;
        for (int j = 0; j < CH; ++j, ++seq) {
          const int slot = seq % R;
          mbar_wait(&empty[slot], ((seq / R) & 1) ^ 1);
          mbar_arrive_expect_tx(&full[slot], PB);
          const long page = static_cast<long>(u.tile) * (K / PK) + u.chunk * CH + j;
          const int k0 = (u.chunk * CH + j) * PK;  // the page's first k (an element index)
          if constexpr (LAYOUT == 1) {
            for (int b = 0; b < PB / (16 * kBoxBytes); ++b)
              tma_2d_evict_first(ring + slot * SB + b * 16 * kBoxBytes, ops[i].map, k0 + b * kBoxBytes / (INT8 ? 1 : 2),
                                 16 * u.tile, &full[slot], policy);
          } else {
            bulk_copy_evict_first(ring + slot * SB, ops[i].w + page * PB, PB, &full[slot], policy);
          }
        }
      }
    }
    return;
  }

  const auto read_unit = [&](uint32_t k) {
    const int e = k % kUnitQueue;
    mbar_wait(&queue_full[e], (k / kUnitQueue) & 1);
    const int2 claim = queue[e];
    __syncwarp();
    if (lane == 0) mbar_arrive(&queue_empty[e]);
    return claim;
  };

  if (flags & kPdl) pdl_wait();  // x and residual are the previous launch's outputs

  if (warp >= C) {  // finishers
    const int f = warp - C;
    for (uint32_t k = 0;; ++k) {
      const int2 claim = read_unit(k);
      if (claim.x == n_ops) break;
      if (static_cast<int>(k % FW) != f || ring_only) continue;
      const OpDesc& d = ops[claim.x];
      const Unit u = unit_of(d, claim.y, PK, CH);
      // Bias and residual are requested before the partials are waited for.
      const int n = 16 * u.tile + (lane & 15);
      const float bias_n = d.bias ? __half2float(d.bias[n]) : 0.f;
      float res_n = 0.f;
      if (d.residual) {  // an earlier op's output: written, but perhaps not yet seen from here
        unsigned short r;
        const uint64_t start = globaltimer_ns();
        do r = ld_relaxed_gpu_u16(d.residual + n);
        while (r == kEmpty && !timed_out(start, "a finisher's residual"));
        res_n = __half2float(__ushort_as_half(r));
      }
      const int b = k % kRedBufs;
      mbar_wait(&red_full[b], (k / kRedBufs) & 1);
      float v = 0.f;
      if (lane < 16)
        for (int w = 0; w < C; ++w) v += red[(b * C + w) * 16 + lane];
      __syncwarp();
      if (lane == 0) mbar_arrive(&red_empty[b]);
      bool last = true;
      if (u.chunks > 1) {
        float* slots = d.partial + static_cast<long>(u.tile) * u.chunks * 16;
        if (lane < 16) slots[u.chunk * 16 + lane] = v;
        __syncwarp();
        unsigned before = 0;
        if (lane == 0) before = atom_add_acq_rel_gpu(&d.tile_count[u.tile], 1u);
        before = __shfl_sync(0xffffffffu, before, 0);
        last = before == static_cast<unsigned>(u.chunks - 1);
        if (last) {
          __threadfence();  // every lane, not only lane 0, acquires the other chunks' partials
          v = 0.f;
          if (lane < 16)
            for (int j = 0; j < u.chunks; ++j) v += ld_relaxed_gpu_f32(slots + j * 16 + lane);
        }
      }
      if (last) {
        if (lane < 16) {
          float y = (INT8 ? v * d.scale[n] : v) + bias_n;
          if (d.relu2) {
            y = fmaxf(y, 0.f);
            y *= y;
          }
          const unsigned short o = __half_as_ushort(__float2half_rn(y + res_n));
          d.out[n] = __ushort_as_half(o == kEmpty ? static_cast<unsigned short>(0x7e00) : o);
        }
        __syncwarp();
        if (lane == 0) {
          red_add_release_gpu(&done[claim.x], 1u);
          if (trace != nullptr) trace[(static_cast<long>(claim.x) * S + s) * 2 + 1] = globaltimer_ns();
        }
      }
    }
    return;
  }

  // consumers
  const int g = lane / 4, q = lane % 4;
  uint32_t seq = 0;
  int cur = -1, staged = -1;  // the op whose x is staged, and its last K chunk staged
  for (uint32_t k = 0;; ++k) {
    const int2 claim = read_unit(k);
    if (claim.x == n_ops) break;
    const OpDesc& d = ops[claim.x];
    if (ring_only) {  // take each page and give it back
      for (int j = 0; j < CH; ++j, ++seq) {
        if (static_cast<int>(seq % C) != warp) continue;
        const int slot = seq % R;
        mbar_wait(&full[slot], (seq / R) & 1);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[slot]);
      }
      continue;
    }
    const Unit u = unit_of(d, claim.y, PK, CH);
    if (claim.x != cur || u.chunk > staged) {  // stage x: all of it, or the chunks up to this unit's
      const bool first = claim.x != cur;
      if (first) staged = -1;
      cur = claim.x;
      named_barrier_sync<1>(C * 32);  // every consumer is past the pages that read the old x
      if ((flags & kCounterWait) && cur > 0 && threadIdx.x == 0) {
        const uint64_t start = globaltimer_ns();
        while (ld_acquire_gpu_u32(&done[cur - 1]) < static_cast<unsigned>(ops[cur - 1].N / 16) &&
               !timed_out(start, "the completion counter")) {
        }
      }
      named_barrier_sync<1>(C * 32);
      const int xc = CH * PK;
      const int lo = d.full_x ? 0 : (staged + 1) * xc, hi = d.full_x ? d.K : (u.chunk + 1) * xc;
      staged = d.full_x ? d.K / xc : u.chunk;
      // Batches of loads in flight at once: all of x (K <= kMaxK), or 4 a thread (K = 4096 at C = 4) where
      // the registers are budgeted for two blocks an SM.
      constexpr int kPerThread = (kMaxK / 8 + C * 32 - 1) / (C * 32);
      constexpr int kBatch = chain_min_blocks<PK, R, C, CH, FW, INT8, LAYOUT>() == 2 ? 4 : kPerThread;
      for (int base = lo / 8 + static_cast<int>(threadIdx.x); base < hi / 8; base += kBatch * C * 32) {
        uint4 xv[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const int e = base + j * C * 32;
          if (e < hi / 8) xv[j] = ld_relaxed_gpu_16(d.x + 8 * e);
        }
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const int e = base + j * C * 32;
          if (e < hi / 8) {
            const uint64_t start = globaltimer_ns();
            while (has_empty(xv[j]) && !timed_out(start, "x")) xv[j] = ld_relaxed_gpu_16(d.x + 8 * e);
            reinterpret_cast<uint4*>(xs)[e] = xv[j];
          }
        }
      }
      named_barrier_sync<1>(C * 32);
      if (trace != nullptr && threadIdx.x == 0 && first)
        trace[(static_cast<long>(cur) * S + s) * 2] = globaltimer_ns();
    }
    float acc[4][4] = {};  // four mma chains
    for (int j = 0; j < CH; ++j, ++seq) {
      if (static_cast<int>(seq % C) != warp) continue;
      const int slot = seq % R;
      mbar_wait(&full[slot], (seq / R) & 1);
      const uint4* page = reinterpret_cast<const uint4*>(ring + slot * SB);
      const __half* xk = xs + (u.chunk * CH + j) * PK + 2 * q;
      const auto x_fragment = [&](int st, uint32_t& b0, uint32_t& b1) {
        b0 = b1 = 0;
        if (g == 0) {  // one row: column 0 of the B fragment
          b0 = *reinterpret_cast<const uint32_t*>(xk + st * 16);
          b1 = *reinterpret_cast<const uint32_t*>(xk + st * 16 + 8);
        }
      };
      const __half* xpage = xs + (u.chunk * CH + j) * PK;
      // LAYOUT 1: byte kb of row r lies in box kb / kBoxBytes at r * kBoxBytes + kb % kBoxBytes.
      const auto box_row = [&](int r, int kb) {
        return ring + slot * SB + (kb / kBoxBytes) * 16 * kBoxBytes + r * kBoxBytes + kb % kBoxBytes;
      };
      if constexpr (LAYOUT == 1 && INT8) {  // decode_linear_int8.cuh's order: 16 consecutive k of rows g, g + 8
#pragma unroll 2
        for (int c = 0; c < PK / 64; ++c) {
          const uint4 w0 = *reinterpret_cast<const uint4*>(box_row(g, 64 * c + 16 * q));
          const uint4 w1 = *reinterpret_cast<const uint4*>(box_row(g + 8, 64 * c + 16 * q));
          uint4 xv[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
          if (g == 0) {
            xv[0] = *reinterpret_cast<const uint4*>(xpage + 64 * c + 16 * q);
            xv[1] = *reinterpret_cast<const uint4*>(xpage + 64 * c + 16 * q + 8);
          }
#pragma unroll
          for (int st = 0; st < 4; ++st) {
            uint32_t a[4];
            gemv::int8x4_to_pairs<__half>(gemv::word_of(w0, st), a[0], a[2]);
            gemv::int8x4_to_pairs<__half>(gemv::word_of(w1, st), a[1], a[3]);
            mma_m16n8k16<__half>(acc[st], a, gemv::x_word(xv, 2 * st), gemv::x_word(xv, 2 * st + 1));
          }
        }
      } else if constexpr (LAYOUT == 1) {  // decode_linear.cuh's order: 8 consecutive k of rows g, g + 8
#pragma unroll 4
        for (int c = 0; c < PK / 32; ++c) {
          const uint4 w0 = *reinterpret_cast<const uint4*>(box_row(g, 64 * c + 16 * q));
          const uint4 w1 = *reinterpret_cast<const uint4*>(box_row(g + 8, 64 * c + 16 * q));
          uint4 xv = make_uint4(0, 0, 0, 0);
          if (g == 0) xv = *reinterpret_cast<const uint4*>(xpage + 32 * c + 8 * q);
          const uint32_t a0[4] = {w0.x, w1.x, w0.y, w1.y};
          const uint32_t a1[4] = {w0.z, w1.z, w0.w, w1.w};
          mma_m16n8k16<__half>(acc[(2 * c) % 4], a0, xv.x, xv.y);
          mma_m16n8k16<__half>(acc[(2 * c + 1) % 4], a1, xv.z, xv.w);
        }
      } else if constexpr (INT8) {
#pragma unroll 4
        for (int sp = 0; sp < PK / 32; ++sp) {  // two k steps a 16-byte load
          const uint4 w8 = page[sp * 32 + lane];
          const uint32_t words[2][2] = {{w8.x, w8.y}, {w8.z, w8.w}};
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t a[4], b0, b1;
            gemv::int8x4_to_pairs<__half>(words[h][0], a[0], a[1]);  // rows g, g + 8 at k 2q, 2q + 1
            gemv::int8x4_to_pairs<__half>(words[h][1], a[2], a[3]);  // the same at k 2q + 8, 2q + 9
            x_fragment(2 * sp + h, b0, b1);
            mma_m16n8k16<__half>(acc[(2 * sp + h) % 4], a, b0, b1);
          }
        }
      } else {
#pragma unroll 8
        for (int st = 0; st < PK / 16; ++st) {
          const uint4 a4 = page[st * 32 + lane];
          const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
          uint32_t b0, b1;
          x_fragment(st, b0, b1);
          mma_m16n8k16<__half>(acc[st % 4], a, b0, b1);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
    }
    const int b = k % kRedBufs;
    mbar_wait(&red_empty[b], ((k / kRedBufs) & 1) ^ 1);
    if (q == 0) {
      red[(b * C + warp) * 16 + g] = acc[0][0] + acc[1][0] + acc[2][0] + acc[3][0];
      red[(b * C + warp) * 16 + g + 8] = acc[0][2] + acc[1][2] + acc[2][2] + acc[3][2];
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&red_full[b]);
  }
#endif
}

}  // namespace chain
}  // namespace persimmon_rt
