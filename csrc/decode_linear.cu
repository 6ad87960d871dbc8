// Launcher of the decode GEMV: picks the tile configuration for M, the template instance for
// (dtype, output dtype), sizes the grid, checks the launch. Torch-free.
#include "decode_linear.h"

#include "kernels/decode_linear.cuh"

namespace persimmon_rt {
namespace {

using gemv::DecodeLinearParams;
using gemv::GemvConfig;

// Up to 8 rows: one 16-row tile and one x fragment per warp, 4 chunks (8 weight loads of 16 bytes) in
// flight per lane, 8 warps splitting K. 9..16 rows add the second x fragment (a second mma per
// A fragment, twice the x loads); the weight stream is unchanged.
// benchmarks/decode_linear_variants.cu sweeps J, WARPS, RT and the L2 hint: at M <= 8 these are within
// 1 % of the best variant on every Persimmon shape; at M = 16 no variant won every shape. A programmatic
// dependent launch whose blocks prefetched their first weights into L2 before griddepcontrol.wait
// measured 17-38 % slower (benchmarks/RESULTS.md, 2026-11-25 decode_linear).
using Config8 = GemvConfig<1, 1, 4, 8, 3>;
using Config16 = GemvConfig<1, 2, 4, 8, 3>;

template <typename Cfg>
void launch(const DecodeLinearParams& p, DType dtype, bool out_fp32, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, Cfg::kRowsPerBlock)));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (out_fp32) {
      gemv::decode_linear_kernel<T, float, Cfg><<<grid, Cfg::kThreads, 0, stream>>>(p);
    } else {
      gemv::decode_linear_kernel<T, T, Cfg><<<grid, Cfg::kThreads, 0, stream>>>(p);
    }
  });
  PRT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_decode_linear(const void* x, const void* weight, const void* bias, const void* residual, void* out,
                          int64_t ldx, int M, int N, int K, bool relu2, DType dtype, bool out_fp32,
                          cudaStream_t stream) {
  PRT_REQUIRE(M >= 1 && M <= kDecodeLinearMaxRows, "M must be in [1, " + std::to_string(kDecodeLinearMaxRows) + "]");
  PRT_REQUIRE(N >= 1, "N must be >= 1");
  PRT_REQUIRE(K >= 8 && K % kVec == 0, "K must be a positive multiple of 8");
  PRT_REQUIRE(ldx >= K && ldx % kVec == 0, "x row stride must be >= K and a multiple of 8");
  PRT_REQUIRE(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(weight) % 16 == 0,
              "x and weight must be 16-byte aligned");
  const DecodeLinearParams p{x, weight, bias, residual, out, ldx, M, N, K, relu2};
  if (M <= Config8::kMaxM) {
    launch<Config8>(p, dtype, out_fp32, stream);
  } else {
    launch<Config16>(p, dtype, out_fp32, stream);
  }
}

}  // namespace persimmon_rt
