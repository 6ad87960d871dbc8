// Tensor-parallel all-reduce of a row-parallel projection's partial sums, fused with the residual add and
// the LayerNorm that follow it (one kernel instead of an NCCL all-reduce and a LayerNorm):
//
//   s = round(sum over ranks r = 0..W-1 of partial_r)      (fp32 sum in rank order: every rank gets the same bits)
//   h = round(s + residual);  residual_out = h;  out = LayerNorm(h) * weight + bias
//
// Made for decode, where the message is a few rows of 4096 (8 KB a row in fp16) and pure latency. Every
// rank owns one buffer that every other rank can write (peer-to-peer over NVLink; the host maps them):
//
//   buffer = [ flags: uint32 [kAllReduceMaxRows][kAllReduceMaxRanks] | data: [3][W][kAllReduceMaxRows][C] of T ]
//
// (slots sized for the most rows, so where row b of rank r lands does not depend on a call's row count:
// calls of different batch sizes never overlap one another's slots). One block per row. Block b of rank
// r pushes its partial row into slot (epoch % 3, r, b) of every peer's buffer: the data travels once, one
// way. How the receiver knows it has arrived is the protocol:
//
// - FLAGS: after a block barrier, a release store raises flags[b][r] in every peer's buffer to the call's
//   epoch; the block waits (acquire) until its own flags[b][p] show the epoch for every peer p, then reads
//   the rows. The release waits for the row's stores to be acknowledged: a round trip over the link.
// - LAMPORT: the data is its own flag. Every element of an unused slot holds a sentinel (-0.0, 0x8000 in
//   fp16 and bf16) and pushed rows never do (a -0.0 is sent as +0.0, and the sender sums its own row the
//   same way, so every rank adds the same values); the block polls the slot until no element is the
//   sentinel, then writes the sentinel back. Elements are checked one by one, so a 16-byte store that
//   lands in pieces is still read whole. No release, no round trip.
//
// Epochs are per-block counters in this rank's memory (`epochs`, bumped by the block at the end): they
// live on the device, so the kernel can be captured in CUDA graphs and replayed any number of times, mixed
// with eager calls, as long as every rank makes the same sequence of calls (which tensor parallelism
// already requires of its collectives). Three data slots rotate by epoch: a peer writes slot s of call
// k + 3 only after it has received this rank's call k + 2, which this rank sends after finishing call k
// (stream order: the kernels between wait for each other), so nothing written is still being read, and a
// Lamport slot has its sentinels back before it is written again.
//
// A peer that never arrives (it crashed) would leave the block spinning: after `timeout_ns` the kernel
// traps, the launch fails with an error, and the rank exits instead of hanging.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "layernorm.cuh"
#include "ptx.cuh"

namespace persimmon_rt {

constexpr int kAllReduceMaxRanks = 8;
constexpr int kAllReduceMaxRows = 64;
constexpr int64_t kAllReduceFlagBytes = int64_t{kAllReduceMaxRows} * kAllReduceMaxRanks * sizeof(uint32_t);
constexpr int kAllReduceSlots = 3;
constexpr uint16_t kAllReduceSentinel = 0x8000;  // -0.0 in fp16 and bf16

// 16-byte vector of 8 halves: -0.0 replaced by +0.0 (never the sentinel); whether any element is it.
__device__ __forceinline__ uint4 without_sentinel(uint4 v) {
  uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if ((w[i] & 0xffffu) == kAllReduceSentinel) w[i] &= 0xffff0000u;
    if ((w[i] >> 16) == kAllReduceSentinel) w[i] &= 0x0000ffffu;
  }
  return v;
}

__device__ __forceinline__ bool has_sentinel(uint4 v) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
  bool any = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) any |= (w[i] & 0xffffu) == kAllReduceSentinel || (w[i] >> 16) == kAllReduceSentinel;
  return any;
}


