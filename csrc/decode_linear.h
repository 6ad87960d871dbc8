// Torch-free launcher of the decode GEMV with fused LayerNorm prologue and epilogue,
// out = act(LN(x) W^T + bias) + residual; semantics in persimmon_rt/reference.py (decode_linear).
// M = rows (decode batch), N = output features, K = input features.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

constexpr int kDecodeLinearMaxRows = 16;
// The folded LayerNorm (launch_decode_linear_folded_ln) stages x * ln_weight, M rows of K + 8 elements, in
// shared memory: at most this many bytes (16 rows of 4096; with the kernel's own up to 16 KB, within the
// per-block limit of sm_80 and sm_90 GPUs), and K a multiple of this.
constexpr int kFoldedLnMaxStageBytes = 144 * 1024;
constexpr int kFoldedLnKMultiple = 256;

// Names of the compiled tile configurations, indexed by launch_decode_linear's `config` (for sweeps:
// benchmarks/bench_decode_linear.py --sweep); each states the most rows it takes ("m8 ...", "m16 ...").
std::vector<std::string> decode_linear_config_names();

// Preconditions (checked by the caller; the launcher throws std::invalid_argument if they fail):
// 1 <= M <= kDecodeLinearMaxRows, K % 8 == 0, ldx % 8 == 0, x and weight 16-byte aligned; x, weight,
// bias, residual, ln_weight and ln_bias of `dtype`; out of `dtype`, or fp32 when out_fp32. x must not
// overlap out; residual may alias out exactly. No workspace, no host synchronisation: safe to capture
// in a CUDA graph. Launched as a programmatic dependent launch (sm_90+).
// ln_weight given: x is replaced by round(LN(x) * ln_weight + ln_bias) (statistics in fp32 over K, eps),
// as the layernorm op would have produced it. config: an index into decode_linear_config_names()
// (M must fit it), or -1 for the per-shape choice.
void launch_decode_linear(const void* x,          // [M, K]  row stride ldx elements, unit column stride
                          const void* weight,     // [N, K]  contiguous
                          const void* bias,       // [N]  or nullptr
                          const void* residual,   // [M, N]  contiguous, or nullptr
                          void* out,              // [M, N]  contiguous, written
                          const void* ln_weight,  // [K]  or nullptr (no LayerNorm prologue)
                          const void* ln_bias,    // [K]  or nullptr; only with ln_weight
                          float eps, int64_t ldx, int M, int N, int K, bool relu2, DType dtype, bool out_fp32,
                          int config, cudaStream_t stream);

// The decode GEMV with its LayerNorm folded into the weight-side constants (reference.py:
// decode_linear_folded_ln): out = act(unscale * rstd * (round(x * ln_weight) W^T - mean * fold_scale) +
// fold_shift) + residual, mean and rstd x's row statistics over K (fp32, eps). With fold_scale = W ln_weight
// and fold_shift = W ln_bias + bias (fp32) it is act(LN(x) W^T + bias) + residual, but no block waits for the
// statistics before streaming weights. Preconditions as launch_decode_linear, and K % kFoldedLnKMultiple == 0,
// M * (K + 8) * element size <= kFoldedLnMaxStageBytes; ln_weight [K] of `dtype`, 16-byte aligned; fold_scale and
// fold_shift fp32 [N].
void launch_decode_linear_folded_ln(const void* x, const void* weight, const void* ln_weight, const float* fold_scale,
                                    const float* fold_shift, float unscale, const void* residual, void* out, float eps,
                                    int64_t ldx, int M, int N, int K, bool relu2, DType dtype, bool out_fp32,
                                    int config, cudaStream_t stream);

// The folded LayerNorm's own preconditions (above), shared with the int8 GEMV's folded instance; throws
// std::invalid_argument naming the one that fails.
void check_folded_layernorm(const void* ln_weight, const float* fold_scale, const float* fold_shift, int M, int K);

// The folded LayerNorm's arguments into a GEMV's params (the fp16 / bf16 or the int8 kernel's: the same fields).
template <typename Params>
void set_folded_layernorm(Params& p, const void* ln_weight, const float* fold_scale, const float* fold_shift,
                          float unscale, float eps) {
  p.ln_weight = ln_weight;
  p.ln_fold_scale = fold_scale;
  p.ln_fold_shift = fold_shift;
  p.ln_fold_unscale = unscale;
  p.eps = eps;
}

}  // namespace persimmon_rt
