// Inline-PTX wrappers for the Hopper (sm_90a) kernels: warpgroup MMA (wgmma) and its shared-memory
// matrix descriptors, mbarriers, the bulk tensor copy engine (TMA), named barriers and register
// reallocation; on the host, the encoding of a TMA tensor map. Torch-free.
// The device wrappers compile to nothing outside sm_90a (PRT_SM90A): a kernel built on them keeps its
// body behind PRT_SM90A, and its launcher runs it only where both the build and the device have sm_90a.
#pragma once

#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's signature (reached through the runtime)
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ptx.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PRT_SM90A 1
#endif

namespace persimmon_rt {
namespace sm90 {

// ---- mbarriers -----------------------------------------------------------------------------------
// A phase completes when `count` arrivals and every expected transaction byte have landed; waiters name
// the phase by its parity. A fresh barrier counts as having just completed a phase of parity 1, so a
// producer's first wait on an "empty" barrier (parity 1) passes at once.

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#ifdef PRT_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}

// Makes initialised barriers visible to the copy engine; a __syncthreads must follow for the threads.
__device__ __forceinline__ void fence_barrier_init() {
#ifdef PRT_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#ifdef PRT_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// One arrival that also announces `bytes` more transaction bytes (a TMA copy completing on `bar`).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef PRT_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}

// Spins until the phase of parity `parity` has completed (acquire: what that phase covered is visible).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef PRT_SM90A
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// ---- bulk tensor copy (TMA) ----------------------------------------------------------------------

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
#ifdef PRT_SM90A
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// Copies the box of `map` at (c0 = innermost coordinate, c1) to shared memory at `dst`, laid out as the
// map's swizzle says; its bytes complete on `bar`. Box elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
#ifdef PRT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
#endif
}

// Orders this thread's ordinary shared-memory writes before later reads by the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async_smem() {
#ifdef PRT_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ---- named barriers (ids 1-15; 0 is __syncthreads) and register reallocation -----------------------

// Ids are immediates: with an id in a register the compiler reserves all 16 barriers for the block.
template <int ID>
__device__ __forceinline__ void named_barrier_sync(int threads) {
  static_assert(ID >= 1 && ID <= 15, "named barrier ids are 1-15");
#ifdef PRT_SM90A
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "r"(threads) : "memory");
#endif
}

template <int ID>
__device__ __forceinline__ void named_barrier_arrive(int threads) {
  static_assert(ID >= 1 && ID <= 15, "named barrier ids are 1-15");
#ifdef PRT_SM90A
  asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "r"(threads) : "memory");
#endif
}

// Barrier FIRST + i for a run-time i in [0, COUNT), still with immediate ids.
template <int FIRST, int COUNT>
__device__ __forceinline__ void named_barrier_sync(int i, int threads) {
  if constexpr (COUNT > 0) {
    if (i == 0) named_barrier_sync<FIRST>(threads);
    else named_barrier_sync<FIRST + 1, COUNT - 1>(i - 1, threads);
  }
}

template <int FIRST, int COUNT>
__device__ __forceinline__ void named_barrier_arrive(int i, int threads) {
  if constexpr (COUNT > 0) {
    if (i == 0) named_barrier_arrive<FIRST>(threads);
    else named_barrier_arrive<FIRST + 1, COUNT - 1>(i - 1, threads);
  }
}

// Every warp of a warpgroup runs the same one. Effective only under a register cap at kernel entry
// (__launch_bounds__(threads, blocks)), which the kernel's warpgroups then trade among themselves.
template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifdef PRT_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}

template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifdef PRT_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}

// ---- warpgroup MMA ---------------------------------------------------------------------------------
// Order within a warpgroup: reg_fence the registers the wgmma's read or accumulate (so the compiler
// emits every earlier write to them before the fence), wgmma_fence, the wgmma's, wgmma_commit; later
// wgmma_wait<N> (all but the N newest groups complete), then reg_fence the results before reading them:
// the compiler does not know that the asynchronous writes land only at the wait.

__device__ __forceinline__ void wgmma_fence() {
#ifdef PRT_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifdef PRT_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef PRT_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N, int M>
__device__ __forceinline__ void reg_fence(float (&r)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i) reg_fence(r[i]);
}

