// C entry points of the persistent-chain development harness (persistent_chain.cuh), torch-free so that it
// builds in seconds and anywhere nvcc is (no GPU needed); benchmarks/bench_persistent_chain.py loads it with
// ctypes, building it first when build/dev/libpersistent_chain.so is missing:
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC \
//        -shared -cudart shared -Ibenchmarks -Icsrc -o build/dev/libpersistent_chain.so benchmarks/persistent_chain.cu
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "persistent_chain.cuh"

using namespace persimmon_rt::chain;

namespace {

// Every variant <PK, R, C, CH, FW, INT8, LAYOUT> once: the switch in chain_run and the table that
// chain_variant reads are both made from this list. 5-6 fit two blocks an SM (for per-op launches); 7-8 read
// row-major weights through tensor maps; 9 has eight consumer warps.
#define PERSISTENT_CHAIN_VARIANTS(X) \
  X(256, 20, 4, 16, 8, false, 0)    \
  X(512, 12, 4, 8, 8, false, 0)     \
  X(256, 20, 4, 8, 8, false, 0)     \
  X(512, 24, 4, 8, 8, true, 0)      \
  X(1024, 12, 4, 4, 8, true, 0)     \
  X(256, 8, 4, 8, 8, false, 0)      \
  X(512, 8, 4, 8, 8, true, 0)       \
  X(256, 20, 4, 16, 8, false, 1)    \
  X(1024, 12, 4, 4, 8, true, 1)     \
  X(512, 16, 8, 8, 8, true, 0)

struct Variant {
  int page_k, chunk_pages, int8, layout;
};

#define PERSISTENT_CHAIN_ROW(PK, R, C, CH, FW, INT8, LAYOUT) {PK, CH, INT8, LAYOUT},
constexpr Variant kVariants[] = {PERSISTENT_CHAIN_VARIANTS(PERSISTENT_CHAIN_ROW)};
#undef PERSISTENT_CHAIN_ROW
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

// flags & kPdl: one launch per op (n_ops = 1 each, with its own counters), each with programmatic dependent
// launch; else one launch for the whole chain.
template <int PK, int R, int C, int CH, int FW, bool INT8, bool LAYOUT>
cudaError_t launch(const OpDesc* descs, int n_ops, unsigned* counters, int64_t counter_count, void* reset,
                   int64_t reset_bytes, int blocks, int flags, unsigned long long* trace, cudaStream_t stream) {
  constexpr int smem = chain_smem_bytes<PK, R, C, CH, FW, INT8, LAYOUT>();
  static_assert(smem <= 232448, "more shared memory than an H100 / H200 block may take");
  auto kernel = chain_kernel<PK, R, C, CH, FW, INT8, LAYOUT>;
  static const cudaError_t attribute = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaError_t err = attribute;  // set once: the launches may be captured in a CUDA graph
  if (err == cudaSuccess) err = cudaMemsetAsync(counters, 0, counter_count * sizeof(unsigned), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(reset, 0xff, reset_bytes, stream);  // activations: kEmpty
  if (err != cudaSuccess) return err;
  const dim3 threads((C + FW + 1) * 32);
  if (!(flags & kPdl)) {
    kernel<<<blocks, threads, smem, stream>>>(descs, n_ops, counters, counters + n_ops, flags, trace);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = threads;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  for (int i = 0; i < n_ops && err == cudaSuccess; ++i)
    err = cudaLaunchKernelEx(&config, kernel, descs + i, 1, counters + i, counters + n_ops + i, flags,
                             static_cast<unsigned long long*>(nullptr));
  return err;
}

}  // namespace

extern "C" {

// counters: [done n_ops][next n_ops][every op's tile counters] (zeroed here); reset: the activations, set
// to kEmpty here; trace: [n_ops][blocks][2] or null. Returns a cudaError_t (0: launched).
int chain_run(const void* descs, int n_ops, void* counters, int64_t counter_count, void* reset, int64_t reset_bytes,
              int blocks, int variant, int flags, void* trace, void* stream) {
  const auto* d = static_cast<const OpDesc*>(descs);
  auto* c = static_cast<unsigned*>(counters);
  auto* t = static_cast<unsigned long long*>(trace);
  auto* s = static_cast<cudaStream_t>(stream);
  int v = 0;
#define PERSISTENT_CHAIN_CASE(PK, R, C, CH, FW, INT8, LAYOUT)                                \
  if (variant == v++)                                                                          \
    return launch<PK, R, C, CH, FW, INT8, LAYOUT>(d, n_ops, c, counter_count, reset, reset_bytes, blocks, \
                                                     flags, t, s);
  PERSISTENT_CHAIN_VARIANTS(PERSISTENT_CHAIN_CASE)
#undef PERSISTENT_CHAIN_CASE
  return static_cast<int>(cudaErrorInvalidValue);
}

int chain_desc_bytes() { return static_cast<int>(sizeof(OpDesc)); }

int chain_num_variants() { return kNumVariants; }

// page k, pages a unit, int8 weights (1 / 0), weight layout (persistent_chain.cuh) of a variant; -1 for an
// unknown one.
int chain_variant(int v, int* page_k, int* chunk_pages, int* int8, int* layout) {
  if (v < 0 || v >= kNumVariants) return -1;
  *page_k = kVariants[v].page_k;
  *chunk_pages = kVariants[v].chunk_pages;
  *int8 = kVariants[v].int8;
  *layout = kVariants[v].layout;
  return 0;
}

// Blocks of a variant resident on one SM (1 or 2; 0 on an error).
int chain_blocks_per_sm(int variant) {
  int v = 0, n = 0;
#define PERSISTENT_CHAIN_OCCUPANCY(PK, R, C, CH, FW, INT8, LAYOUT)                                     \
  if (variant == v++) {                                                                                 \
    auto kernel = chain_kernel<PK, R, C, CH, FW, INT8, LAYOUT>;                                      \
    constexpr int smem = chain_smem_bytes<PK, R, C, CH, FW, INT8, LAYOUT>();                         \
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess || \
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, (C + FW + 1) * 32, smem) != cudaSuccess)   \
      return 0;                                                                                         \
    return n;                                                                                           \
  }
  PERSISTENT_CHAIN_VARIANTS(PERSISTENT_CHAIN_OCCUPANCY)
#undef PERSISTENT_CHAIN_OCCUPANCY
  return 0;
}

// The tensor map of LAYOUT 1 over row-major [rows, cols] weights of elem_bytes (2: fp16, 1: int8), written
// to out (128 bytes). Returns a CUresult (0: encoded).
int chain_encode_map(void* out, const void* base, uint64_t rows, uint64_t cols, int elem_bytes) {
  using Encode = decltype(&cuTensorMapEncodeTiled);
  static Encode encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess || fn == nullptr)
      return static_cast<int>(CUDA_ERROR_NOT_FOUND);
    encode = reinterpret_cast<Encode>(fn);
  }
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * elem_bytes};
  const cuuint32_t box[2] = {256, 16};  // box_bytes() / elem_bytes
  const cuuint32_t element_strides[2] = {1, 1};
  return static_cast<int>(encode(static_cast<CUtensorMap*>(out),
                                 elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_UINT8, 2,
                                 const_cast<void*>(base), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_NONE,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
}

const char* chain_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
