// Launcher of the decode GEMV: picks the tile configuration for (M, N, K), the template instance for
// (dtype, output dtype, LayerNorm prologue), sizes the grid, checks the launch. Torch-free.
#include "decode_linear.h"

#include <iterator>
#include <tuple>
#include <utility>

#include "kernels/decode_linear.cuh"

namespace persimmon_rt {
namespace {

using gemv::DecodeLinearParams;
using gemv::GemvConfig;
using gemv::PipelinedGemvConfig;

// The compiled configurations (GemvConfig<RT, MT, J, WARPS, MIN_BLOCKS>), by index; kShapeRules and
// kDefault* below pick among them. Up to 8 rows (MT = 1): one 16-row tile and one x fragment per warp;
// 9..16 rows (MT = 2) add the second x fragment (a second mma per A fragment, twice the x loads), the
// weight stream is unchanged. Bytes in flight per block: WARPS x 32 lanes x J x RT x 32 B.
// On the H100 (benchmarks/decode_linear_variants.cu, benchmarks/RESULTS.md 2026-11-25) the J4 / 8-warp
// pair was within 1 % of the best variant at M <= 8 on every Persimmon shape; at M = 16 no variant won
// every shape (J2 best on dense, 16 warps on lm_head). The others are candidates for HBM3e's higher
// bandwidth (benchmarks/bench_decode_linear.py --sweep times every one of them).
using Configs = std::tuple<GemvConfig<1, 1, 4, 8, 3>,    // 0  m8 J4 W8   (H100 choice, M <= 8)
                           GemvConfig<1, 1, 8, 8, 2>,    // 1  m8 J8 W8
                           GemvConfig<1, 1, 4, 16, 1>,   // 2  m8 J4 W16
                           GemvConfig<1, 1, 2, 16, 2>,   // 3  m8 J2 W16
                           GemvConfig<1, 1, 8, 4, 4>,    // 4  m8 J8 W4
                           GemvConfig<1, 2, 4, 8, 3>,    // 5  m16 J4 W8  (H100 choice, M <= 16)
                           GemvConfig<1, 2, 2, 8, 3>,    // 6  m16 J2 W8
                           GemvConfig<1, 2, 4, 16, 1>,   // 7  m16 J4 W16
                           // The pipelined loop (decode_linear_pipelined_kernel): two register stages, one
                           // persistent wave walking the tiles. Swept on the H200 with five more (run O): none
                           // beat configs 0-2 up to 8 rows; at 9-16 rows this one is the fastest on dense and
                           // MLP-down.
                           PipelinedGemvConfig<1, 1, 2, 8, 3, 2, true>,    // 8  m8 J2 W8 S2, persistent
                           PipelinedGemvConfig<1, 2, 2, 8, 2, 2, true>>;   // 9  m16 J2 W8 S2, persistent
constexpr int kNumConfigs = std::tuple_size_v<Configs>;
constexpr int kDefault8 = 0;
constexpr int kDefault16 = 5;
// With the LayerNorm prologue, config 5 spills (~470 bytes: the LN weight and bias fragments sit beside
// two x fragments and four weight chunks); the J2 variant spills 12 bytes.
constexpr int kDefault16Ln = 6;
// The folded LayerNorm at 3..8 rows: a persistent configuration stages x once a block for all its tiles,
// where config 0's one-tile blocks stage all of x once a tile. At eight rows c9 was the fastest on all three
// folded shapes (QKV / MLP-up / lm_head 29.9 / 37.8 / 542.6 us against c0's 41.3 / 54.7 / 779.3 and c8's
// 34.0 / 46.0 / 571.6, benchmarks/RESULTS.md run F1); at two rows c0 is within 3 % of the best and stays;
// 3..7 rows are unmeasured and take the eight-row choice.
constexpr int kDefaultFold8 = 9;

// Per-shape choices (Persimmon-8B decode shapes, as the engine calls them: no LayerNorm prologue), from the
// H200 sweep of benchmarks/bench_decode_linear.py --sweep (benchmarks/RESULTS.md, run D): config for one
// row, for 2..8 rows, for 9..16 rows. Other shapes, and the prologue and folded variants, take the defaults.
struct ShapeRule {
  int n, k;
  bool ln;
  int config1, config8, config16;
};
constexpr ShapeRule kShapeRules[] = {
    {12288, 4096, false, 0, 0, 6},   // QKV: c6 28.3 us against 34.1 at 16 rows
    {4096, 4096, false, 1, 1, 9},    // attention dense: c1 9.4 us against 10.8 at one row; c9 12.4 against 12.9 at 16
    {16384, 4096, false, 0, 0, 6},   // MLP up: c6 37.6 us against 46.2 at 16 rows
    {4096, 16384, false, 2, 1, 9},   // MLP down: c2 32.6 / c1 32.5 us against 42.6 (1 / 8 rows); c9 39.1 against 42.1 at 16
    {262144, 4096, false, 5, 0, 6},  // lm_head: c5 472 us against 497 at one row; c6 558 against 609 at 16
    // One rank of TP=2 (--sweep --tp 2): 1 and 8 rows from run H (QKV, dense and lm_head keep the defaults
    // there, within 1 %), 16 rows from run T8 (which had the persistent c9; run H did not).
    {6144, 4096, false, 0, 0, 6},    // QKV: c6 15.5 us against 17.8 at 16 rows
    {4096, 2048, false, 0, 0, 6},    // dense: c6 7.1 us against 7.7
    {8192, 4096, false, 4, 4, 9},    // MLP up: c4 16.8 / 17.6 us against 18.5 / 19.1 (1 / 8 rows); c9 21.9 against 28.2
    {4096, 8192, false, 1, 1, 9},    // MLP down: c1 16.8 / 17.4 us against 21.4 / 21.5; c9 21.0 against 30.5
    {131072, 4096, false, 0, 0, 6},  // lm_head: c6 264 us against 310 at 16 rows
};

int choose_config(int M, int N, int K, bool ln) {
  for (const ShapeRule& r : kShapeRules)
    if (r.n == N && r.k == K && r.ln == ln) return M == 1 ? r.config1 : M <= 8 ? r.config8 : r.config16;
  return M <= 8 ? kDefault8 : ln ? kDefault16Ln : kDefault16;
}

// Whether a configuration is a PipelinedGemvConfig (it has STAGES).
template <typename Cfg, typename = void>
struct IsPipelined : std::false_type {};
template <typename Cfg>
struct IsPipelined<Cfg, std::void_t<decltype(Cfg::STAGES)>> : std::true_type {};

template <typename Cfg>
std::string config_name() {
  std::string name = "m" + std::to_string(Cfg::kMaxM) + " J" + std::to_string(Cfg::J) + " W" +
                     std::to_string(Cfg::WARPS) + " RT" + std::to_string(Cfg::RT) + " B" +
                     std::to_string(Cfg::MIN_BLOCKS);
  if constexpr (IsPipelined<Cfg>::value) {
    name += " S" + std::to_string(Cfg::STAGES) + (Cfg::PERSISTENT ? " persistent" : "");
  }
  return name;
}

template <typename Cfg>
void launch(const DecodeLinearParams& p, DType dtype, bool out_fp32, cudaStream_t stream) {
  PRT_REQUIRE(p.M <= Cfg::kMaxM, "config " + config_name<Cfg>() + " takes at most " + std::to_string(Cfg::kMaxM) +
                                     " rows, got " + std::to_string(p.M));
  const int tiles = static_cast<int>(ceil_div(p.N, Cfg::kRowsPerBlock));
  const bool fold = p.ln_fold_scale != nullptr;
  const bool ln = p.ln_weight != nullptr && !fold;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto run = [&](auto kernel, int grid, size_t smem = 0) {
      if (smem > 0) {
        PRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
      launch_kernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(Cfg::kThreads), smem, stream, /*pdl=*/true, p);
    };
    // With the LayerNorm prologue a pipelined configuration runs the one-stage loop of its tile shape.
    if constexpr (IsPipelined<Cfg>::value) {
      if (!ln) {
        // One persistent wave: MIN_BLOCKS per SM, which the launch bounds leave room for, each with a tile
        // (with the folded LayerNorm, as many as the staged x leaves room for).
        const size_t smem = fold ? static_cast<size_t>(p.M) * gemv::fold_stage_stride(p.K) * sizeof(T) : 0;
        const auto kernel = fold ? (out_fp32 ? gemv::decode_linear_pipelined_kernel<T, float, Cfg, true>
                                             : gemv::decode_linear_pipelined_kernel<T, T, Cfg, true>)
                                 : (out_fp32 ? gemv::decode_linear_pipelined_kernel<T, float, Cfg>
                                             : gemv::decode_linear_pipelined_kernel<T, T, Cfg>);
        int per_sm = Cfg::MIN_BLOCKS;
        if (fold) {
          PRT_CUDA_CHECK(
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
          PRT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads, smem));
          per_sm = std::max(1, std::min(per_sm, Cfg::MIN_BLOCKS));
        }
        const int grid = Cfg::PERSISTENT ? std::min(tiles, per_sm * multiprocessors()) : tiles;
        run(kernel, grid, smem);
        return;
      }
    }
    if (fold) {
      const size_t smem = static_cast<size_t>(p.M) * gemv::fold_stage_stride(p.K) * sizeof(T);
      out_fp32 ? run(gemv::decode_linear_kernel<T, float, Cfg, false, true>, tiles, smem)
               : run(gemv::decode_linear_kernel<T, T, Cfg, false, true>, tiles, smem);
    } else if (out_fp32) {
      ln ? run(gemv::decode_linear_kernel<T, float, Cfg, true>, tiles)
         : run(gemv::decode_linear_kernel<T, float, Cfg, false>, tiles);
    } else {
      ln ? run(gemv::decode_linear_kernel<T, T, Cfg, true>, tiles) : run(gemv::decode_linear_kernel<T, T, Cfg, false>, tiles);
    }
  });
}

