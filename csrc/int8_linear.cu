// Launchers of the int8 weight-only ops: the decode GEMV (tile configuration per shape, template instance
// per dtype / output dtype) and the dequantization for prefill. Torch-free.
#include "int8_linear.h"

#include <tuple>
#include <utility>

#include "kernels/decode_linear_int8.cuh"
#include "kernels/dequantize_int8.cuh"

namespace persimmon_rt {
namespace {

using gemv::DecodeLinearInt8Params;
using gemv::GemvConfig;

// GemvConfig<RT, MT, J, WARPS, MIN_BLOCKS>: the fp16 GEMV's tile shapes; at one byte per weight a load
// carries twice the k, so a warp's share of K is covered in half the loads. Few instances: each costs
// compile time on every build. Bytes in flight per block: WARPS x 32 lanes x J x RT x 32 B.
using Configs = std::tuple<GemvConfig<1, 1, 4, 8, 3>,    // 0  m8 J4 W8
                           GemvConfig<1, 1, 8, 8, 2>,    // 1  m8 J8 W8
                           GemvConfig<1, 1, 4, 16, 1>,   // 2  m8 J4 W16
                           GemvConfig<1, 2, 4, 8, 3>,    // 3  m16 J4 W8
                           GemvConfig<1, 2, 2, 16, 2>>;  // 4  m16 J2 W16
constexpr int kNumConfigs = std::tuple_size_v<Configs>;

// Persimmon-8B decode shapes; others take M <= 8: 0, else 3. From the H200 sweep
// (benchmarks/bench_int8.py --sweep, benchmarks/RESULTS.md run E): dense 6.2 / 6.9 us with c0 against
// 7.4 / 8.1 with c2 (1 / 8 rows); MLP-down 20.2 / 21.3 with c4 against 21.1 / 22.4 with c2. The wide
// shapes keep c0 (best or within 1 %).
struct ShapeRule {
  int n, k, config8, config16;
};
constexpr ShapeRule kShapeRules[] = {
    {12288, 4096, 0, 3},   // QKV
    {4096, 4096, 0, 4},    // attention dense
    {16384, 4096, 0, 3},   // MLP up
    {4096, 16384, 4, 4},   // MLP down
    {262144, 4096, 0, 3},  // lm_head
};

int choose_config(int M, int N, int K) {
  for (const ShapeRule& r : kShapeRules)
    if (r.n == N && r.k == K) return M <= 8 ? r.config8 : r.config16;
  return M <= 8 ? 0 : 3;
}

template <typename Cfg>
std::string config_name() {
  return "m" + std::to_string(Cfg::kMaxM) + " J" + std::to_string(Cfg::J) + " W" + std::to_string(Cfg::WARPS) +
         " RT" + std::to_string(Cfg::RT) + " B" + std::to_string(Cfg::MIN_BLOCKS);
}

template <typename Cfg>
void launch(const DecodeLinearInt8Params& p, DType dtype, bool out_fp32, cudaStream_t stream) {
  PRT_REQUIRE(p.M <= Cfg::kMaxM, "config " + config_name<Cfg>() + " takes at most " + std::to_string(Cfg::kMaxM) +
                                     " rows, got " + std::to_string(p.M));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, Cfg::kRowsPerBlock)));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto run = [&](auto kernel) { launch_kernel(kernel, grid, dim3(Cfg::kThreads), 0, stream, /*pdl=*/true, p); };
    out_fp32 ? run(gemv::decode_linear_int8_kernel<T, float, Cfg>) : run(gemv::decode_linear_int8_kernel<T, T, Cfg>);
  });
}

template <size_t... I>
void launch_config(int config, const DecodeLinearInt8Params& p, DType dtype, bool out_fp32, cudaStream_t stream,
                   std::index_sequence<I...>) {
  ((config == static_cast<int>(I) ? launch<std::tuple_element_t<I, Configs>>(p, dtype, out_fp32, stream) : void()),
   ...);
}

template <size_t... I>
std::vector<std::string> names(std::index_sequence<I...>) {
  return {config_name<std::tuple_element_t<I, Configs>>()...};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

std::vector<std::string> decode_linear_int8_config_names() { return names(std::make_index_sequence<kNumConfigs>{}); }

void launch_decode_linear_int8(const void* x, const int8_t* weight, const float* scale, const void* bias,
                               const void* residual, void* out, int64_t ldx, int M, int N, int K, bool relu2,
                               DType dtype, bool out_fp32, int config, cudaStream_t stream) {
  PRT_REQUIRE(M >= 1 && M <= kDecodeLinearInt8MaxRows,
              "M must be in [1, " + std::to_string(kDecodeLinearInt8MaxRows) + "]");
  PRT_REQUIRE(N >= 1, "N must be >= 1");
  PRT_REQUIRE(K >= kInt8KMultiple && K % kInt8KMultiple == 0, "K must be a positive multiple of 16");
  PRT_REQUIRE(ldx >= K && ldx % kVec == 0, "x row stride must be >= K and a multiple of 8");
  PRT_REQUIRE(aligned16(x) && aligned16(weight), "x and weight must be 16-byte aligned");
  PRT_REQUIRE(scale != nullptr, "scale is required");
  PRT_REQUIRE(config >= -1 && config < kNumConfigs,
              "config must be -1 or in [0, " + std::to_string(kNumConfigs) + "), got " + std::to_string(config));
  const DecodeLinearInt8Params p{x, weight, scale, bias, residual, out, ldx, M, N, K, relu2};
  launch_config(config < 0 ? choose_config(M, N, K) : config, p, dtype, out_fp32, stream,
                std::make_index_sequence<kNumConfigs>{});
}

void launch_dequantize_int8(const int8_t* weight, const float* scale, void* out, int64_t N, int K, DType dtype,
                            cudaStream_t stream) {
  PRT_REQUIRE(N >= 1 && K >= kInt8KMultiple && K % kInt8KMultiple == 0, "N must be >= 1 and K a positive multiple of 16");
  PRT_REQUIRE(aligned16(weight) && aligned16(out), "weight and out must be 16-byte aligned");
  const int64_t groups = N * (K / kInt8KMultiple);
  constexpr int kThreads = 256;
  // Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
  const int64_t blocks = ceil_div(groups, kThreads) < 132 * 16 ? ceil_div(groups, kThreads) : 132 * 16;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_kernel(dequantize_int8_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                  /*pdl=*/true, weight, scale, static_cast<T*>(out), groups, K / kInt8KMultiple);
  });
}

}  // namespace persimmon_rt
