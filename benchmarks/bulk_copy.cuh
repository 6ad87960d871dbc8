// Bulk copies into shared memory that mark their L2 lines evict-first (a stream read once), for the
// development harnesses (persistent_chain.cuh, attention_decode_bulk.cuh). Both complete on an mbarrier.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/ptx_sm90.cuh"

namespace persimmon_rt {
namespace harness {

// `bytes` (a multiple of 16, both addresses 16-byte aligned) of contiguous global memory to dst.
__device__ __forceinline__ void bulk_copy_evict_first(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                                      uint64_t policy) {
#ifdef PRT_SM90A
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
#endif
}

// The box of a 2D tensor map at (c0 = innermost coordinate, c1) to dst.
__device__ __forceinline__ void tma_2d_evict_first(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                                   uint64_t policy) {
#ifdef PRT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], "
      "[%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
#endif
}

// The L2 cache policy the copies above take.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy = 0;
#ifdef PRT_SM90A
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  return policy;
}

}  // namespace harness
}  // namespace persimmon_rt
