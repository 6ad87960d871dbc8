// Launcher: one block column per 1024 features, row blocks up to the gridDim.y limit.
#include "bias_relu2.h"

#include <algorithm>

#include "kernels/bias_relu2.cuh"

namespace persimmon_rt {

void launch_bias_relu2(const void* x, const void* bias, void* out, int64_t rows, int64_t features, DType dtype,
                       cudaStream_t stream) {
  PRT_REQUIRE(features > 0 && features % kVec == 0, "features must be a positive multiple of 8");
  PRT_REQUIRE(rows >= 0, "rows must be >= 0");
  if (rows == 0) return;
  const int64_t col_blocks = ceil_div(features / kVec, kBiasRelu2Threads);
  PRT_REQUIRE(col_blocks <= 0x7fffffff, "features too large");
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kBiasRelu2Rows), kMaxGridDimYZ)));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_relu2_kernel<T><<<grid, kBiasRelu2Threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(out), rows, features);
  });
  PRT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace persimmon_rt
