// Device helpers shared by the two attention kernels: mma fragment packing; the PTX wrappers they use
// (mma.sync, ldmatrix, cp.async, streaming loads) are in ptx.cuh. Torch-free.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {
namespace attention {

// Two floats rounded to one 32-bit register of T pairs, `lo` in the low half (the lower column of an
// mma fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const typename Pack2<T>::type v = Pack2<T>::from_float2(make_float2(lo, hi));
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace attention
}  // namespace persimmon_rt
