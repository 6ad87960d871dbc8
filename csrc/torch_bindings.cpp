// The only C++ file that includes torch: schemas of torch.ops.persimmon_rt.*, argument checks whose
// messages name the tensor and the expected shape (run before any launch), and CUDA impls that
// forward to the torch-free launchers on the current stream. Every op writes into outputs it is given
// and returns nothing, so the Meta impls (torch.compile, fake tensors, opcheck) are no-ops.
// Semantics of every op: persimmon_rt/reference.py.

#include <Python.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "all_reduce.h"
#include "attention.h"
#include "bias_relu2.h"
#include "decode_linear.h"
#include "greedy_advance.h"
#include "int8_linear.h"
#include "layernorm.h"
#include "qk_norm_rope_cache.h"
#include "sample_sorted.h"

namespace persimmon_rt {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- checks -------------------------------------------------------------------------------------------

constexpr int64_t kAny = -1;

std::string dims_str(const std::vector<int64_t>& dims) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << (dims[i] == kAny ? std::string("*") : std::to_string(dims[i]));
  s << "]";
  return s.str();
}

// `symbols` names the dims (e.g. "[T, H, 3, D]"); kAny in `dims` matches any size.
void check_shape(const char* op, const Tensor& t, const char* name, const char* symbols, std::vector<int64_t> dims) {
  bool ok = t.dim() == static_cast<int64_t>(dims.size());
  for (size_t i = 0; ok && i < dims.size(); ++i) ok = dims[i] == kAny || t.size(i) == dims[i];
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", symbols, " = ", dims_str(dims), ", got ", t.sizes());
}

