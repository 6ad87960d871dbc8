// Launcher: one block per row, sized like the LayerNorm's (layernorm.cu) from the hidden size.
#include "all_reduce.h"

#include "kernels/all_reduce_layernorm.cuh"
#include "layernorm.h"

namespace persimmon_rt {

static_assert(kAllReduceMaxRanksHost == kAllReduceMaxRanks && kAllReduceMaxRowsHost == kAllReduceMaxRows &&
                  kAllReduceFlagBytesHost == kAllReduceFlagBytes && kAllReduceSlotsHost == kAllReduceSlots,
              "all_reduce.h restates the kernel's limits");

namespace {

template <typename T, int THREADS, int CPT, bool LAMPORT>
void launch(const void* partial, char* const* peers, uint32_t* epochs, const void* weight, const void* bias,
            void* out, const void* residual, void* residual_out, int rank, int world, int64_t rows, int hidden,
            float eps, uint64_t timeout_ns, cudaStream_t stream) {
  launch_kernel(all_reduce_layernorm_kernel<T, THREADS, CPT, LAMPORT>, dim3(static_cast<unsigned>(rows)), dim3(THREADS), 0,
                stream, /*pdl=*/true, static_cast<const T*>(partial), peers, epochs, static_cast<const T*>(weight),
                static_cast<const T*>(bias), static_cast<T*>(out), static_cast<const T*>(residual),
                static_cast<T*>(residual_out), rank, world, hidden, eps, timeout_ns);
}

}  // namespace

void launch_all_reduce_layernorm(const void* partial, void* const* buffers, uint32_t* epochs, const void* weight,
                                 const void* bias, void* out, const void* residual, void* residual_out, int rank,
                                 int world, int64_t rows, int hidden, float eps, double timeout_s, bool lamport,
                                 DType dtype, cudaStream_t stream) {
  PRT_REQUIRE(world >= 1 && world <= kAllReduceMaxRanks && rank >= 0 && rank < world,
              "need 1 <= world <= 8 and 0 <= rank < world");
  PRT_REQUIRE(rows >= 1 && rows <= kAllReduceMaxRows, "rows must be in [1, 64]");
  PRT_REQUIRE(hidden > 0 && hidden % kVec == 0 && hidden <= kLayerNormMaxHidden,
              "hidden size must be a multiple of 8 in [8, 16384]");
  PRT_REQUIRE(timeout_s > 0, "timeout must be positive");
  auto* peers = reinterpret_cast<char* const*>(buffers);
  const auto timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  const int chunks = hidden / kVec;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto go = [&](auto threads, auto cpt) {
      constexpr int kThreads = decltype(threads)::value, kCpt = decltype(cpt)::value;
      (lamport ? launch<T, kThreads, kCpt, true> : launch<T, kThreads, kCpt, false>)(
          partial, peers, epochs, weight, bias, out, residual, residual_out, rank, world, rows, hidden, eps,
          timeout_ns, stream);
    };
    using I = std::integral_constant<int, 128>;
    if (chunks <= 128) go(I{}, std::integral_constant<int, 1>{});
    else if (chunks <= 256) go(I{}, std::integral_constant<int, 2>{});
    else if (chunks <= 512) go(I{}, std::integral_constant<int, 4>{});
    else if (chunks <= 1024) go(I{}, std::integral_constant<int, 8>{});
    else go(std::integral_constant<int, 256>{}, std::integral_constant<int, 8>{});
  });
}

}  // namespace persimmon_rt
