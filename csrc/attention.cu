// Launchers of the attention kernels: pick the template instance for (dtype, head_dim), size the grid,
// check the launch. Torch-free.
#include "attention.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <iterator>
#include <string>
#include <type_traits>
#include <utility>

#include "common.cuh"
#include "kernels/attention_decode.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/attention_prefill_sm90.cuh"

// The architectures this build compiles device code for ("80,90a"); the build passes it to every
// compiler. Compile checks without it build no sm_90a dispatch.
#ifndef PERSIMMON_RT_CUDA_ARCHS
#define PERSIMMON_RT_CUDA_ARCHS ""
#endif

namespace persimmon_rt {
namespace {

using attention::DecodeParams;
using attention::PrefillParams;
using attention::PrefillSm90Config;
using attention::PrefillTile;

constexpr float kLog2e = 1.4426950408889634f;

// batch and num_heads index grid z and y.
const std::string kGridLimitMessage = "batch and num_heads must be in [0, " + std::to_string(kMaxGridDimYZ) + "]";

// Calls f(std::integral_constant<int, D>{}) for the D of kAttentionHeadDims equal to head_dim; any
// other head_dim is an error, never a silent no-op.
template <typename F, size_t... I>
void dispatch_head_dim(const char* op, int head_dim, F&& f, std::index_sequence<I...>) {
  const bool found =
      ((head_dim == kAttentionHeadDims[I] && (f(std::integral_constant<int, kAttentionHeadDims[I]>{}), true)) || ...);
  if (found) return;
  std::string dims;
  for (const int d : kAttentionHeadDims) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
  throw std::invalid_argument(std::string(op) + ": head_dim must be one of " + dims + ", got " +
                              std::to_string(head_dim));
}

template <typename F>
void dispatch_head_dim(const char* op, int head_dim, F&& f) {
  dispatch_head_dim(op, head_dim, std::forward<F>(f), std::make_index_sequence<std::size(kAttentionHeadDims)>{});
}

// head_dim 64 (Persimmon): 4 warps x 32 query rows, 64-key tiles; 48 KB of shared memory and < 256
// registers a thread keep two blocks on an SM. On the H100 (benchmarks/attention_variants.cu, 2K-16K
// tokens, three runs) this beat 8 warps x 16 rows by 5-17 %, 32-key tiles by 4-11 % and 16-row warps
// with 128-key tiles by 14-29 %. head_dim 128 doubles every fragment, so a warp takes 16 rows to stay
// under the register limit.
template <int D>
struct PrefillTileFor;  // one per entry of kAttentionHeadDims
template <>
struct PrefillTileFor<64> {
  using type = PrefillTile<64, 2, 4, 64>;
};
template <>
struct PrefillTileFor<128> {
  using type = PrefillTile<128, 1, 4, 64>;
};

template <typename T, typename Tile>
void prefill(const PrefillParams& p, int batch, int max_q_len, cudaStream_t stream) {
  const int64_t q_tiles = ceil_div(max_q_len, Tile::kBlockM);
  PRT_REQUIRE(q_tiles <= kMaxGridDimYZ, "max_q_len must be <= " + std::to_string(int64_t{kMaxGridDimYZ} * Tile::kBlockM) +
                                            " (query tiles of " + std::to_string(Tile::kBlockM) +
                                            " rows on grid y)");
  const auto kernel = attention::attention_prefill_kernel<T, Tile>;
  PRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  const dim3 grid(p.num_heads, static_cast<unsigned>(q_tiles), batch);
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
  PRT_CUDA_CHECK(cudaGetLastError());
}

// The Hopper prefill kernel (attention_prefill_sm90.cuh), head_dim 64: 3 consumer warpgroups (192 queries
// a block), 128-key tiles, 2-slot K and V rings, issue turns between the consumers. Fastest of the
// variants benchmarks/attention_variants.cu times, at every length (H200, benchmarks/RESULTS.md run P:
// 340 / 427 / 451 TFLOP/s at 2K / 8K / 16K against 324 / 392 / 395 for the 2-warpgroup, 3-slot config).
// The softmax options (a share of exp2 on the FMA pipe, a max with slack, row sums on the tensor cores)
// stay off: each was slower on top of either shape.
using PrefillSm90Tile64 = PrefillSm90Config<3, 128, 2, true>;
// head_dim 128: O takes 64 accumulators a thread, twice head_dim 64's, so 2 consumer warpgroups (128
// queries a block, 240 registers each) instead of 3; 128-key tiles, 2-slot rings (160 KB of shared memory).
using PrefillSm90Tile128 = PrefillSm90Config<2, 128, 2, true, 1, 0, -1, false, 3, 128>;

enum class PrefillKernel { kMmaSync, kWgmma };

// The prefill kernel when PERSIMMON_RT_PREFILL_ATTENTION is unset (where the build and GPU have it): the
// wgmma kernel passed tests/test_attention_prefill.py and memcheck on the H200 and is faster than mma.sync
// at every length (benchmarks/RESULTS.md, run H).
constexpr PrefillKernel kPrefillKernelDefault = PrefillKernel::kWgmma;

// Whether the comma-separated `list` names `arch`.
constexpr bool arch_list_has(const char* list, const char* arch) {
  for (const char* p = list; *p != '\0';) {
    const char* a = arch;
    while (*a != '\0' && *p == *a) ++a, ++p;
    if (*a == '\0' && (*p == ',' || *p == '\0')) return true;
    while (*p != '\0' && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return false;
}

static_assert(arch_list_has("80,90a", "90a") && arch_list_has("90a", "90a") && !arch_list_has("80,90", "90a") &&
                  !arch_list_has("90a0", "90a") && !arch_list_has("", "90a"),
              "arch_list_has matches whole entries");

// wgmma and setmaxnreg exist only in sm_90a code, which runs on compute capability 9.0 only.
constexpr bool kBuiltForSm90a = arch_list_has(PERSIMMON_RT_CUDA_ARCHS, "90a");

// PERSIMMON_RT_PREFILL_ATTENTION=wgmma|mma_sync, read at every launch so that one process can time or test
// both kernels; anything else is an error rather than a silent default.
PrefillKernel requested_prefill_kernel() {
  const char* value = std::getenv("PERSIMMON_RT_PREFILL_ATTENTION");
  if (value == nullptr || *value == '\0') return kPrefillKernelDefault;
  const std::string v(value);
  if (v == "wgmma") return PrefillKernel::kWgmma;
  if (v == "mma_sync") return PrefillKernel::kMmaSync;
  throw std::runtime_error("PERSIMMON_RT_PREFILL_ATTENTION must be wgmma or mma_sync, got '" + v + "'");
}

// The kernel attention_prefill runs for head_dim on the current device: wgmma where requested and
// available (an sm_90a build on a 9.0 device, head_dim 64 or 128), mma.sync otherwise.
PrefillKernel prefill_kernel(int head_dim) {
  const bool wgmma_head_dim = head_dim == PrefillSm90Tile64::kHeadDim || head_dim == PrefillSm90Tile128::kHeadDim;
  const bool wgmma_fits = kBuiltForSm90a && wgmma_head_dim && device_compute_capability() == 90;
  return requested_prefill_kernel() == PrefillKernel::kWgmma && wgmma_fits ? PrefillKernel::kWgmma
                                                                           : PrefillKernel::kMmaSync;
}

// Decode: each thread keeps kDecodeUnroll 16-byte K and V loads in flight, in at most 64 registers.
// Measured on the H100 (benchmarks/attention_variants.cu, batch 1 and 8 at 2K and 16K keys): few, long
// splits stream the cache best, about 4 blocks of 128 threads per SM (batch 1, 16K keys: 97 % of copy
// against 92 % with 8 blocks per SM). Where that gives a row 2 or more splits, 256-thread blocks with
// half the splits are as fast or faster (batch 1, 2K keys: 74 % vs 69 %, 71 % vs 71 % in two runs);
// at one split a row 128 threads win (batch 8, 2K keys: 102 % vs 96-100 %).
constexpr int kDecodeUnroll = 4;
constexpr int kDecodeRegsPerThread = 64;
constexpr int kDecodeBlocksPerSm = 4;      // of 128 threads
constexpr int kDecodeMaxSplits = 64;
constexpr int kDecodeMinSplitKeys = 128;  // fewer keys per split and the merge costs more than it saves

struct DecodeShape {
  int threads;
  int splits;
};

DecodeShape decode_shape(int batch, int cache_len, int num_heads) {
  int device = 0;
  int sms = 0;
  PRT_CUDA_CHECK(cudaGetDevice(&device));
  PRT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int rows = std::max(1, batch * num_heads);
  const int by_length = static_cast<int>(ceil_div(cache_len, kDecodeMinSplitKeys));
  const int splits = std::max(1, std::min({sms * kDecodeBlocksPerSm / rows, by_length, kDecodeMaxSplits}));
  return splits >= 2 ? DecodeShape{256, splits / 2} : DecodeShape{128, 1};
}

// The split kernel (attention_decode's, or qkv_attention_decode's for QkvDecodeParams), then the
// combine where there are several splits.
template <typename T, int D, int THREADS, typename Params>
void decode(const Params& params, const DecodeParams& p, int batch, cudaStream_t stream) {
  constexpr int kMinBlocks = 65536 / (THREADS * kDecodeRegsPerThread);
  const dim3 grid(p.num_splits, p.num_heads, batch);
  if constexpr (std::is_same_v<Params, attention::QkvDecodeParams>)
    launch_kernel(attention::qkv_attention_decode_split_kernel<T, D, THREADS, kDecodeUnroll, kMinBlocks>, grid,
                  dim3(THREADS), 0, stream, /*pdl=*/true, params);
  else
    launch_kernel(attention::attention_decode_split_kernel<T, D, THREADS, kDecodeUnroll, kMinBlocks>, grid,
                  dim3(THREADS), 0, stream, /*pdl=*/true, params);
  if (p.num_splits > 1)
    launch_kernel(attention::attention_decode_combine_kernel<T, D>, dim3(p.num_heads, batch), dim3(D), 0, stream,
                  /*pdl=*/true, p);
}

template <typename Params>
void decode_dispatch(const char* op, const Params& params, const DecodeParams& p, int threads, int batch,
                     int head_dim, DType dtype, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(op, head_dim, [&](auto d) {
      constexpr int D = decltype(d)::value;
      if (threads == 256) decode<T, D, 256>(params, p, batch, stream);
      else decode<T, D, 128>(params, p, batch, stream);
    });
  });
}

// The split-KV parameters of one decode launch (the shape alone decides the splits: CUDA-graph safe).
DecodeParams decode_params(const void* q, const void* k_cache, const void* v_cache, const int32_t* seq_lens,
                           void* out, void* workspace, int batch, int cache_len, int num_heads, int head_dim,
                           float scale, int splits) {
  const size_t slots = size_t(batch) * num_heads * splits;
  PRT_REQUIRE(splits == 1 || workspace != nullptr, "workspace is required for this shape");
  float* partial_out = static_cast<float*>(workspace);                      // [B, H, splits, D]
  float* partial_max = partial_out + (splits > 1 ? slots * head_dim : 0);  // [B, H, splits]
  float* partial_sum = partial_max + (splits > 1 ? slots : 0);             // [B, H, splits]
  return DecodeParams{q,           k_cache,   v_cache,   seq_lens, out,   partial_out, partial_max,
                      partial_sum, num_heads, cache_len, splits,   scale * kLog2e};
}

}  // namespace

void launch_attention_prefill(const void* q, const void* k_cache, const void* v_cache, const int32_t* cu_seqlens_q,
                              const int32_t* seq_lens, void* out, int num_tokens, int batch, int max_q_len,
                              int cache_len, int num_heads, int head_dim, float scale, DType dtype,
                              cudaStream_t stream) {
  PRT_REQUIRE(batch >= 0 && batch <= kMaxGridDimYZ && num_heads > 0 && num_heads <= kMaxGridDimYZ && max_q_len >= 0,
              kGridLimitMessage + ", max_q_len >= 0");
  if (num_tokens == 0 || batch == 0 || max_q_len == 0) return;
  const PrefillParams p{q, k_cache, v_cache, cu_seqlens_q, seq_lens, out, num_heads, cache_len, scale * kLog2e};
  // The wgmma kernel addresses cache rows (B * S of them, plus a key tile past the end) by int32 TMA
  // coordinates.
  const int64_t cache_rows = int64_t(batch) * cache_len;
  if (prefill_kernel(head_dim) == PrefillKernel::kWgmma && cache_rows >= 1 && cache_rows <= INT32_MAX - 256) {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (head_dim == PrefillSm90Tile64::kHeadDim) {
        attention::launch_attention_prefill_sm90<T, PrefillSm90Tile64>(p, num_tokens, batch, max_q_len, stream);
      } else {
        attention::launch_attention_prefill_sm90<T, PrefillSm90Tile128>(p, num_tokens, batch, max_q_len, stream);
      }
    });
    return;
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim("attention_prefill", head_dim, [&](auto d) {
      prefill<T, typename PrefillTileFor<decltype(d)::value>::type>(p, batch, max_q_len, stream);
    });
  });
}