void check_dtype(const char* op, const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_index_dtype(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

void check_contiguous(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

DType activation_dtype(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float16 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kHalf ? DType::kHalf : DType::kBFloat16;
}

// One tensor argument of an op in its table of per-tensor checks (check_args): everything but the shape.
enum Need : unsigned {
  kNone = 0,
  kContiguous = 1,  // the kernel indexes it as a dense array
  kAligned16 = 2,   // the kernel reads or writes it with 16-byte vector accesses
};

struct Arg {
  const char* name;
  const Tensor* tensor;                 // nullptr: an optional argument that was not given (skipped)
  std::optional<at::ScalarType> dtype;  // required dtype; nullopt where the op checks it itself
  unsigned need;                        // Need flags
};

Arg arg(const char* name, const Tensor& t, std::optional<at::ScalarType> dtype, unsigned need) {
  return {name, &t, dtype, need};
}

Arg arg(const char* name, const OptTensor& t, std::optional<at::ScalarType> dtype, unsigned need) {
  return {name, t.has_value() ? &*t : nullptr, dtype, need};
}

// Every given argument: its dtype, layout, device (that of `ref`, the op's first input) and alignment.
void check_args(const char* op, const Tensor& ref, std::initializer_list<Arg> args) {
  for (const Arg& a : args) {
    if (a.tensor == nullptr) continue;
    const Tensor& t = *a.tensor;
    if (a.dtype.has_value()) check_dtype(op, t, a.name, *a.dtype);
    if (a.need & kContiguous) check_contiguous(op, t, a.name);
    TORCH_CHECK(t.device() == ref.device(), op, ": ", a.name, " must be on ", ref.device(), ", got ", t.device());
    TORCH_CHECK(!(a.need & kAligned16) || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", a.name,
                " must start 16-byte aligned (a view at an odd offset? pass a contiguous copy)");
  }
}

const void* opt_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void meta_noop(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  torch::jit::drop(*stack, op.schema().arguments().size());
}

// ---- qk_norm_rope_cache -------------------------------------------------------------------------------

constexpr const char* kQk = "qk_norm_rope_cache";

void check_qk_norm_rope_cache(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq,
                              const OptTensor& q_weight, const OptTensor& q_bias, const OptTensor& k_weight,
                              const OptTensor& k_bias, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& slot_mapping, const Tensor& q_out) {
  TORCH_CHECK(qkv.dim() == 4, kQk, ": qkv must have shape [T, H, 3, D], got ", qkv.sizes());
  const int64_t T = qkv.size(0), H = qkv.size(1), D = qkv.size(3);
  check_shape(kQk, qkv, "qkv", "[T, H, 3, D]", {T, H, 3, D});
  const at::ScalarType dt = qkv.scalar_type();
  activation_dtype(kQk, qkv, "qkv");
  TORCH_CHECK(D % 8 == 0 && D >= 8 && D <= 256, kQk, ": head_dim D must be a multiple of 8 in [8, 256], got ", D);
  TORCH_CHECK(H >= 1, kQk, ": qkv needs at least one head");
  TORCH_CHECK(qkv.stride(3) == 1 && qkv.stride(0) % 8 == 0 && qkv.stride(1) % 8 == 0 && qkv.stride(2) % 8 == 0, kQk,
              ": qkv must have a unit last stride and other strides that are multiples of 8, got ", qkv.strides());
  check_shape(kQk, positions, "positions", "[T]", {T});
  check_index_dtype(kQk, positions, "positions");
  TORCH_CHECK(inv_freq.dim() == 1 && 2 * inv_freq.size(0) <= D, kQk,
              ": inv_freq must have shape [R/2] with rotary dims R <= D = ", D, ", got ", inv_freq.sizes());
  for (const auto& [t, name] : {std::pair<const OptTensor*, const char*>{&q_weight, "q_weight"}, {&q_bias, "q_bias"},
                                {&k_weight, "k_weight"}, {&k_bias, "k_bias"}})
    if (t->has_value()) check_shape(kQk, **t, name, "[D]", {D});
  TORCH_CHECK(k_cache.dim() == 4, kQk, ": k_cache must have shape [B, S, H, D], got ", k_cache.sizes());
  check_shape(kQk, k_cache, "k_cache", "[B, S, H, D]", {kAny, kAny, H, D});
  check_shape(kQk, v_cache, "v_cache", "[B, S, H, D] (as k_cache)", k_cache.sizes().vec());
  check_shape(kQk, slot_mapping, "slot_mapping", "[T]", {T});
  check_index_dtype(kQk, slot_mapping, "slot_mapping");
  check_shape(kQk, q_out, "q_out", "[T, H, D]", {T, H, D});
  check_args(kQk, qkv,
             {arg("qkv", qkv, dt, kAligned16), arg("positions", positions, std::nullopt, kContiguous),
              arg("inv_freq", inv_freq, at::kFloat, kContiguous),
              arg("q_weight", q_weight, dt, kContiguous | kAligned16), arg("q_bias", q_bias, dt, kContiguous | kAligned16),
              arg("k_weight", k_weight, dt, kContiguous | kAligned16), arg("k_bias", k_bias, dt, kContiguous | kAligned16),
              arg("k_cache", k_cache, dt, kContiguous | kAligned16), arg("v_cache", v_cache, dt, kContiguous | kAligned16),
              arg("slot_mapping", slot_mapping, std::nullopt, kContiguous),
              arg("q_out", q_out, dt, kContiguous | kAligned16)});
}

void qk_norm_rope_cache_cuda(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq,
                             const OptTensor& q_weight, const OptTensor& q_bias, const OptTensor& k_weight,
                             const OptTensor& k_bias, Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping,
                             Tensor& q_out, double eps) {
  check_qk_norm_rope_cache(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, k_cache, v_cache,
                           slot_mapping, q_out);
  const c10::cuda::CUDAGuard guard(qkv.device());
  launch_qk_norm_rope_cache(qkv.data_ptr(), positions.data_ptr(), inv_freq.data_ptr<float>(), opt_ptr(q_weight),
                            opt_ptr(q_bias), opt_ptr(k_weight), opt_ptr(k_bias), k_cache.data_ptr(),
                            v_cache.data_ptr(), slot_mapping.data_ptr(), q_out.data_ptr(), qkv.size(0),
                            static_cast<int>(qkv.size(1)), static_cast<int>(qkv.size(3)),
                            static_cast<int>(2 * inv_freq.size(0)), k_cache.size(0) * k_cache.size(1), qkv.stride(0),
                            qkv.stride(1), qkv.stride(2), positions.scalar_type() == at::kLong,
                            slot_mapping.scalar_type() == at::kLong, static_cast<float>(eps),
                            activation_dtype(kQk, qkv, "qkv"), current_stream());
}

// ---- layernorm ----------------------------------------------------------------------------------------

constexpr const char* kLn = "layernorm";

void check_layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& out,
                     const OptTensor& residual, const OptTensor& residual_out) {
  TORCH_CHECK(x.dim() >= 1, kLn, ": x must have shape [..., C], got a scalar");
  const int64_t C = x.size(-1);
  const at::ScalarType dt = x.scalar_type();
  activation_dtype(kLn, x, "x");
  TORCH_CHECK(C % 8 == 0 && C >= 8 && C <= kLayerNormMaxHidden, kLn,
              ": hidden size C must be a multiple of 8 in [8, ", kLayerNormMaxHidden, "], got ", C);
  check_shape(kLn, weight, "weight", "[C]", {C});
  check_shape(kLn, bias, "bias", "[C]", {C});
  check_shape(kLn, out, "out", "[..., C] (as x)", x.sizes().vec());
  TORCH_CHECK(residual.has_value() == residual_out.has_value(), kLn,
              ": residual and residual_out must be given together");
  if (residual.has_value()) {
    check_shape(kLn, *residual, "residual", "[..., C] (as x)", x.sizes().vec());
    check_shape(kLn, *residual_out, "residual_out", "[..., C] (as x)", x.sizes().vec());
  }
  constexpr unsigned kVector = kContiguous | kAligned16;
  check_args(kLn, x,
             {arg("x", x, dt, kVector), arg("weight", weight, dt, kVector), arg("bias", bias, dt, kVector),
              arg("out", out, dt, kVector), arg("residual", residual, dt, kVector),
              arg("residual_out", residual_out, dt, kVector)});
}

void layernorm_cuda(const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& out, double eps,
                    const OptTensor& residual, const OptTensor& residual_out) {
  check_layernorm(x, weight, bias, out, residual, residual_out);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(-1);
  launch_layernorm(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), opt_ptr(residual),
                   residual_out.has_value() ? residual_out->data_ptr() : nullptr, x.numel() / C,
                   static_cast<int>(C), static_cast<float>(eps), activation_dtype(kLn, x, "x"), current_stream());
}

// ---- all_reduce_layernorm -----------------------------------------------------------------------------

constexpr const char* kAr = "all_reduce_layernorm";

void check_all_reduce_layernorm(const Tensor& partial, const Tensor& buffers, const Tensor& epochs, int64_t rank,
                                const Tensor& weight, const Tensor& bias, const Tensor& out, const Tensor& residual,
                                const Tensor& residual_out) {
  TORCH_CHECK(partial.dim() == 2, kAr, ": partial must have shape [N, C], got ", partial.sizes());
  const int64_t N = partial.size(0), C = partial.size(1);
  const at::ScalarType dt = partial.scalar_type();
  activation_dtype(kAr, partial, "partial");
  TORCH_CHECK(N >= 1 && N <= kAllReduceMaxRowsHost, kAr, ": partial must have 1 to ", kAllReduceMaxRowsHost,
              " rows, got ", N);
  TORCH_CHECK(C % 8 == 0 && C >= 8 && C <= kLayerNormMaxHidden, kAr,
              ": hidden size C must be a multiple of 8 in [8, ", kLayerNormMaxHidden, "], got ", C);
  TORCH_CHECK(buffers.dim() == 1 && buffers.size(0) >= 1 && buffers.size(0) <= kAllReduceMaxRanksHost, kAr,
              ": buffers must have shape [W] with 1 <= W <= ", kAllReduceMaxRanksHost, ", got ", buffers.sizes());
  TORCH_CHECK(rank >= 0 && rank < buffers.size(0), kAr, ": rank must be in [0, ", buffers.size(0), "), got ", rank);
  check_shape(kAr, epochs, "epochs", "[64]", {kAllReduceMaxRowsHost});
  check_shape(kAr, weight, "weight", "[C]", {C});
  check_shape(kAr, bias, "bias", "[C]", {C});
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&out, "out"}, {&residual, "residual"},
                                {&residual_out, "residual_out"}})
    check_shape(kAr, *t, name, "[N, C] (as partial)", {N, C});
  constexpr unsigned kVector = kContiguous | kAligned16;
  check_args(kAr, partial,
             {arg("partial", partial, dt, kVector), arg("buffers", buffers, at::kLong, kContiguous),
              arg("epochs", epochs, at::kInt, kContiguous), arg("weight", weight, dt, kVector),
              arg("bias", bias, dt, kVector), arg("out", out, dt, kVector), arg("residual", residual, dt, kVector),
              arg("residual_out", residual_out, dt, kVector)});
}

void all_reduce_layernorm_cuda(const Tensor& partial, const Tensor& buffers, Tensor& epochs, int64_t rank,
                               const Tensor& weight, const Tensor& bias, Tensor& out, double eps,
                               const Tensor& residual, Tensor& residual_out, double timeout_s, bool lamport) {
  check_all_reduce_layernorm(partial, buffers, epochs, rank, weight, bias, out, residual, residual_out);
  TORCH_CHECK(timeout_s > 0, kAr, ": timeout_s must be positive, got ", timeout_s);
  const c10::cuda::CUDAGuard guard(partial.device());
  launch_all_reduce_layernorm(partial.data_ptr(), static_cast<void* const*>(buffers.data_ptr()),
                              static_cast<uint32_t*>(epochs.data_ptr()), weight.data_ptr(), bias.data_ptr(),
                              out.data_ptr(), residual.data_ptr(), residual_out.data_ptr(), static_cast<int>(rank),
                              static_cast<int>(buffers.size(0)), partial.size(0), static_cast<int>(partial.size(1)),
                              static_cast<float>(eps), timeout_s, lamport, activation_dtype(kAr, partial, "partial"),
                              current_stream());
}