template <int N, int M>
__device__ __forceinline__ void reg_fence(uint32_t (&r)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor (PTX ISA, wgmma "Matrix Descriptor Format") of an operand tile in the
// 128-byte swizzle layout, which TMA writes with CU_TENSOR_MAP_SWIZZLE_128B into a 1024-byte aligned
// buffer: rows of 128 bytes (64 16-bit elements); 16-byte chunk c of row r stored at chunk c ^ (r % 8);
// groups of 8 rows 1024 bytes apart. Fields: bits 0-13 start address >> 4; 16-29 leading byte offset >> 4
// (unused here: a K-major operand's k16 step stays inside one 128-byte row, and an MN-major operand of
// 64 columns is a single 128-byte block wide); 32-45 stride byte offset >> 4, the 1024 bytes between
// 8-row groups (8 rows of M or N when K-major, 8 rows of K when MN-major); 49-51 base offset 0 (tiles
// start 1024-byte aligned); 62-63 layout type 1 = 128-byte swizzle.
// Stepping: K-major, k16 step j -> start + 32 j bytes (the swizzle acts on the final address bits, so a
// step inside the row needs nothing else); MN-major, 16 rows of K -> start + 16 * 128 bytes.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t smem_byte_addr) {
  return uint64_t((smem_byte_addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// The same descriptor split in its two words, for loops that step through tiles: the high word (stride
// byte offset, layout type) is one constant, and the low word is the start address >> 4 (below 2^14 in
// the 228 KB shared window) with the leading byte offset 1 above it, so a step of `bytes` (a multiple of
// 16) is one add of bytes >> 4 to the low word, which carries nothing out of the address field.
constexpr uint32_t kSw128DescHi = (1024 >> 4) | (1u << 30);

__device__ __forceinline__ uint32_t sw128_desc_lo(uint32_t smem_byte_addr) {
  return ((smem_byte_addr & 0x3FFFF) >> 4) | (1u << 16);
}

__device__ __forceinline__ uint64_t sw128_desc_of_lo(uint32_t lo) { return (uint64_t(kSw128DescHi) << 32) | lo; }

// Accumulator fragment of m64nNk16 in fp32 (PTX ISA, wgmma register fragments): warp w of the warpgroup
// owns rows 16w..16w+15, and lane l holds d[4i + 2r + e] = D[16w + l/4 + 8r][8i + 2(l%4) + e], i < N/8.
// A register A fragment (four 32-bit registers of T pairs) has, within each warp, the layout of
// mma.sync m16n8k16's A: a[0] = A[l/4][2(l%4) + {0,1}], a[1] rows + 8, a[2] columns + 8, a[3] both.

#define PRT_WGMMA_ACC32 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define PRT_WGMMA_ACC32_OPERANDS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define PRT_WGMMA_ACC64 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define PRT_WGMMA_ACC64_OPERANDS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])


// d (+)= A * B for one k16 step: A [64 x 16] and B [16 x N] both K-major in shared memory (descriptors).
// scale_d == 0 ignores d's old value (the first step of a product).
template <typename T, int N>
struct WgmmaSS;
// d (+)= A * B for one k16 step: A [64 x 16] from registers, B [16 x N] MN-major (N contiguous, the
// "transposed" B) in shared memory.
template <typename T, int N>
struct WgmmaRS;
// The same with B K-major in shared memory.
template <typename T, int N>
struct WgmmaRSKMajor;

#define PRT_WGMMA_SS(TYPE, N, SHAPE, ACC, OPERANDS, IA, IB, IS)                                             \
  template <>                                                                                               \
  struct WgmmaSS<TYPE, N> {                                                                                 \
    static __device__ __forceinline__ void run(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,         \
                                               int scale_d) {                                               \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\nwgmma.mma_async.sync.aligned." SHAPE " " \
                   ACC ", %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                                         \
                   : OPERANDS                                                                               \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                               \
    }                                                                                                       \
  };

#define PRT_WGMMA_RS_AS(NAME, TRANS_B, TYPE, N, SHAPE, ACC, OPERANDS, AREGS, IB, IS)                        \
  template <>                                                                                               \
  struct NAME<TYPE, N> {                                                                                    \
    static __device__ __forceinline__ void run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,  \
                                               int scale_d) {                                               \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\nwgmma.mma_async.sync.aligned." SHAPE " " \
                   ACC ", " AREGS ", %" #IB ", p, 1, 1, " #TRANS_B ";\n}\n"                                \
                   : OPERANDS                                                                               \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));                \
    }                                                                                                       \
  };
#define PRT_WGMMA_ACC4 "{%0, %1, %2, %3}"
#define PRT_WGMMA_ACC4_OPERANDS "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])

#ifdef PRT_SM90A
PRT_WGMMA_SS(__half, 64, "m64n64k16.f32.f16.f16", PRT_WGMMA_ACC32, PRT_WGMMA_ACC32_OPERANDS, 32, 33, 34)
PRT_WGMMA_SS(__half, 128, "m64n128k16.f32.f16.f16", PRT_WGMMA_ACC64, PRT_WGMMA_ACC64_OPERANDS, 64, 65, 66)
PRT_WGMMA_SS(__nv_bfloat16, 64, "m64n64k16.f32.bf16.bf16", PRT_WGMMA_ACC32, PRT_WGMMA_ACC32_OPERANDS, 32, 33, 34)
PRT_WGMMA_SS(__nv_bfloat16, 128, "m64n128k16.f32.bf16.bf16", PRT_WGMMA_ACC64, PRT_WGMMA_ACC64_OPERANDS, 64, 65,
             66)
PRT_WGMMA_RS_AS(WgmmaRS, 1, __half, 64, "m64n64k16.f32.f16.f16", PRT_WGMMA_ACC32, PRT_WGMMA_ACC32_OPERANDS,
                "{%32, %33, %34, %35}", 36, 37)
PRT_WGMMA_RS_AS(WgmmaRS, 1, __nv_bfloat16, 64, "m64n64k16.f32.bf16.bf16", PRT_WGMMA_ACC32,
                PRT_WGMMA_ACC32_OPERANDS, "{%32, %33, %34, %35}", 36, 37)
PRT_WGMMA_RS_AS(WgmmaRSKMajor, 0, __half, 8, "m64n8k16.f32.f16.f16", PRT_WGMMA_ACC4, PRT_WGMMA_ACC4_OPERANDS,
                "{%4, %5, %6, %7}", 8, 9)
PRT_WGMMA_RS_AS(WgmmaRSKMajor, 0, __nv_bfloat16, 8, "m64n8k16.f32.bf16.bf16", PRT_WGMMA_ACC4,
                PRT_WGMMA_ACC4_OPERANDS, "{%4, %5, %6, %7}", 8, 9)
#else
// Outside sm_90a the wrappers exist (so kernels compile) and do nothing; such kernels are never launched.
template <typename T, int N>
struct WgmmaSS {
  static __device__ __forceinline__ void run(float (&)[N / 2], uint64_t, uint64_t, int) {}
};
template <typename T, int N>
struct WgmmaRS {
  static __device__ __forceinline__ void run(float (&)[N / 2], const uint32_t (&)[4], uint64_t, int) {}
};
template <typename T, int N>
struct WgmmaRSKMajor {
  static __device__ __forceinline__ void run(float (&)[N / 2], const uint32_t (&)[4], uint64_t, int) {}
};
#endif

#undef PRT_WGMMA_SS
#undef PRT_WGMMA_RS_AS
#undef PRT_WGMMA_ACC4
#undef PRT_WGMMA_ACC4_OPERANDS

}  // namespace sm90

// ---- host: TMA tensor maps ---------------------------------------------------------------------------

// A tensor map over a row-major [rows, cols] matrix of 16-bit elements whose rows lie `row_stride`
// elements apart, copied in boxes of [box_rows, 64] with the 128-byte swizzle (sw128_desc's layout).
// The encoder is a driver function, reached through the runtime so that nothing links libcuda.
// Requirements (checked by the encoder): base 16-byte aligned, row_stride * 2 a multiple of 16,
// box_rows <= 256.
inline CUtensorMap make_tensor_map_sw128(const void* base, uint64_t rows, uint64_t cols, uint64_t row_stride,
                                         uint32_t box_rows, CUtensorMapDataType dtype) {
  using Encode = decltype(&cuTensorMapEncodeTiled);
  static const Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    PRT_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || fn == nullptr)
      throw std::runtime_error("persimmon_rt: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<Encode>(fn);
  }();
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_stride * 2};  // bytes between rows
  const cuuint32_t box[2] = {64, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(&map, dtype, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("persimmon_rt: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(int(r)) +
                             ") for a [" + std::to_string(rows) + ", " + std::to_string(cols) + "] tensor map");
  return map;
}

template <typename T>
constexpr CUtensorMapDataType tensor_map_dtype();
template <>
constexpr CUtensorMapDataType tensor_map_dtype<__half>() {
  return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}
template <>
constexpr CUtensorMapDataType tensor_map_dtype<__nv_bfloat16>() {
  return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

}  // namespace persimmon_rt
