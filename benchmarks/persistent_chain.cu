// C entry points of the persistent-chain development harness (persistent_chain.cuh), torch-free so that it
// builds in seconds and anywhere nvcc is (no GPU needed); benchmarks/bench_persistent_chain.py loads it with
// ctypes, building it first when build/dev/libpersistent_chain.so is missing:
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC \
//        -shared -cudart shared -Ibenchmarks -Icsrc -o build/dev/libpersistent_chain.so benchmarks/persistent_chain.cu
#include <cuda_runtime.h>

#include <cstdint>

#include "persistent_chain.cuh"

using namespace persimmon_rt::chain;

namespace {

// Every variant <PK, R, C, CH, FW, INT8> once: the switch in chain_run and the table that chain_variant reads
// are both made from this list.
#define PERSISTENT_CHAIN_VARIANTS(X) \
  X(256, 20, 4, 16, 8, false)        \
  X(512, 12, 4, 8, 8, false)         \
  X(256, 20, 4, 8, 8, false)         \
  X(512, 24, 4, 8, 8, true)          \
  X(1024, 12, 4, 4, 8, true)

struct Variant {
  int page_k, chunk_pages, int8;
};

#define PERSISTENT_CHAIN_ROW(PK, R, C, CH, FW, INT8) {PK, CH, INT8},
constexpr Variant kVariants[] = {PERSISTENT_CHAIN_VARIANTS(PERSISTENT_CHAIN_ROW)};
#undef PERSISTENT_CHAIN_ROW
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

template <int PK, int R, int C, int CH, int FW, bool INT8>
cudaError_t launch(const OpDesc* descs, int n_ops, unsigned* counters, int64_t counter_count, void* reset,
                   int64_t reset_bytes, int blocks, int flags, unsigned long long* trace, cudaStream_t stream) {
  constexpr int smem = chain_smem_bytes<PK, R, C, CH, FW, INT8>();
  static_assert(smem <= 232448, "more shared memory than an H100 / H200 block may take");
  auto kernel = chain_kernel<PK, R, C, CH, FW, INT8>;
  static const cudaError_t attribute = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaError_t err = attribute;  // set once: the launches may be captured in a CUDA graph
  if (err == cudaSuccess) err = cudaMemsetAsync(counters, 0, counter_count * sizeof(unsigned), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(reset, 0xff, reset_bytes, stream);  // activations: kEmpty
  if (err != cudaSuccess) return err;
  kernel<<<blocks, (C + FW + 1) * 32, smem, stream>>>(descs, n_ops, counters, counters + n_ops, flags, trace);
  return cudaGetLastError();
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
#define PERSISTENT_CHAIN_CASE(PK, R, C, CH, FW, INT8)                                                            \
  if (variant == v++)                                                                                          \
    return launch<PK, R, C, CH, FW, INT8>(d, n_ops, c, counter_count, reset, reset_bytes, blocks, flags, t, s);
  PERSISTENT_CHAIN_VARIANTS(PERSISTENT_CHAIN_CASE)
#undef PERSISTENT_CHAIN_CASE
  return static_cast<int>(cudaErrorInvalidValue);
}

int chain_desc_bytes() { return static_cast<int>(sizeof(OpDesc)); }

int chain_num_variants() { return kNumVariants; }

// page k, pages a unit, int8 weights (1 / 0) of a variant; -1 for an unknown one.
int chain_variant(int v, int* page_k, int* chunk_pages, int* int8) {
  if (v < 0 || v >= kNumVariants) return -1;
  *page_k = kVariants[v].page_k;
  *chunk_pages = kVariants[v].chunk_pages;
  *int8 = kVariants[v].int8;
  return 0;
}

const char* chain_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