// ---- bias_relu2 ---------------------------------------------------------------------------------------

constexpr const char* kBr = "bias_relu2";

void check_bias_relu2(const Tensor& x, const Tensor& bias, const Tensor& out) {
  TORCH_CHECK(x.dim() >= 1, kBr, ": x must have shape [..., F], got a scalar");
  const int64_t F = x.size(-1);
  activation_dtype(kBr, x, "x");
  TORCH_CHECK(F % 8 == 0 && F >= 8, kBr, ": features F must be a positive multiple of 8, got ", F);
  check_shape(kBr, bias, "bias", "[F]", {F});
  check_shape(kBr, out, "out", "[..., F] (as x)", x.sizes().vec());
  constexpr unsigned kVector = kContiguous | kAligned16;
  check_args(kBr, x,
             {arg("x", x, x.scalar_type(), kVector), arg("bias", bias, x.scalar_type(), kVector),
              arg("out", out, x.scalar_type(), kVector)});
}

void bias_relu2_cuda(const Tensor& x, const Tensor& bias, Tensor& out) {
  check_bias_relu2(x, bias, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t F = x.size(-1);
  launch_bias_relu2(x.data_ptr(), bias.data_ptr(), out.data_ptr(), x.numel() / F, F, activation_dtype(kBr, x, "x"),
                    current_stream());
}

// ---- decode_linear ------------------------------------------------------------------------------------

constexpr const char* kDl = "decode_linear";

// Byte range [first, last) that a tensor's elements span.
std::pair<uintptr_t, uintptr_t> byte_span(const Tensor& t) {
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

bool overlap(const Tensor& a, const Tensor& b) {
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  return a0 < b1 && b0 < a1;
}

void check_decode_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& residual,
                         const Tensor& out, const OptTensor& ln_weight, const OptTensor& ln_bias,
                         const char* op = kDl) {
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape [N, K], got ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::ScalarType dt = x.scalar_type();
  activation_dtype(op, x, "x");
  TORCH_CHECK(M >= 1 && M <= kDecodeLinearMaxRows, op, ": x must have 1 to ", kDecodeLinearMaxRows,
              " rows (M, the decode batch), got ", M);
  TORCH_CHECK(K >= 8 && K % 8 == 0 && K <= INT32_MAX, op, ": K must be a positive multiple of 8, got ", K);
  TORCH_CHECK(N >= 1 && N <= INT32_MAX, op, ": weight must have 1 to 2^31 - 1 rows (N), got ", N);
  // Rows are read with 16-byte loads: unit column stride, row stride a multiple of 8 elements.
  TORCH_CHECK(x.stride(1) == 1 && (M == 1 || (x.stride(0) % 8 == 0 && x.stride(0) >= K)), op,
              ": x must have a unit column stride and a row stride >= K that is a multiple of 8, got strides ",
              x.strides());
  check_shape(op, weight, "weight", "[N, K] (K as x)", {N, K});
  if (bias.has_value()) check_shape(op, *bias, "bias", "[N]", {N});
  if (residual.has_value()) check_shape(op, *residual, "residual", "[M, N]", {M, N});
  check_shape(op, out, "out", "[M, N]", {M, N});
  TORCH_CHECK(ln_weight.has_value() || !ln_bias.has_value(), op, ": ln_bias needs ln_weight (the LayerNorm prologue)");
  if (ln_weight.has_value()) check_shape(op, *ln_weight, "ln_weight", "[K]", {K});
  if (ln_bias.has_value()) check_shape(op, *ln_bias, "ln_bias", "[K]", {K});
  TORCH_CHECK(out.scalar_type() == dt || out.scalar_type() == at::kFloat, op, ": out must be ", dt,
              " (as x) or float32, got ", out.scalar_type());
  check_args(op, x,
             {arg("x", x, dt, kAligned16), arg("weight", weight, dt, kContiguous | kAligned16),
              arg("bias", bias, dt, kContiguous), arg("residual", residual, dt, kContiguous),
              arg("out", out, std::nullopt, kContiguous), arg("ln_weight", ln_weight, dt, kContiguous | kAligned16),
              arg("ln_bias", ln_bias, dt, kContiguous | kAligned16)});
  // Each output element is read from residual and written by the same thread: exact aliasing is fine.
  TORCH_CHECK(!residual.has_value() || residual->data_ptr() == out.data_ptr() || !overlap(*residual, out), op,
              ": residual must be out itself or not overlap it");
  // Blocks write out while others still read x.
  TORCH_CHECK(!overlap(x, out), op, ": x must not overlap out");
}

// A GEMV's `config` argument: -1 (the per-shape choice) or an index into its compiled configurations.
void check_config(const char* op, int64_t config, size_t num_configs) {
  TORCH_CHECK(config >= -1 && config < static_cast<int64_t>(num_configs), op,
              ": config must be -1 (per-shape choice) or in [0, ", num_configs, "), got ", config);
}

// The folded LayerNorm's per-weight constants (folded_layernorm.py): fp32 [N] scale and shift, and the
// power-of-two unscale of its LayerNorm weight.
void check_fold_constants(const char* op, const Tensor& x, const Tensor& fold_scale, const Tensor& fold_shift,
                          int64_t N, double unscale) {
  check_shape(op, fold_scale, "fold_scale", "[N]", {N});
  check_shape(op, fold_shift, "fold_shift", "[N]", {N});
  check_args(op, x, {arg("fold_scale", fold_scale, at::kFloat, kContiguous),
                     arg("fold_shift", fold_shift, at::kFloat, kContiguous)});
  TORCH_CHECK(std::isfinite(unscale) && unscale > 0, op, ": unscale must be positive and finite, got ", unscale);
}

void decode_linear_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& residual,
                        Tensor& out, bool relu2, const OptTensor& ln_weight, const OptTensor& ln_bias, double eps,
                        int64_t config) {
  check_decode_linear(x, weight, bias, residual, out, ln_weight, ln_bias);
  check_config(kDl, config, decode_linear_config_names().size());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  launch_decode_linear(x.data_ptr(), weight.data_ptr(), opt_ptr(bias), opt_ptr(residual), out.data_ptr(),
                       opt_ptr(ln_weight), opt_ptr(ln_bias), static_cast<float>(eps), M == 1 ? K : x.stride(0),
                       static_cast<int>(M), static_cast<int>(weight.size(0)), static_cast<int>(K), relu2,
                       activation_dtype(kDl, x, "x"), out.scalar_type() == at::kFloat, static_cast<int>(config),
                       current_stream());
}

constexpr const char* kDlf = "decode_linear_folded_ln";