const char* attention_prefill_kernel_name(int head_dim) {
  return prefill_kernel(head_dim) == PrefillKernel::kWgmma ? "wgmma" : "mma_sync";
}

size_t attention_decode_workspace_bytes(int batch, int cache_len, int num_heads, int head_dim) {
  const int splits = decode_shape(batch, cache_len, num_heads).splits;
  if (splits == 1) return 0;
  const size_t slots = size_t(batch) * num_heads * splits;
  return slots * (head_dim + 2) * sizeof(float);
}

void launch_attention_decode(const void* q, const void* k_cache, const void* v_cache, const int32_t* seq_lens,
                             void* out, void* workspace, int batch, int cache_len, int num_heads, int head_dim,
                             float scale, DType dtype, cudaStream_t stream) {
  PRT_REQUIRE(batch >= 0 && batch <= kMaxGridDimYZ && num_heads > 0 && num_heads <= kMaxGridDimYZ,
              kGridLimitMessage);
  if (batch == 0) return;
  const DecodeShape shape = decode_shape(batch, cache_len, num_heads);
  const DecodeParams p = decode_params(q, k_cache, v_cache, seq_lens, out, workspace, batch, cache_len, num_heads,
                                       head_dim, scale, shape.splits);
  decode_dispatch("attention_decode", p, p, shape.threads, batch, head_dim, dtype, stream);
}