template <size_t... I>
void launch_config(int config, const DecodeLinearParams& p, DType dtype, bool out_fp32, cudaStream_t stream,
                   std::index_sequence<I...>) {
  ((config == static_cast<int>(I) ? launch<std::tuple_element_t<I, Configs>>(p, dtype, out_fp32, stream) : void()),
   ...);
}

template <size_t... I>
std::vector<std::string> names(std::index_sequence<I...>) {
  return {config_name<std::tuple_element_t<I, Configs>>()...};
}

}  // namespace

std::vector<std::string> decode_linear_config_names() { return names(std::make_index_sequence<kNumConfigs>{}); }

namespace {

void check_gemv_shape(const void* x, const void* weight, int64_t ldx, int M, int N, int K, int config) {
  PRT_REQUIRE(M >= 1 && M <= kDecodeLinearMaxRows, "M must be in [1, " + std::to_string(kDecodeLinearMaxRows) + "]");
  PRT_REQUIRE(N >= 1, "N must be >= 1");
  PRT_REQUIRE(K >= 8 && K % kVec == 0, "K must be a positive multiple of 8");
  PRT_REQUIRE(ldx >= K && ldx % kVec == 0, "x row stride must be >= K and a multiple of 8");
  PRT_REQUIRE(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(weight) % 16 == 0,
              "x and weight must be 16-byte aligned");
  PRT_REQUIRE(config >= -1 && config < kNumConfigs,
              "config must be -1 or in [0, " + std::to_string(kNumConfigs) + "), got " + std::to_string(config));
}

}  // namespace