void decode_linear_folded_ln_cuda(const Tensor& x, const Tensor& weight, const Tensor& ln_weight,
                                  const Tensor& fold_scale, const Tensor& fold_shift, const OptTensor& residual,
                                  Tensor& out, bool relu2, double eps, double unscale, int64_t config) {
  check_decode_linear(x, weight, std::nullopt, residual, out, ln_weight, std::nullopt, kDlf);
  const int64_t N = weight.size(0);
  check_fold_constants(kDlf, x, fold_scale, fold_shift, N, unscale);
  check_config(kDlf, config, decode_linear_config_names().size());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  launch_decode_linear_folded_ln(x.data_ptr(), weight.data_ptr(), ln_weight.data_ptr(), fold_scale.data_ptr<float>(),
                                 fold_shift.data_ptr<float>(), static_cast<float>(unscale), opt_ptr(residual),
                                 out.data_ptr(), static_cast<float>(eps), M == 1 ? K : x.stride(0),
                                 static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), relu2,
                                 activation_dtype(kDlf, x, "x"), out.scalar_type() == at::kFloat,
                                 static_cast<int>(config), current_stream());
}

// ---- int8 weight-only: decode_linear_int8, dequantize_int8 --------------------------------------------

constexpr const char* kDq = "decode_linear_int8";
constexpr const char* kDeq = "dequantize_int8";

void check_int8_weight(const char* op, const Tensor& weight, const Tensor& scale) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape [N, K], got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N >= 1 && N <= INT32_MAX, op, ": weight must have 1 to 2^31 - 1 rows (N), got ", N);
  TORCH_CHECK(K >= kInt8KMultiple && K % kInt8KMultiple == 0 && K <= INT32_MAX, op,
              ": K must be a positive multiple of ", kInt8KMultiple, " (whole 16-byte int8 rows), got ", K);
  check_shape(op, scale, "scale", "[N]", {N});
}

void check_decode_linear_int8(const Tensor& x, const Tensor& weight, const Tensor& scale, const OptTensor& bias,
                              const OptTensor& residual, const Tensor& out, const char* op = kDq) {
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [M, K], got ", x.sizes());
  check_int8_weight(op, weight, scale);
  const int64_t M = x.size(0), K = weight.size(1), N = weight.size(0);
  const at::ScalarType dt = x.scalar_type();
  activation_dtype(op, x, "x");
  TORCH_CHECK(M >= 1 && M <= kDecodeLinearInt8MaxRows, op, ": x must have 1 to ", kDecodeLinearInt8MaxRows,
              " rows (M, the decode batch), got ", M);
  check_shape(op, x, "x", "[M, K] (K as weight)", {M, K});
  TORCH_CHECK(x.stride(1) == 1 && (M == 1 || (x.stride(0) % 8 == 0 && x.stride(0) >= K)), op,
              ": x must have a unit column stride and a row stride >= K that is a multiple of 8, got strides ",
              x.strides());
  if (bias.has_value()) check_shape(op, *bias, "bias", "[N]", {N});
  if (residual.has_value()) check_shape(op, *residual, "residual", "[M, N]", {M, N});
  check_shape(op, out, "out", "[M, N]", {M, N});
  TORCH_CHECK(out.scalar_type() == dt || out.scalar_type() == at::kFloat, op, ": out must be ", dt,
              " (as x) or float32, got ", out.scalar_type());
  check_args(op, x,
             {arg("x", x, dt, kAligned16), arg("weight", weight, at::kChar, kContiguous | kAligned16),
              arg("scale", scale, at::kFloat, kContiguous), arg("bias", bias, dt, kContiguous),
              arg("residual", residual, dt, kContiguous), arg("out", out, std::nullopt, kContiguous)});
  TORCH_CHECK(!residual.has_value() || residual->data_ptr() == out.data_ptr() || !overlap(*residual, out), op,
              ": residual must be out itself or not overlap it");
  TORCH_CHECK(!overlap(x, out), op, ": x must not overlap out");
}

void decode_linear_int8_cuda(const Tensor& x, const Tensor& weight, const Tensor& scale, const OptTensor& bias,
                             const OptTensor& residual, Tensor& out, bool relu2, int64_t config) {
  check_decode_linear_int8(x, weight, scale, bias, residual, out);
  check_config(kDq, config, decode_linear_int8_config_names().size());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  launch_decode_linear_int8(x.data_ptr(), weight.data_ptr<int8_t>(), scale.data_ptr<float>(), opt_ptr(bias),
                            opt_ptr(residual), out.data_ptr(), M == 1 ? K : x.stride(0), static_cast<int>(M),
                            static_cast<int>(weight.size(0)), static_cast<int>(K), relu2,
                            activation_dtype(kDq, x, "x"), out.scalar_type() == at::kFloat, static_cast<int>(config),
                            current_stream());
}

constexpr const char* kDqf = "decode_linear_int8_folded_ln";

void decode_linear_int8_folded_ln_cuda(const Tensor& x, const Tensor& weight, const Tensor& scale,
                                       const Tensor& ln_weight, const Tensor& fold_scale, const Tensor& fold_shift,
                                       const OptTensor& residual, Tensor& out, bool relu2, double eps, double unscale,
                                       int64_t config) {
  check_decode_linear_int8(x, weight, scale, std::nullopt, residual, out, kDqf);
  const int64_t N = weight.size(0), K = weight.size(1);
  check_shape(kDqf, ln_weight, "ln_weight", "[K]", {K});
  check_args(kDqf, x, {arg("ln_weight", ln_weight, x.scalar_type(), kContiguous | kAligned16)});
  check_fold_constants(kDqf, x, fold_scale, fold_shift, N, unscale);
  check_config(kDqf, config, decode_linear_int8_config_names().size());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  launch_decode_linear_int8_folded_ln(x.data_ptr(), weight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                                      ln_weight.data_ptr(), fold_scale.data_ptr<float>(), fold_shift.data_ptr<float>(),
                                      static_cast<float>(unscale), opt_ptr(residual), out.data_ptr(),
                                      static_cast<float>(eps), M == 1 ? K : x.stride(0), static_cast<int>(M),
                                      static_cast<int>(N), static_cast<int>(K), relu2, activation_dtype(kDqf, x, "x"),
                                      out.scalar_type() == at::kFloat, static_cast<int>(config), current_stream());
}

void dequantize_int8_cuda(const Tensor& weight, const Tensor& scale, Tensor& out) {
  check_int8_weight(kDeq, weight, scale);
  check_shape(kDeq, out, "out", "[N, K] (as weight)", weight.sizes().vec());
  const at::ScalarType dt = out.scalar_type();
  const DType dtype = activation_dtype(kDeq, out, "out");
  check_args(kDeq, weight,
             {arg("weight", weight, at::kChar, kContiguous | kAligned16), arg("scale", scale, at::kFloat, kContiguous),
              arg("out", out, dt, kContiguous | kAligned16)});
  const c10::cuda::CUDAGuard guard(weight.device());
  launch_dequantize_int8(weight.data_ptr<int8_t>(), scale.data_ptr<float>(), out.data_ptr(), weight.size(0),
                         static_cast<int>(weight.size(1)), dtype, current_stream());
}