void launch_qkv_attention_decode(const void* qkv, const void* positions, const float* inv_freq, const void* q_weight,
                                 const void* q_bias, const void* k_weight, const void* k_bias, void* k_cache,
                                 void* v_cache, const void* slot_mapping, const int32_t* seq_lens, void* out,
                                 void* workspace, int batch, int cache_len, int num_heads, int head_dim,
                                 int rotary_dim, int64_t qkv_stride_b, int64_t qkv_stride_h, int64_t qkv_stride_s,
                                 bool positions_int64, bool slots_int64, float eps, float scale, DType dtype,
                                 cudaStream_t stream) {
  PRT_REQUIRE(batch >= 0 && batch <= kMaxGridDimYZ && num_heads > 0 && num_heads <= kMaxGridDimYZ,
              kGridLimitMessage);
  PRT_REQUIRE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "rotary_dim must be even and <= head_dim");
  PRT_REQUIRE(qkv_stride_b % kVec == 0 && qkv_stride_h % kVec == 0 && qkv_stride_s % kVec == 0 &&
                  reinterpret_cast<uintptr_t>(qkv) % 16 == 0,
              "qkv must be 16-byte aligned with strides that are multiples of 8 elements");
  if (batch == 0) return;
  const DecodeShape shape = decode_shape(batch, cache_len, num_heads);
  const attention::QkvDecodeParams p{
      decode_params(nullptr, k_cache, v_cache, seq_lens, out, workspace, batch, cache_len, num_heads, head_dim, scale,
                    shape.splits),
      qkv, positions, inv_freq, q_weight, q_bias, k_weight, k_bias, slot_mapping, qkv_stride_b, qkv_stride_h,
      qkv_stride_s, head_dim, rotary_dim, positions_int64, slots_int64, eps};
  decode_dispatch("qkv_attention_decode", p, p.attn, shape.threads, batch, head_dim, dtype, stream);
}

}  // namespace persimmon_rt
