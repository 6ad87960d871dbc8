// Launcher: sizes the block and the chunks per thread (CPT) from the hidden size.
#include "layernorm.h"

#include "kernels/layernorm.cuh"

namespace persimmon_rt {

namespace {

template <typename T, int THREADS, int CPT>
void launch(const void* x, const void* weight, const void* bias, void* out, const void* residual, void* residual_out,
            int64_t rows, int hidden, float eps, cudaStream_t stream) {
  const auto* xt = static_cast<const T*>(x);
  const auto* wt = static_cast<const T*>(weight);
  const auto* bt = static_cast<const T*>(bias);
  auto* ot = static_cast<T*>(out);
  const dim3 grid(static_cast<unsigned>(rows));
  if (residual != nullptr)
    launch_kernel(layernorm_kernel<T, THREADS, CPT, true>, grid, dim3(THREADS), 0, stream, /*pdl=*/true, xt, wt, bt,
                  ot, static_cast<const T*>(residual), static_cast<T*>(residual_out), hidden, eps);
  else
    launch_kernel(layernorm_kernel<T, THREADS, CPT, false>, grid, dim3(THREADS), 0, stream, /*pdl=*/true, xt, wt,
                  bt, ot, static_cast<const T*>(nullptr), static_cast<T*>(nullptr), hidden, eps);
}

}  // namespace

void launch_layernorm(const void* x, const void* weight, const void* bias, void* out, const void* residual,
                      void* residual_out, int64_t rows, int hidden, float eps, DType dtype, cudaStream_t stream) {
  PRT_REQUIRE(hidden > 0 && hidden % kVec == 0 && hidden <= kLayerNormMaxHidden,
              "hidden size must be a multiple of 8 in [8, 16384]");
  PRT_REQUIRE(rows >= 0 && rows < (int64_t{1} << 31), "rows must be in [0, 2^31)");
  PRT_REQUIRE((residual == nullptr) == (residual_out == nullptr), "residual and residual_out go together");
  if (rows == 0) return;
  const int chunks = hidden / kVec;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // 128 threads keep a 4096-wide row (Persimmon-8B) at 4 chunks a thread: four 16-byte loads in
    // flight each, and 16 rows resident per SM for the many-row case.
    if (chunks <= 128) launch<T, 128, 1>(x, weight, bias, out, residual, residual_out, rows, hidden, eps, stream);
    else if (chunks <= 256) launch<T, 128, 2>(x, weight, bias, out, residual, residual_out, rows, hidden, eps, stream);
    else if (chunks <= 512) launch<T, 128, 4>(x, weight, bias, out, residual, residual_out, rows, hidden, eps, stream);
    else if (chunks <= 1024) launch<T, 128, 8>(x, weight, bias, out, residual, residual_out, rows, hidden, eps, stream);
    else launch<T, 256, 8>(x, weight, bias, out, residual, residual_out, rows, hidden, eps, stream);
  });
}

}  // namespace persimmon_rt