// ---- greedy_advance: the greedy decode step's tail -------------------------------------------------------

constexpr const char* kGa = "greedy_advance";

// The sampling ops' fp32 logits [B, V] (one block row a logits row, int32 indices): (B, V).
std::pair<int64_t, int64_t> check_logits(const char* op, const Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape [B, V], got ", logits.sizes());
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1 && V < INT32_MAX, op, ": the vocabulary V must be in [1, 2^31 - 1), got ", V);
  TORCH_CHECK(B <= 65535, op, ": at most 65535 rows, got ", B);
  return {B, V};
}

void greedy_advance_cuda(const Tensor& logits, Tensor& tokens, Tensor& positions, Tensor& slots, Tensor& seq_lens,
                         const Tensor& active) {
  const auto [B, V] = check_logits(kGa, logits);
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&tokens, "tokens"}, {&positions, "positions"},
                                {&slots, "slots"}, {&seq_lens, "seq_lens"}, {&active, "active"}})
    check_shape(kGa, *t, name, "[B]", {B});
  check_args(kGa, logits, {arg("logits", logits, at::kFloat, kContiguous), arg("tokens", tokens, at::kLong, kContiguous),
                           arg("positions", positions, at::kLong, kContiguous), arg("slots", slots, at::kLong, kContiguous),
                           arg("seq_lens", seq_lens, at::kInt, kContiguous), arg("active", active, at::kInt, kContiguous)});
  const c10::cuda::CUDAGuard guard(logits.device());
  const size_t ws_bytes = greedy_advance_workspace_bytes(B, V);
  const Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  launch_greedy_advance(logits.data_ptr<float>(), tokens.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
                        slots.data_ptr<int64_t>(), seq_lens.data_ptr<int32_t>(), active.data_ptr<int32_t>(),
                        ws_bytes ? workspace.data_ptr() : nullptr, B, V, current_stream());
}

// ---- sample_sorted: the sampler's tail after torch.sort ----------------------------------------------------

constexpr const char* kSs = "sample_sorted";

// A per-row parameter: [B] or [B, 1].
void check_row_parameter(const Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK((t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1)) && t.size(0) == B, kSs, ": ", name,
              " must have shape [B] or [B, 1] with B = ", B, ", got ", t.sizes());
}

void sample_sorted_cuda(const Tensor& logits, const Tensor& sorted_logits, const Tensor& order, const Tensor& noise,
                        const Tensor& temperature, const Tensor& top_k, const Tensor& top_p, Tensor& tokens) {
  const auto [B, V] = check_logits(kSs, logits);
  check_shape(kSs, sorted_logits, "sorted_logits", "[B, V]", {B, V});
  check_shape(kSs, order, "order", "[B, V]", {B, V});
  check_shape(kSs, noise, "noise", "[B, V]", {B, V});
  check_row_parameter(temperature, "temperature", B);
  check_row_parameter(top_p, "top_p", B);
  check_shape(kSs, top_k, "top_k", "[B]", {B});
  check_shape(kSs, tokens, "tokens", "[B]", {B});
  check_args(kSs, logits,
             {arg("logits", logits, at::kFloat, kContiguous), arg("sorted_logits", sorted_logits, at::kFloat, kContiguous),
              arg("order", order, at::kLong, kContiguous), arg("noise", noise, at::kFloat, kContiguous),
              arg("temperature", temperature, at::kFloat, kContiguous), arg("top_k", top_k, at::kLong, kContiguous),
              arg("top_p", top_p, at::kFloat, kContiguous), arg("tokens", tokens, at::kLong, kContiguous)});
  const c10::cuda::CUDAGuard guard(logits.device());
  const size_t ws_bytes = sample_sorted_workspace_bytes(B, V);
  const Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  launch_sample_sorted(logits.data_ptr<float>(), sorted_logits.data_ptr<float>(), order.data_ptr<int64_t>(),
                       noise.data_ptr<float>(), temperature.data_ptr<float>(), top_k.data_ptr<int64_t>(),
                       top_p.data_ptr<float>(), tokens.data_ptr<int64_t>(), ws_bytes ? workspace.data_ptr() : nullptr,
                       B, V, current_stream());
}

// ---- attention ops ------------------------------------------------------------------------------------
// Launchers and their preconditions: csrc/attention.h. These checks cover the layout the launchers
// assume (contiguous, [.., H, D] matching the cache); the launchers reject head dims they lack kernels for.

constexpr const char* kAp = "attention_prefill";
constexpr const char* kAd = "attention_decode";

void check_attention_cache(const char* op, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache) {
  activation_dtype(op, q, "q");
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must have shape [B, S, H, D], got ", k_cache.sizes());
  check_shape(op, k_cache, "k_cache", "[B, S, H, D] (H, D as q)", {kAny, kAny, q.size(1), q.size(2)});
  check_shape(op, v_cache, "v_cache", "[B, S, H, D] (as k_cache)", k_cache.sizes().vec());
  const int64_t D = q.size(2);
  TORCH_CHECK(attention_supports_head_dim(static_cast<int>(D)), op, ": head_dim D must be one of ",
              c10::ArrayRef<int>(kAttentionHeadDims), " (the kernels' tile shapes), got ", D);
}

void check_attention_prefill(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                             const Tensor& cu_seqlens_q, const Tensor& seq_lens, const Tensor& out) {
  TORCH_CHECK(q.dim() == 3, kAp, ": q must have shape [T, H, D], got ", q.sizes());
  check_attention_cache(kAp, q, k_cache, v_cache);
  const int64_t B = k_cache.size(0);
  check_shape(kAp, cu_seqlens_q, "cu_seqlens_q", "[B + 1]", {B + 1});
  check_shape(kAp, seq_lens, "seq_lens", "[B]", {B});
  check_shape(kAp, out, "out", "[T, H, D] (as q)", q.sizes().vec());
  const at::ScalarType dt = q.scalar_type();
  constexpr unsigned kVector = kContiguous | kAligned16;
  check_args(kAp, q,
             {arg("q", q, dt, kVector), arg("k_cache", k_cache, dt, kVector), arg("v_cache", v_cache, dt, kVector),
              arg("cu_seqlens_q", cu_seqlens_q, at::kInt, kContiguous), arg("seq_lens", seq_lens, at::kInt, kContiguous),
              arg("out", out, dt, kVector)});
}

void check_attention_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& seq_lens,
                            const Tensor& out) {
  TORCH_CHECK(q.dim() == 3, kAd, ": q must have shape [B, H, D], got ", q.sizes());
  check_attention_cache(kAd, q, k_cache, v_cache);
  check_shape(kAd, k_cache, "k_cache", "[B, S, H, D] (B as q)", {q.size(0), kAny, q.size(1), q.size(2)});
  check_shape(kAd, seq_lens, "seq_lens", "[B]", {q.size(0)});
  check_shape(kAd, out, "out", "[B, H, D] (as q)", q.sizes().vec());
  const at::ScalarType dt = q.scalar_type();
  constexpr unsigned kVector = kContiguous | kAligned16;
  check_args(kAd, q,
             {arg("q", q, dt, kVector), arg("k_cache", k_cache, dt, kVector), arg("v_cache", v_cache, dt, kVector),
              arg("seq_lens", seq_lens, at::kInt, kContiguous), arg("out", out, dt, kVector)});
}