void launch_decode_linear(const void* x, const void* weight, const void* bias, const void* residual, void* out,
                          const void* ln_weight, const void* ln_bias, float eps, int64_t ldx, int M, int N, int K,
                          bool relu2, DType dtype, bool out_fp32, int config, cudaStream_t stream) {
  check_gemv_shape(x, weight, ldx, M, N, K, config);
  PRT_REQUIRE(ln_bias == nullptr || ln_weight != nullptr, "ln_bias needs ln_weight");
  PRT_REQUIRE(ln_weight == nullptr || (reinterpret_cast<uintptr_t>(ln_weight) % 16 == 0 &&
                                       reinterpret_cast<uintptr_t>(ln_bias) % 16 == 0),
              "ln_weight and ln_bias must be 16-byte aligned");
  DecodeLinearParams p{x, weight, bias, residual, out, ldx, M, N, K, relu2};
  p.ln_weight = ln_weight;
  p.ln_bias = ln_bias;
  p.eps = eps;
  launch_config(config < 0 ? choose_config(M, N, K, ln_weight != nullptr) : config, p, dtype, out_fp32, stream,
                std::make_index_sequence<kNumConfigs>{});
}

void check_folded_layernorm(const void* ln_weight, const float* fold_scale, const float* fold_shift, int M, int K) {
  PRT_REQUIRE(ln_weight != nullptr && fold_scale != nullptr && fold_shift != nullptr,
              "the folded LayerNorm needs ln_weight, fold_scale and fold_shift");
  PRT_REQUIRE(reinterpret_cast<uintptr_t>(ln_weight) % 16 == 0, "ln_weight must be 16-byte aligned");
  PRT_REQUIRE(K % kFoldedLnKMultiple == 0,
              "the folded LayerNorm needs K a multiple of " + std::to_string(kFoldedLnKMultiple));
  const int64_t smem = static_cast<int64_t>(M) * gemv::fold_stage_stride(K) * 2;  // fp16 and bf16 alike
  PRT_REQUIRE(smem <= kFoldedLnMaxStageBytes, "the folded LayerNorm stages M x (K + 8) activations in shared memory: " +
                                                  std::to_string(smem) + " bytes, at most " +
                                                  std::to_string(kFoldedLnMaxStageBytes));
}

void launch_decode_linear_folded_ln(const void* x, const void* weight, const void* ln_weight, const float* fold_scale,
                                    const float* fold_shift, float unscale, const void* residual, void* out, float eps,
                                    int64_t ldx, int M, int N, int K, bool relu2, DType dtype, bool out_fp32,
                                    int config, cudaStream_t stream) {
  check_gemv_shape(x, weight, ldx, M, N, K, config);
  check_folded_layernorm(ln_weight, fold_scale, fold_shift, M, K);
  DecodeLinearParams p{x, weight, nullptr, residual, out, ldx, M, N, K, relu2};
  set_folded_layernorm(p, ln_weight, fold_scale, fold_shift, unscale, eps);
  // The LayerNorm rules of kShapeRules (there are none: at one row the default, c0, was the fastest for QKV
  // and lm_head in run U4's --sweep --fold, and within 1.2 % of c1 for MLP-up).
  const int chosen = M >= 3 && M <= 8 ? kDefaultFold8 : choose_config(M, N, K, true);
  launch_config(config < 0 ? chosen : config, p, dtype, out_fp32, stream,
                std::make_index_sequence<kNumConfigs>{});
}

}  // namespace persimmon_rt
