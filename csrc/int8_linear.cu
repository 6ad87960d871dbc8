// Launchers of the int8 weight-only ops: the decode GEMV (tile configuration per shape, template instance
// per dtype / output dtype, grid) and the dequantization for prefill. Torch-free.
#include "int8_linear.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "decode_linear.h"
#include "kernels/decode_linear_int8.cuh"
#include "kernels/dequantize_int8.cuh"

namespace persimmon_rt {
namespace {

using gemv::DecodeLinearInt8Params;
using gemv::Int8GemvConfig;

// The compiled configurations, Int8GemvConfig<RT, MT, J, WARPS, MIN_BLOCKS, STAGES, PERSISTENT>, by
// index; kShapeRules picks among them and benchmarks/bench_int8.py --sweep times every one on every
// Persimmon-8B shape. J counts 64-k chunks; bytes in flight per warp: STAGES x J x RT x 1 KB (a warp's
// 16 rows x 64 bytes per chunk). At K = 4096 a warp of an 8-warp block has 8 chunks: J = 4 is two loop
// steps, J = 8 one. Few instances: each costs compile time on every build.
using Configs = std::tuple<
    // Up to 8 rows (MT = 1).
    Int8GemvConfig<1, 1, 4, 8, 3, 1, false>,   // 0  the fp16 GEMV's loop: the next step after this one's mma
    Int8GemvConfig<1, 1, 8, 8, 2, 1, false>,   // 1  a warp's whole K = 4096 share in one step
    Int8GemvConfig<1, 1, 4, 16, 1, 1, false>,  // 2  16 warps: shorter shares, one block per SM
    Int8GemvConfig<1, 1, 2, 8, 3, 2, false>,   // 3  c0's bytes in flight, the next step requested before the mma
    Int8GemvConfig<1, 1, 4, 8, 2, 2, false>,   // 4  two stages of c0's step: twice its bytes in flight
    Int8GemvConfig<1, 1, 4, 4, 4, 2, false>,   // 5  4 warps of 4 steps (K = 4096): a pipeline inside each block
    Int8GemvConfig<1, 1, 2, 8, 3, 2, true>,    // 6  c3, persistent: loads in flight across tiles
    Int8GemvConfig<1, 1, 4, 8, 2, 2, true>,    // 7  c4, persistent
    Int8GemvConfig<1, 1, 4, 16, 1, 2, true>,   // 8  persistent, a 16-warp block per SM; x kept at K = 4096
    // Up to 16 rows (MT = 2: a second x fragment and mma per weight fragment; the weight stream is the same).
    Int8GemvConfig<1, 2, 4, 8, 3, 1, false>,   // 9  c0's loop
    Int8GemvConfig<1, 2, 2, 16, 2, 1, false>,  // 10 16 warps
    Int8GemvConfig<1, 2, 2, 8, 2, 2, false>,   // 11 two stages
    Int8GemvConfig<1, 2, 2, 8, 2, 2, true>>;   // 12 two stages, persistent
constexpr int kNumConfigs = std::tuple_size_v<Configs>;
constexpr int kDefault8 = 0;   // shapes without a rule
constexpr int kDefault16 = 9;

template <size_t... I>
constexpr std::array<int, sizeof...(I)> max_rows(std::index_sequence<I...>) {
  return {std::tuple_element_t<I, Configs>::kMaxM...};
}
constexpr auto kMaxRows = max_rows(std::make_index_sequence<kNumConfigs>{});

// Per-shape choices for one row, 2..8 rows and 9..16 rows (Persimmon-8B decode shapes), from the H200
// sweep of benchmarks/bench_int8.py --sweep (benchmarks/RESULTS.md, run J); 9..16 rows were not swept and
// keep the earlier loop shapes (9, and the 16-warp 10 for dense and MLP-down).
struct ShapeRule {
  int n, k, config1, config8, config16;
};
constexpr ShapeRule kShapeRules[] = {
    {12288, 4096, 7, 7, 9},     // QKV: c7 16.0 / 17.0 us against c0 16.7 / 18.3 (1 / 8 rows)
    {4096, 4096, 1, 1, 10},     // attention dense: c1 6.6 / 6.8 against 6.6 / 7.2
    {16384, 4096, 7, 7, 9},     // MLP up: c7 20.2 / 21.6 against 21.7 / 24.0
    {4096, 16384, 1, 7, 10},    // MLP down: c1 20.7 / c7 22.6 against c10 25.9 / 27.2
    {262144, 4096, 3, 7, 9},    // lm_head: c3 255.5 / c7 264.9 against 256.4 / 270.2
};
// The folded-LayerNorm instance (decode_linear_int8_folded_ln), where its sweep (bench_int8.py --fold,
// RESULTS run V9) picks differently; other shapes take kShapeRules. 2..8 rows keep c7, the fastest at 8.
constexpr ShapeRule kFoldedShapeRules[] = {
    {12288, 4096, 6, 7, 9},     // QKV: c6 14.9 us against c7 15.3 at one row
    {262144, 4096, 6, 7, 9},    // lm_head: c6 253.1 us against c3 268.3 at one row
};

// One row and 2..8 rows may take any configuration that takes 8 rows, 9..16 rows one that takes 16.
constexpr bool rule_ok(const ShapeRule& r) {
  const auto fits = [](int c, int rows) { return c >= 0 && c < kNumConfigs && kMaxRows[c] >= rows; };
  return r.n >= 1 && r.k >= kInt8KMultiple && fits(r.config1, 8) && fits(r.config8, 8) && fits(r.config16, 16);
}
constexpr bool rules_ok() {
  for (const ShapeRule& r : kShapeRules)
    if (!rule_ok(r)) return false;
  for (const ShapeRule& r : kFoldedShapeRules)
    if (!rule_ok(r)) return false;
  return rule_ok({1, kInt8KMultiple, kDefault8, kDefault8, kDefault16});
}
static_assert(rules_ok(), "kShapeRules, kFoldedShapeRules or a default names a configuration that is missing or takes too few rows");

// PERSIMMON_RT_INT8_RULES="N:K:c1:c8:c16[,...]" puts rules before kShapeRules: a sweep's picks timed end to
// end without a rebuild (benchmarks/bench_int8.py). Read once; a malformed value fails every launch.
constexpr const char* kRulesEnv = "PERSIMMON_RT_INT8_RULES";

std::vector<ShapeRule> parse_rules(const std::string& text) {
  std::vector<ShapeRule> rules;
  for (size_t pos = 0; pos < text.size();) {
    const size_t end = std::min(text.find(',', pos), text.size());
    const std::string entry = text.substr(pos, end - pos);
    ShapeRule r{};
    char extra = 0;
    if (std::sscanf(entry.c_str(), "%d:%d:%d:%d:%d%c", &r.n, &r.k, &r.config1, &r.config8, &r.config16, &extra) != 5 ||
        !rule_ok(r))
      throw std::invalid_argument(std::string(kRulesEnv) + ": bad entry '" + entry +
                                  "' (want N:K:config1:config8:config16, of the " + std::to_string(kNumConfigs) +
                                  " configurations; config16 must take 16 rows)");
    rules.push_back(r);
    pos = end + 1;
  }
  return rules;
}

const std::vector<ShapeRule>& env_rules() {
  static const std::vector<ShapeRule> rules = [] {
    const char* v = std::getenv(kRulesEnv);
    return v == nullptr ? std::vector<ShapeRule>{} : parse_rules(v);
  }();
  return rules;
}

int choose_config(int M, int N, int K, bool folded) {
  const auto pick = [M](const ShapeRule& r) { return M == 1 ? r.config1 : M <= 8 ? r.config8 : r.config16; };
  for (const ShapeRule& r : env_rules())
    if (r.n == N && r.k == K) return pick(r);
  if (folded)
    for (const ShapeRule& r : kFoldedShapeRules)
      if (r.n == N && r.k == K) return pick(r);
  for (const ShapeRule& r : kShapeRules)
    if (r.n == N && r.k == K) return pick(r);
  return M <= 8 ? kDefault8 : kDefault16;
}

template <typename Cfg>
std::string config_name() {
  return "m" + std::to_string(Cfg::kMaxM) + " J" + std::to_string(Cfg::J) + " W" + std::to_string(Cfg::WARPS) +
         " RT" + std::to_string(Cfg::RT) + " B" + std::to_string(Cfg::MIN_BLOCKS) + " S" + std::to_string(Cfg::STAGES) +
         (Cfg::PERSISTENT ? " persistent" : "");
}

template <typename Cfg, typename T, typename OutT>
void launch_instance(const DecodeLinearInt8Params& p, cudaStream_t stream) {
  const int tiles = static_cast<int>(ceil_div(p.N, Cfg::kRowsPerBlock));
  // A persistent configuration launches one wave, each block with at least one tile: MIN_BLOCKS per SM,
  // which the launch bounds guarantee room for and the register counts of these configurations allow no
  // more of (ptxas -v).
  const int grid = Cfg::PERSISTENT ? std::min(tiles, Cfg::MIN_BLOCKS * multiprocessors()) : tiles;
  if (p.ln_fold_scale != nullptr) {  // the folded LayerNorm: x staged in dynamic shared memory
    constexpr auto kernel = gemv::decode_linear_int8_kernel<T, OutT, Cfg, true>;
    const size_t smem = static_cast<size_t>(p.M) * gemv::fold_stage_stride(p.K) * sizeof(T);
    PRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    launch_kernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(Cfg::kThreads), smem, stream, /*pdl=*/true, p);
  } else {
    constexpr auto kernel = gemv::decode_linear_int8_kernel<T, OutT, Cfg>;
    launch_kernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(Cfg::kThreads), 0, stream, /*pdl=*/true, p);
  }
}