void attention_prefill_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cu_seqlens_q,
                            const Tensor& seq_lens, int64_t max_seqlen_q, Tensor& out, double scale) {
  check_attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, out);
  TORCH_CHECK(max_seqlen_q >= 0, kAp, ": max_seqlen_q must be >= the longest sequence's new tokens, got ",
              max_seqlen_q);
  const c10::cuda::CUDAGuard guard(q.device());
  // The caller's max_seqlen_q sizes the grid (reading cu_seqlens_q here would sync with the device);
  // T bounds it for free.
  const int T = static_cast<int>(q.size(0));
  const int max_q_len = static_cast<int>(max_seqlen_q < T ? max_seqlen_q : T);
  launch_attention_prefill(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cu_seqlens_q.data_ptr<int32_t>(),
                           seq_lens.data_ptr<int32_t>(), out.data_ptr(), T, static_cast<int>(k_cache.size(0)), max_q_len,
                           static_cast<int>(k_cache.size(1)),
                           static_cast<int>(q.size(1)), static_cast<int>(q.size(2)), static_cast<float>(scale),
                           activation_dtype(kAp, q, "q"), current_stream());
}

void attention_decode_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& seq_lens,
                           Tensor& out, double scale) {
  check_attention_decode(q, k_cache, v_cache, seq_lens, out);
  const c10::cuda::CUDAGuard guard(q.device());
  const int B = static_cast<int>(q.size(0)), S = static_cast<int>(k_cache.size(1)), H = static_cast<int>(q.size(1)),
            D = static_cast<int>(q.size(2));
  // Scratch from torch's caching allocator on the current stream: under CUDA-graph capture it comes
  // from the graph's private pool, so replays reuse it without allocating.
  const size_t ws_bytes = attention_decode_workspace_bytes(B, S, H, D);
  const Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  launch_attention_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), seq_lens.data_ptr<int32_t>(),
                          out.data_ptr(), ws_bytes ? workspace.data_ptr() : nullptr, B, S, H, D,
                          static_cast<float>(scale), activation_dtype(kAd, q, "q"), current_stream());
}

// ---- qkv_attention_decode -----------------------------------------------------------------------------
// qk_norm_rope_cache's arguments for one token per sequence (q_out dropped), then attention_decode's.

constexpr const char* kQad = "qkv_attention_decode";

void check_qkv_attention_decode(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq,
                                const OptTensor& q_weight, const OptTensor& q_bias, const OptTensor& k_weight,
                                const OptTensor& k_bias, const Tensor& k_cache, const Tensor& v_cache,
                                const Tensor& slot_mapping, const Tensor& seq_lens, const Tensor& out) {
  TORCH_CHECK(qkv.dim() == 4, kQad, ": qkv must have shape [B, H, 3, D], got ", qkv.sizes());
  const int64_t B = qkv.size(0), H = qkv.size(1), D = qkv.size(3);
  check_shape(kQad, qkv, "qkv", "[B, H, 3, D]", {B, H, 3, D});
  const at::ScalarType dt = qkv.scalar_type();
  activation_dtype(kQad, qkv, "qkv");
  TORCH_CHECK(attention_supports_head_dim(static_cast<int>(D)), kQad, ": head_dim D must be one of ",
              c10::ArrayRef<int>(kAttentionHeadDims), " (the kernels' tile shapes), got ", D);
  TORCH_CHECK(B >= 1 && H >= 1, kQad, ": qkv needs at least one sequence and one head, got ", qkv.sizes());
  TORCH_CHECK(qkv.stride(3) == 1 && qkv.stride(0) % 8 == 0 && qkv.stride(1) % 8 == 0 && qkv.stride(2) % 8 == 0, kQad,
              ": qkv must have a unit last stride and other strides that are multiples of 8, got ", qkv.strides());
  check_shape(kQad, positions, "positions", "[B]", {B});
  check_index_dtype(kQad, positions, "positions");
  TORCH_CHECK(inv_freq.dim() == 1 && 2 * inv_freq.size(0) <= D, kQad,
              ": inv_freq must have shape [R/2] with rotary dims R <= D = ", D, ", got ", inv_freq.sizes());
  for (const auto& [t, name] : {std::pair<const OptTensor*, const char*>{&q_weight, "q_weight"}, {&q_bias, "q_bias"},
                                {&k_weight, "k_weight"}, {&k_bias, "k_bias"}})
    if (t->has_value()) check_shape(kQad, **t, name, "[D]", {D});
  TORCH_CHECK(k_cache.dim() == 4, kQad, ": k_cache must have shape [B, S, H, D], got ", k_cache.sizes());
  check_shape(kQad, k_cache, "k_cache", "[B, S, H, D] (B, H, D as qkv)", {B, kAny, H, D});
  check_shape(kQad, v_cache, "v_cache", "[B, S, H, D] (as k_cache)", k_cache.sizes().vec());
  TORCH_CHECK(k_cache.size(1) >= 1 && k_cache.size(1) <= INT32_MAX, kQad,
              ": the cache length S must be in [1, 2^31), got ", k_cache.size(1));
  check_shape(kQad, slot_mapping, "slot_mapping", "[B]", {B});
  check_index_dtype(kQad, slot_mapping, "slot_mapping");
  check_shape(kQad, seq_lens, "seq_lens", "[B]", {B});
  check_shape(kQad, out, "out", "[B, H, D]", {B, H, D});
  constexpr unsigned kVector = kContiguous | kAligned16;
  check_args(kQad, qkv,
             {arg("qkv", qkv, dt, kAligned16), arg("positions", positions, std::nullopt, kContiguous),
              arg("inv_freq", inv_freq, at::kFloat, kContiguous), arg("q_weight", q_weight, dt, kVector),
              arg("q_bias", q_bias, dt, kVector), arg("k_weight", k_weight, dt, kVector),
              arg("k_bias", k_bias, dt, kVector), arg("k_cache", k_cache, dt, kVector),
              arg("v_cache", v_cache, dt, kVector), arg("slot_mapping", slot_mapping, std::nullopt, kContiguous),
              arg("seq_lens", seq_lens, at::kInt, kContiguous), arg("out", out, dt, kVector)});
  // Every block reads its (b, h) vectors of qkv while others write out.
  TORCH_CHECK(!overlap(qkv, out), kQad, ": out must not overlap qkv");
}

