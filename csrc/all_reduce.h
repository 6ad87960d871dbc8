// Torch-free launcher of the tensor-parallel all-reduce fused with the residual add and LayerNorm
// (kernels/all_reduce_layernorm.cuh says how it works); semantics in persimmon_rt/reference.py
// (all_reduce_layernorm). N = rows, C = hidden size, W = ranks.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

constexpr int kAllReduceMaxRanksHost = 8;     // = kAllReduceMaxRanks
constexpr int kAllReduceMaxRowsHost = 64;     // = kAllReduceMaxRows
constexpr int64_t kAllReduceFlagBytesHost = int64_t{kAllReduceMaxRowsHost} * kAllReduceMaxRanksHost * 4;
constexpr int kAllReduceSlotsHost = 3;      // = kAllReduceSlots

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// 1 <= world <= 8, 0 <= rank < world, 1 <= rows <= 64, C % 8 == 0 and C <= kLayerNormMaxHidden;
// buffers is a device array whose entry p is rank p's buffer (kAllReduceFlagBytesHost + 3 * W * 64 * C *
// sizeof(element) bytes, mapped into this process; before first use its flags zeroed and its data filled
// with the sentinel 0x8000), epochs this rank's [64] uint32 counters (zeroed); every rank makes the same
// sequence of calls, all with the same `lamport` (the protocol: kernels/all_reduce_layernorm.cuh). `out` may alias `partial`, `residual_out` may alias `residual`.
void launch_all_reduce_layernorm(const void* partial,       // [N, C] this rank's partial sums
                                 void* const* buffers,      // [W] device memory
                                 uint32_t* epochs,          // [64]
                                 const void* weight,        // [C]
                                 const void* bias,          // [C]
                                 void* out,                 // [N, C]
                                 const void* residual,      // [N, C]
                                 void* residual_out,        // [N, C]
                                 int rank, int world, int64_t rows, int hidden, float eps, double timeout_s,
                                 bool lamport, DType dtype, cudaStream_t stream);

}  // namespace persimmon_rt
