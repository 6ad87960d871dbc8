// Torch binding of the persistent-chain development harness (persistent_chain.cuh); built by
// benchmarks/bench_persistent_chain.py with torch.utils.cpp_extension.load, for sm_90a only.
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "persistent_chain.cuh"

using namespace persimmon_rt::chain;

namespace {

template <int PK, int R, int C, int CH, int FW, bool INT8>
void launch(const torch::Tensor& descs, int n_ops, const torch::Tensor& counters, const torch::Tensor& reset,
            int blocks, int flags, unsigned long long* trace) {
  constexpr int smem = chain_smem_bytes<PK, R, C, CH, FW, INT8>();
  static_assert(smem <= 232448, "more shared memory than an H100 / H200 block may take");
  auto kernel = chain_kernel<PK, R, C, CH, FW, INT8>;
  static const bool attribute_set = [&] {
    TORCH_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess);
    return true;
  }();
  (void)attribute_set;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* done = reinterpret_cast<unsigned*>(counters.data_ptr());
  TORCH_CHECK(cudaMemsetAsync(done, 0, counters.numel() * 4, stream) == cudaSuccess);
  TORCH_CHECK(cudaMemsetAsync(reset.data_ptr(), 0xff, reset.numel(), stream) == cudaSuccess);  // kEmpty
  kernel<<<blocks, (C + FW + 1) * 32, smem, stream>>>(reinterpret_cast<const OpDesc*>(descs.data_ptr()), n_ops, done,
                                                     done + n_ops, flags, trace);
  TORCH_CHECK(cudaGetLastError() == cudaSuccess);
}

// counters: int32 [done n_ops][next n_ops][every op's tile counters]; reset: the activations (uint8),
// set to kEmpty before the launch; trace: int64 [n_ops * blocks * 2] or empty.
void run_chain(torch::Tensor descs, int64_t n_ops, torch::Tensor counters, torch::Tensor reset, int64_t blocks,
               int64_t variant, int64_t flags, torch::Tensor trace) {
  auto* tr = trace.numel() ? reinterpret_cast<unsigned long long*>(trace.data_ptr()) : nullptr;
  const int n = static_cast<int>(n_ops), nb = static_cast<int>(blocks), fl = static_cast<int>(flags);
  switch (variant) {  // <PK, R, C, CH, FW, INT8>
    case 0: launch<256, 20, 4, 16, 8, false>(descs, n, counters, reset, nb, fl, tr); break;
    case 1: launch<512, 12, 4, 8, 8, false>(descs, n, counters, reset, nb, fl, tr); break;
    case 2: launch<256, 20, 4, 8, 8, false>(descs, n, counters, reset, nb, fl, tr); break;
    case 3: launch<512, 24, 4, 8, 8, true>(descs, n, counters, reset, nb, fl, tr); break;
    case 4: launch<1024, 12, 4, 4, 8, true>(descs, n, counters, reset, nb, fl, tr); break;
    default: TORCH_CHECK(false, "unknown variant ", variant);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run_chain", &run_chain);
  m.def("desc_bytes", [] { return static_cast<int64_t>(sizeof(OpDesc)); });
  m.attr("PAGE_K") = py::make_tuple(256, 512, 256, 512, 1024);
  m.attr("CHUNK_PAGES") = py::make_tuple(16, 8, 8, 8, 4);
  m.attr("INT8") = py::make_tuple(false, false, false, true, true);
}