void qkv_attention_decode_cuda(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq,
                               const OptTensor& q_weight, const OptTensor& q_bias, const OptTensor& k_weight,
                               const OptTensor& k_bias, Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping,
                               const Tensor& seq_lens, Tensor& out, double eps, double scale) {
  check_qkv_attention_decode(qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, k_cache, v_cache,
                             slot_mapping, seq_lens, out);
  const c10::cuda::CUDAGuard guard(qkv.device());
  const int B = static_cast<int>(qkv.size(0)), S = static_cast<int>(k_cache.size(1)),
            H = static_cast<int>(qkv.size(1)), D = static_cast<int>(qkv.size(3));
  // Scratch as attention_decode's (the same splits): from the graph's private pool under capture.
  const size_t ws_bytes = attention_decode_workspace_bytes(B, S, H, D);
  const Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, qkv.options().dtype(at::kByte));
  launch_qkv_attention_decode(qkv.data_ptr(), positions.data_ptr(), inv_freq.data_ptr<float>(), opt_ptr(q_weight),
                              opt_ptr(q_bias), opt_ptr(k_weight), opt_ptr(k_bias), k_cache.data_ptr(),
                              v_cache.data_ptr(), slot_mapping.data_ptr(), seq_lens.data_ptr<int32_t>(),
                              out.data_ptr(), ws_bytes ? workspace.data_ptr() : nullptr, B, S, H, D,
                              static_cast<int>(2 * inv_freq.size(0)), qkv.stride(0), qkv.stride(1), qkv.stride(2),
                              positions.scalar_type() == at::kLong, slot_mapping.scalar_type() == at::kLong,
                              static_cast<float>(eps), static_cast<float>(scale), activation_dtype(kQad, qkv, "qkv"),
                              current_stream());
}

}  // namespace
}  // namespace persimmon_rt

// ---- registration -------------------------------------------------------------------------------------

TORCH_LIBRARY(persimmon_rt, m) {
  m.def(
      "qk_norm_rope_cache(Tensor qkv, Tensor positions, Tensor inv_freq, Tensor? q_weight, Tensor? q_bias, "
      "Tensor? k_weight, Tensor? k_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "Tensor(c!) q_out, float eps) -> ()");
  m.def(
      "layernorm(Tensor x, Tensor weight, Tensor bias, Tensor(a!) out, float eps, Tensor? residual=None, "
      "Tensor(b!)? residual_out=None) -> ()");
  m.def("bias_relu2(Tensor x, Tensor bias, Tensor(a!) out) -> ()");
  // Tensor parallelism: buffers holds each rank's peer-mapped buffer address (int64, on the device).
  m.def(
      "all_reduce_layernorm(Tensor partial, Tensor buffers, Tensor(a!) epochs, int rank, Tensor weight, "
      "Tensor bias, Tensor(b!) out, float eps, Tensor residual, Tensor(c!) residual_out, float timeout_s, "
      "bool lamport=False) -> ()");
  // config: a tile configuration index for sweeps (_C.DECODE_LINEAR_CONFIGS); -1 = the per-shape choice.
  m.def(
      "decode_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor(a!) out, bool relu2, "
      "Tensor? ln_weight=None, Tensor? ln_bias=None, float eps=1e-05, int config=-1) -> ()");
  // The LayerNorm folded into fp32 per-output constants (fold_scale = W ln_weight, fold_shift = W ln_bias + bias).
  m.def(
      "decode_linear_folded_ln(Tensor x, Tensor weight, Tensor ln_weight, Tensor fold_scale, Tensor fold_shift, "
      "Tensor? residual, Tensor(a!) out, bool relu2, float eps, float unscale=1.0, int config=-1) -> ()");
  // int8 weights [N, K] with fp32 per-row scales (weight-only quantization).
  m.def(
      "decode_linear_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias, Tensor? residual, Tensor(a!) out, "
      "bool relu2, int config=-1) -> ()");
  m.def(
      "decode_linear_int8_folded_ln(Tensor x, Tensor weight, Tensor scale, Tensor ln_weight, Tensor fold_scale, "
      "Tensor fold_shift, Tensor? residual, Tensor(a!) out, bool relu2, float eps, float unscale=1.0, int config=-1) "
      "-> ()");
  m.def("dequantize_int8(Tensor weight, Tensor scale, Tensor(a!) out) -> ()");
  // The greedy decode step's tail: tokens = argmax(logits, -1); positions, slots, seq_lens += active.
  m.def(
      "greedy_advance(Tensor logits, Tensor(a!) tokens, Tensor(b!) positions, Tensor(c!) slots, Tensor(d!) seq_lens, "
      "Tensor active) -> ()");
  // Temperature / top-k / top-p sampling from torch.sort's output, with Exp(1) noise a sorted position.
  m.def(
      "sample_sorted(Tensor logits, Tensor sorted_logits, Tensor order, Tensor noise, Tensor temperature, "
      "Tensor top_k, Tensor top_p, Tensor(a!) tokens) -> ()");
  // ---- attention ops ----
  m.def(
      "attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, Tensor seq_lens, "
      "int max_seqlen_q, Tensor(a!) out, float scale) -> ()");
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor(a!) out, float scale) -> ()");
  // qk_norm_rope_cache of one token per sequence + attention_decode, in one launch (the decode step's).
  m.def(
      "qkv_attention_decode(Tensor qkv, Tensor positions, Tensor inv_freq, Tensor? q_weight, Tensor? q_bias, "
      "Tensor? k_weight, Tensor? k_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "Tensor seq_lens, Tensor(c!) out, float eps, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(persimmon_rt, CUDA, m) {
  m.impl("qk_norm_rope_cache", &persimmon_rt::qk_norm_rope_cache_cuda);
  m.impl("layernorm", &persimmon_rt::layernorm_cuda);
  m.impl("bias_relu2", &persimmon_rt::bias_relu2_cuda);
  m.impl("all_reduce_layernorm", &persimmon_rt::all_reduce_layernorm_cuda);
  m.impl("decode_linear", &persimmon_rt::decode_linear_cuda);
  m.impl("decode_linear_folded_ln", &persimmon_rt::decode_linear_folded_ln_cuda);
  m.impl("decode_linear_int8", &persimmon_rt::decode_linear_int8_cuda);
  m.impl("decode_linear_int8_folded_ln", &persimmon_rt::decode_linear_int8_folded_ln_cuda);
  m.impl("dequantize_int8", &persimmon_rt::dequantize_int8_cuda);
  m.impl("greedy_advance", &persimmon_rt::greedy_advance_cuda);
  m.impl("sample_sorted", &persimmon_rt::sample_sorted_cuda);
  m.impl("attention_prefill", &persimmon_rt::attention_prefill_cuda);
  m.impl("attention_decode", &persimmon_rt::attention_decode_cuda);
  m.impl("qkv_attention_decode", &persimmon_rt::qkv_attention_decode_cuda);
}

// Meta (fake-tensor) impls: the ops only write into their arguments, so there is nothing to compute;
// shape errors surface when the CUDA impl runs.
TORCH_LIBRARY_IMPL(persimmon_rt, Meta, m) {
  for (const char* op : {"qk_norm_rope_cache", "layernorm", "bias_relu2", "all_reduce_layernorm", "decode_linear",
                         "decode_linear_folded_ln", "decode_linear_int8", "decode_linear_int8_folded_ln",
                         "dequantize_int8", "greedy_advance", "sample_sorted", "attention_prefill", "attention_decode",
                         "qkv_attention_decode"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&persimmon_rt::meta_noop>());
}

#ifndef PERSIMMON_RT_CUDA_ARCHS
#define PERSIMMON_RT_CUDA_ARCHS "unknown"
#endif

// `from persimmon_rt import _C` loads this library (running the registrations above); the ops live under
// torch.ops.persimmon_rt, and the module carries the kernels' limits, each stated once in csrc/ and read
// by persimmon_rt/ops.py:
//   CUDA_ARCHS              str, the architectures it was built for, comma-separated ("90a", "80,90a")
//   DECODE_LINEAR_MAX_ROWS  int, rows (decode batch) the decode GEMV takes
//   FOLDED_LN_MAX_STAGE_BYTES, FOLDED_LN_K_MULTIPLE  int, limits of decode_linear_folded_ln (rows x (K + 8)
//                           x element size, and K's multiple)
//   ATTENTION_HEAD_DIMS     tuple of int, head dims the attention kernels are built for
//   LAYERNORM_MAX_HIDDEN    int, widest row the layernorm op takes
//   ALL_REDUCE_MAX_ROWS, ALL_REDUCE_MAX_RANKS  int, limits of all_reduce_layernorm
//   ALL_REDUCE_FLAG_BYTES   int, the flag block at the start of each rank's all-reduce buffer
//   ALL_REDUCE_SLOTS        int, the data slots that rotate after it
//   DECODE_LINEAR_CONFIGS   tuple of str, the GEMV's compiled tile configurations (decode_linear's
//                           `config` argument indexes it; for benchmark sweeps)
//   DECODE_LINEAR_INT8_CONFIGS  tuple of str, the same for decode_linear_int8
// and one function:
//   attention_prefill_kernel_name(head_dim) -> str, the kernel attention_prefill runs for head_dim on the
//                           current device ("wgmma" or "mma_sync"; attention.h says how it is chosen)
//   decode_linear_int8_config(M, N, K, folded=0) -> int, the configuration decode_linear_int8 (folded:
//                           decode_linear_int8_folded_ln) picks (config -1)
namespace {

PyObject* int8_config(PyObject*, PyObject* args) {
  int M = 0, N = 0, K = 0, folded = 0;
  if (!PyArg_ParseTuple(args, "iii|p", &M, &N, &K, &folded)) return nullptr;
  try {
    return PyLong_FromLong(persimmon_rt::decode_linear_int8_config(M, N, K, folded != 0));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* head_dims_tuple() {
  constexpr size_t n = sizeof(persimmon_rt::kAttentionHeadDims) / sizeof(persimmon_rt::kAttentionHeadDims[0]);
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(n));
  for (size_t i = 0; t != nullptr && i < n; ++i) {
    PyObject* d = PyLong_FromLong(persimmon_rt::kAttentionHeadDims[i]);
    if (d == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), d);  // steals d
  }
  return t;
}

// Adds `names` to m as a tuple of str under `key`.
bool add_names(PyObject* m, const char* key, const std::vector<std::string>& names) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (tuple == nullptr) return false;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* s = PyUnicode_FromString(names[i].c_str());
    if (s == nullptr) {
      Py_DECREF(tuple);
      return false;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), s);
  }
  if (PyModule_AddObject(m, key, tuple) < 0) {  // steals tuple on success only
    Py_DECREF(tuple);
    return false;
  }
  return true;
}