template <typename Cfg>
void launch(const DecodeLinearInt8Params& p, DType dtype, bool out_fp32, cudaStream_t stream) {
  PRT_REQUIRE(p.M <= Cfg::kMaxM, "config " + config_name<Cfg>() + " takes at most " + std::to_string(Cfg::kMaxM) +
                                     " rows, got " + std::to_string(p.M));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    out_fp32 ? launch_instance<Cfg, T, float>(p, stream) : launch_instance<Cfg, T, T>(p, stream);
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

int decode_linear_int8_config(int M, int N, int K, bool folded) {
  PRT_REQUIRE(M >= 1 && M <= kDecodeLinearInt8MaxRows,
              "M must be in [1, " + std::to_string(kDecodeLinearInt8MaxRows) + "]");
  return choose_config(M, N, K, folded);
}

namespace {

void check_int8_gemv(const void* x, const int8_t* weight, const float* scale, int64_t ldx, int M, int N, int K,
                     int config) {
  PRT_REQUIRE(M >= 1 && M <= kDecodeLinearInt8MaxRows,
              "M must be in [1, " + std::to_string(kDecodeLinearInt8MaxRows) + "]");
  PRT_REQUIRE(N >= 1, "N must be >= 1");
  PRT_REQUIRE(K >= kInt8KMultiple && K % kInt8KMultiple == 0, "K must be a positive multiple of 16");
  PRT_REQUIRE(ldx >= K && ldx % kVec == 0, "x row stride must be >= K and a multiple of 8");
  PRT_REQUIRE(aligned16(x) && aligned16(weight), "x and weight must be 16-byte aligned");
  PRT_REQUIRE(scale != nullptr, "scale is required");
  PRT_REQUIRE(config >= -1 && config < kNumConfigs,
              "config must be -1 or in [0, " + std::to_string(kNumConfigs) + "), got " + std::to_string(config));
}

}  // namespace

void launch_decode_linear_int8(const void* x, const int8_t* weight, const float* scale, const void* bias,
                               const void* residual, void* out, int64_t ldx, int M, int N, int K, bool relu2,
                               DType dtype, bool out_fp32, int config, cudaStream_t stream) {
  check_int8_gemv(x, weight, scale, ldx, M, N, K, config);
  const DecodeLinearInt8Params p{x, weight, scale, bias, residual, out, ldx, M, N, K, relu2};
  launch_config(config < 0 ? choose_config(M, N, K, false) : config, p, dtype, out_fp32, stream,
                std::make_index_sequence<kNumConfigs>{});
}

void launch_decode_linear_int8_folded_ln(const void* x, const int8_t* weight, const float* scale, const void* ln_weight,
                                         const float* fold_scale, const float* fold_shift, float unscale,
                                         const void* residual, void* out, float eps, int64_t ldx, int M, int N, int K,
                                         bool relu2, DType dtype, bool out_fp32, int config, cudaStream_t stream) {
  check_int8_gemv(x, weight, scale, ldx, M, N, K, config);
  check_folded_layernorm(ln_weight, fold_scale, fold_shift, M, K);
  DecodeLinearInt8Params p{x, weight, scale, nullptr, residual, out, ldx, M, N, K, relu2};
  set_folded_layernorm(p, ln_weight, fold_scale, fold_shift, unscale, eps);
  launch_config(config < 0 ? choose_config(M, N, K, true) : config, p, dtype, out_fp32, stream,
                std::make_index_sequence<kNumConfigs>{});
}

void launch_dequantize_int8(const int8_t* weight, const float* scale, void* out, int64_t N, int K, DType dtype,
                            cudaStream_t stream) {
  PRT_REQUIRE(N >= 1 && K >= kInt8KMultiple && K % kInt8KMultiple == 0, "N must be >= 1 and K a positive multiple of 16");
  PRT_REQUIRE(aligned16(weight) && aligned16(out), "weight and out must be 16-byte aligned");
  const int64_t groups = N * (K / kVec);
  constexpr int kThreads = 256;
  // 32 blocks of 256 per SM (four waves of resident blocks): the fastest of 4-32 on the H200, each thread
  // with kDequantizeUnroll groups in flight; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>(ceil_div(groups, kThreads * kDequantizeUnroll), 32 * multiprocessors());
  // 32-bit indices where the loop's largest index (below groups + kDequantizeUnroll * grid) fits.
  const bool narrow = groups + kDequantizeUnroll * blocks * kThreads <= INT32_MAX;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto run = [&](auto kernel, auto index) {
      using Index = decltype(index);
      launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, /*pdl=*/true, weight,
                    scale, static_cast<T*>(out), static_cast<Index>(groups), static_cast<Index>(K / kVec));
    };
    narrow ? run(dequantize_int8_kernel<T, int>, int{}) : run(dequantize_int8_kernel<T, int64_t>, int64_t{});
  });
}

}  // namespace persimmon_rt