template <typename T, int THREADS, int CPT, bool LAMPORT>
__global__ void __launch_bounds__(THREADS) all_reduce_layernorm_kernel(
    const T* partial,              // [N, C]  this rank's partial sums
    char* const* peers,            // [W] each rank's buffer (layout above) as mapped here; a device array
    uint32_t* epochs,              // [kAllReduceMaxRows] this rank's per-block call counters
    const T* __restrict__ weight,  // [C]
    const T* __restrict__ bias,    // [C]
    T* out,                        // [N, C]  may alias partial
    const T* residual,             // [N, C]
    T* residual_out,               // [N, C]  may alias residual
    int rank, int world, int hidden, float eps, uint64_t timeout_ns) {
  __shared__ float scratch[2][THREADS / 32];
  __shared__ uint32_t epoch_shared;
  pdl_launch_dependents();
  pdl_wait();  // partial comes from the previous kernel; and see the slot argument above
  const int b = blockIdx.x;
  const int chunks = hidden / kVec;
  const int64_t row = static_cast<int64_t>(b) * hidden;
  const int64_t slot_elems = static_cast<int64_t>(kAllReduceMaxRows) * hidden;  // one rank's rows

  if (threadIdx.x == 0) epoch_shared = epochs[b] + 1;
  uint4 own[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = threadIdx.x + i * THREADS;
    own[i] = make_uint4(0, 0, 0, 0);
    if (c < chunks) own[i] = load16(partial + row + c * kVec);
    if constexpr (LAMPORT) own[i] = without_sentinel(own[i]);
  }
  __syncthreads();
  const uint32_t epoch = epoch_shared;
  const int64_t slot_base = static_cast<int64_t>(epoch % kAllReduceSlots) * world * slot_elems;
  auto data = [&](int owner, int src) {  // slot (epoch % 3, src, b) in `owner`'s buffer
    return reinterpret_cast<T*>(peers[owner] + kAllReduceFlagBytes) + slot_base + src * slot_elems + row;
  };
  for (int p = 0; p < world; ++p) {
    if (p == rank) continue;
    T* dst = data(p, rank);
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = threadIdx.x + i * THREADS;
      if (c < chunks) store16(dst + c * kVec, own[i]);
    }
  }
  const uint64_t start = globaltimer_ns();
  if constexpr (!LAMPORT) {
    __syncthreads();  // every thread's row stores precede the flags (the release below is cumulative)
    auto flag = [&](int owner, int src) {
      return reinterpret_cast<uint32_t*>(peers[owner]) + b * kAllReduceMaxRanks + src;
    };
    const int p = threadIdx.x;
    if (p < world && p != rank) {
      st_release_sys_u32(flag(p, rank), epoch);
      while (static_cast<int32_t>(ld_acquire_sys_u32(flag(rank, p)) - epoch) < 0)
        if (globaltimer_ns() - start > timeout_ns) __trap();  // a peer never came: fail, do not hang
    }
    __syncthreads();  // the acquires above order every thread's reads below
  }

  float acc[CPT][kVec] = {};
  for (int q = 0; q < world; ++q) {  // rank order, so every rank rounds the same sum
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = threadIdx.x + i * THREADS;
      uint4 raw = own[i];
      if (q != rank && c < chunks) {
        T* src = data(rank, q) + c * kVec;
        if constexpr (LAMPORT) {
          while (has_sentinel(raw = ld_volatile_16(src)))
            if (globaltimer_ns() - start > timeout_ns) __trap();
          const uint32_t s16 = kAllReduceSentinel * 0x10001u;
          store16(src, make_uint4(s16, s16, s16, s16));  // the slot is free again
        } else {
          raw = ld_cg_16(src);  // written by a peer: read from L2, never a stale L1 line
        }
      }
      float f[kVec];
      unpack8<T>(raw, f);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[i][e] += f[e];
    }
  }
  uint4 v[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = threadIdx.x + i * THREADS;
    v[i] = make_uint4(0, 0, 0, 0);
    if (c < chunks) {
      float s[kVec], r[kVec];
      unpack8<T>(pack8<T>(acc[i]), s);  // the all-reduced value, rounded as NCCL's would be
      unpack8<T>(load16(residual + row + c * kVec), r);
#pragma unroll
      for (int e = 0; e < kVec; ++e) s[e] += r[e];
      v[i] = pack8<T>(s);
    }
  }
  // Every residual load above precedes the first residual_out store (they may alias).
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = threadIdx.x + i * THREADS;
    if (c < chunks) store16(residual_out + row + c * kVec, v[i]);
  }
  layernorm_row<T, THREADS, CPT>(v, weight, bias, out + row, hidden, eps, scratch);
  if (threadIdx.x == 0) epochs[b] = epoch;
}

}  // namespace persimmon_rt