bool add_limits(PyObject* m) {
  if (PyModule_AddStringConstant(m, "CUDA_ARCHS", PERSIMMON_RT_CUDA_ARCHS) < 0) return false;
  if (PyModule_AddIntConstant(m, "DECODE_LINEAR_MAX_ROWS", persimmon_rt::kDecodeLinearMaxRows) < 0) return false;
  if (PyModule_AddIntConstant(m, "FOLDED_LN_MAX_STAGE_BYTES", persimmon_rt::kFoldedLnMaxStageBytes) < 0) return false;
  if (PyModule_AddIntConstant(m, "FOLDED_LN_K_MULTIPLE", persimmon_rt::kFoldedLnKMultiple) < 0) return false;
  if (PyModule_AddIntConstant(m, "LAYERNORM_MAX_HIDDEN", persimmon_rt::kLayerNormMaxHidden) < 0) return false;
  if (PyModule_AddIntConstant(m, "ALL_REDUCE_MAX_ROWS", persimmon_rt::kAllReduceMaxRowsHost) < 0) return false;
  if (PyModule_AddIntConstant(m, "ALL_REDUCE_MAX_RANKS", persimmon_rt::kAllReduceMaxRanksHost) < 0) return false;
  if (PyModule_AddIntConstant(m, "ALL_REDUCE_FLAG_BYTES", persimmon_rt::kAllReduceFlagBytesHost) < 0) return false;
  if (PyModule_AddIntConstant(m, "ALL_REDUCE_SLOTS", persimmon_rt::kAllReduceSlotsHost) < 0) return false;
  if (!add_names(m, "DECODE_LINEAR_CONFIGS", persimmon_rt::decode_linear_config_names())) return false;
  if (!add_names(m, "DECODE_LINEAR_INT8_CONFIGS", persimmon_rt::decode_linear_int8_config_names())) return false;
  PyObject* dims = head_dims_tuple();
  if (dims == nullptr) return false;
  if (PyModule_AddObject(m, "ATTENTION_HEAD_DIMS", dims) < 0) {  // steals dims on success only
    Py_DECREF(dims);
    return false;
  }
  return true;
}

PyObject* attention_prefill_kernel_name(PyObject*, PyObject* head_dim) {
  const long d = PyLong_AsLong(head_dim);
  if (d == -1 && PyErr_Occurred()) return nullptr;
  try {
    return PyUnicode_FromString(persimmon_rt::attention_prefill_kernel_name(static_cast<int>(d)));
  } catch (const std::exception& e) {  // no C++ exception may cross into Python's C API
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef kMethods[] = {
    {"attention_prefill_kernel_name", attention_prefill_kernel_name, METH_O,
     "attention_prefill_kernel_name(head_dim) -> 'wgmma' or 'mma_sync': the kernel attention_prefill runs for "
     "head_dim on the current device (PERSIMMON_RT_PREFILL_ATTENTION=wgmma|mma_sync asks, read at every call)"},
    {"decode_linear_int8_config", int8_config, METH_VARARGS,
     "decode_linear_int8_config(M, N, K, folded=False) -> the int8 GEMV configuration picked for M rows of an "
     "[N, K] weight (folded: by decode_linear_int8_folded_ln)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "persimmon_rt CUDA ops (torch.ops.persimmon_rt)", -1,
                               kMethods, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && !add_limits(m)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
