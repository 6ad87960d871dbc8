// Shared helpers for the torch-free kernels and launchers: CUDA error checks, launch limits and the
// launch helper (programmatic dependent launch where the device has it), dtype dispatch, 16-byte vector
// load/store with fp32 conversion, warp/block reductions.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.h"

namespace persimmon_rt {

// ---- errors ----------------------------------------------------------------------------------------

#define PRT_CUDA_CHECK(expr)                                                                        \
  do {                                                                                              \
    cudaError_t prt_err_ = (expr);                                                                  \
    if (prt_err_ != cudaSuccess)                                                                    \
      throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #expr \
                               " failed: " + cudaGetErrorString(prt_err_));                         \
  } while (0)

// Launch-time precondition of a launcher (the bindings check shapes first; this guards direct callers).
#define PRT_REQUIRE(cond, msg)                                                    \
  do {                                                                            \
    if (!(cond)) throw std::invalid_argument(std::string(__func__) + ": " + msg); \
  } while (0)

// ---- launches ---------------------------------------------------------------------------------------

constexpr int kMaxGridDimYZ = 65535;  // gridDim.y and gridDim.z limit (gridDim.x goes to 2^31 - 1)

// Compute capability of the current device as major * 10 + minor (90 for Hopper), cached per device:
// launchers ask on every launch.
inline int device_compute_capability() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not asked yet
  int device = 0;
  PRT_CUDA_CHECK(cudaGetDevice(&device));
  int cc = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) : 0;
  if (cc == 0) {
    int major = 0, minor = 0;
    PRT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    PRT_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cc = 10 * major + minor;
    if (device < kMaxDevices) cached[device].store(cc, std::memory_order_relaxed);
  }
  return cc;
}

// Whether launches on the current device use programmatic dependent launch: compute capability 9.0+,
// unless the environment sets PERSIMMON_RT_PDL=0 (for A/B timing; read once).
inline bool pdl_enabled() {
  static const bool env_off = [] {
    const char* v = std::getenv("PERSIMMON_RT_PDL");
    return v != nullptr && std::string(v) == "0";
  }();
  return !env_off && device_compute_capability() >= 90;
}

// kernel<<<grid, block, smem, stream>>>(args...), checked. With `pdl` (and a device that has it) the
// launch carries the programmatic-stream-serialization attribute: its blocks may be scheduled once
// every block of the previous kernel in the stream has run pdl_launch_dependents() (or exited), and the
// kernel must then call pdl_wait() before touching the previous kernel's data (ptx.cuh says where).
// CUDA-graph capture keeps the programmatic edge.
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   bool pdl, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl && pdl_enabled() ? 1 : 0;
  PRT_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// Multiprocessors of the current device (sizes the grid of kernels that run in one wave). Cached per
// device: launchers ask on every launch.
inline int multiprocessors() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  PRT_CUDA_CHECK(cudaGetDevice(&device));
  int sms = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    PRT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < kMaxDevices) cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// ---- dtype dispatch --------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<__half>{}) or f(TypeTag<__nv_bfloat16>{}); any other dtype is an error, never a no-op.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf:
      f(TypeTag<__half>{});
      break;
    case DType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      throw std::invalid_argument("persimmon_rt: unsupported dtype (expected float16 or bfloat16)");
  }
}

// ---- 16-byte vectors of 8 half-precision values, converted to / from fp32 ----------------------------

constexpr int kVec = 8;  // elements per 16-byte access

template <typename T>
struct Pack2;
template <>
struct Pack2<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
  static __device__ __forceinline__ __half2 from_float2(float2 v) { return __float22half2_rn(v); }
};
template <>
struct Pack2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ __nv_bfloat162 from_float2(float2 v) { return __float22bfloat162_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// Rounds to nearest even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Raw 16-byte load; `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ uint4 load16(const T* p) {
  return *reinterpret_cast<const uint4*>(p);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, uint4 v) {
  *reinterpret_cast<uint4*>(p) = v;
}

template <typename T>
__device__ __forceinline__ void prefetch_l2(const T* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

template <typename T>
__device__ __forceinline__ void unpack8(uint4 raw, float (&f)[kVec]) {
  using P = Pack2<T>;
  const auto* h = reinterpret_cast<const typename P::type*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    float2 v = P::to_float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[kVec]) {
  using P = Pack2<T>;
  uint4 raw;
  auto* h = reinterpret_cast<typename P::type*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) h[i] = P::from_float2(make_float2(f[2 * i], f[2 * i + 1]));
  return raw;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[kVec]) {
  unpack8<T>(load16(p), f);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[kVec]) {
  store16(p, pack8<T>(f));
}

// ---- reductions --------------------------------------------------------------------------------------
// Every lane of the warp must call these (full-mask shuffles): call them from warp-uniform control flow
// only and mask inactive lanes by giving them a neutral value, never by branching around the call.

// Sum over aligned groups of WIDTH lanes (WIDTH a power of two <= 32); every lane of a group gets it.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, WIDTH);
  return v;
}

template <int WIDTH>
__device__ __forceinline__ float2 group_sum(float2 v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset, WIDTH);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset, WIDTH);
  }
  return v;
}

// Sum over the block (THREADS threads, a multiple of 32); every thread gets it. `scratch` holds
// THREADS / 32 floats and must not be reused by the caller until after the next __syncthreads().
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(THREADS % 32 == 0, "block_sum needs whole warps");
  v = group_sum<32>(v);
  if constexpr (THREADS > 32) {
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    v = 0.f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) v += scratch[w];
  }
  return v;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace persimmon_rt
