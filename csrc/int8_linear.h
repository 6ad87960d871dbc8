// Torch-free launchers of the int8 weight-only ops: the decode GEMV over int8 weights with per-row
// scales (out = act(scale * (x Wq^T) + bias) + residual) and the dequantization that feeds prefill's
// cuBLAS GEMMs. Semantics in persimmon_rt/reference.py (decode_linear_int8, dequantize_int8).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace persimmon_rt {

constexpr int kDecodeLinearInt8MaxRows = 16;
constexpr int kInt8KMultiple = 16;  // K of an int8 weight: whole 16-byte rows

// Names of the compiled tile configurations of the int8 GEMV (launch_decode_linear_int8's `config`).
std::vector<std::string> decode_linear_int8_config_names();

// The configuration launch_decode_linear_int8 (folded: launch_decode_linear_int8_folded_ln) picks for M rows
// of an [N, K] weight when config is -1: a PERSIMMON_RT_INT8_RULES entry, else (folded) a kFoldedShapeRules
// entry, else a kShapeRules entry, else the default (int8_linear.cu). 1 <= M <= 16.
int decode_linear_int8_config(int M, int N, int K, bool folded = false);

// Preconditions (the launcher throws std::invalid_argument if they fail): 1 <= M <= 16, K % 16 == 0,
// ldx % 8 == 0, x and weight 16-byte aligned; x, bias, residual of `dtype`; scale fp32 [N]; out of
// `dtype` or fp32 (out_fp32). x must not overlap out; residual may alias out exactly. No workspace, no
// host synchronisation: capturable. config: an index into decode_linear_int8_config_names() or -1.
void launch_decode_linear_int8(const void* x,          // [M, K]  row stride ldx
                               const int8_t* weight,   // [N, K]
                               const float* scale,     // [N]
                               const void* bias,       // [N]  or nullptr
                               const void* residual,   // [M, N]  or nullptr
                               void* out,              // [M, N]
                               int64_t ldx, int M, int N, int K, bool relu2, DType dtype, bool out_fp32, int config,
                               cudaStream_t stream);

// The int8 GEMV with the LayerNorm before it folded in, as launch_decode_linear_folded_ln (decode_linear.h)
// with W = scale * weight: out = act(unscale * rstd * (scale * (round(x * ln_weight) Wq^T) - mean * fold_scale)
// + fold_shift) + residual. Preconditions as launch_decode_linear_int8 and the folded LayerNorm's (K %
// kFoldedLnKMultiple == 0, M * (K + 8) * element size <= kFoldedLnMaxStageBytes, ln_weight 16-byte aligned).
void launch_decode_linear_int8_folded_ln(const void* x, const int8_t* weight, const float* scale, const void* ln_weight,
                                         const float* fold_scale, const float* fold_shift, float unscale,
                                         const void* residual, void* out, float eps, int64_t ldx, int M, int N, int K,
                                         bool relu2, DType dtype, bool out_fp32, int config, cudaStream_t stream);

// out[n, k] = round(weight[n, k] * scale[n]) in `dtype`; K % 16 == 0, weight and out 16-byte aligned.
void launch_dequantize_int8(const int8_t* weight, const float* scale, void* out, int64_t N, int K, DType dtype,
                            cudaStream_t stream);

}  // namespace persimmon_rt
