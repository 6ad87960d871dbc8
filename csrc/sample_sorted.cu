// Launcher: three launches over the chunks of sampling::row_chunking (the workspace holds a float and a
// (value, index) pair a chunk).
#include "sample_sorted.h"

#include <climits>

#include "kernels/sample_sorted.cuh"

namespace persimmon_rt {

size_t sample_sorted_workspace_bytes(int64_t rows, int64_t vocab) {
  if (vocab < 1) return 0;
  const size_t slots = size_t(rows) * sampling::row_chunking(vocab).chunks;
  return slots * (sizeof(sampling::ArgmaxPair) + sizeof(float));
}

void launch_sample_sorted(const float* logits, const float* sorted_logits, const int64_t* order, const float* noise,
                          const float* temperature, const int64_t* top_k, const float* top_p, int64_t* tokens,
                          void* workspace, int64_t rows, int64_t vocab, cudaStream_t stream) {
  PRT_REQUIRE(vocab >= 1 && vocab < INT_MAX, "vocab must be in [1, 2^31 - 1)");
  PRT_REQUIRE(rows >= 0 && rows <= kMaxGridDimYZ, "rows must be in [0, 65535]");
  if (rows == 0) return;
  PRT_REQUIRE(workspace != nullptr, "workspace is required");
  const sampling::RowChunking c = sampling::row_chunking(vocab);
  const size_t slots = size_t(rows) * c.chunks;
  auto* best = static_cast<sampling::ArgmaxPair*>(workspace);  // 8-byte pairs first: aligned
  auto* sums = reinterpret_cast<float*>(best + slots);
  const sampling::SampleParams p{logits, sorted_logits, order, noise, temperature, top_k, top_p, tokens,
                                 sums,   best,          vocab, c.chunk, c.chunks};
  const dim3 grid(static_cast<unsigned>(c.chunks), static_cast<unsigned>(rows));
  const dim3 block(sampling::kSampleThreads);
  launch_kernel(sampling::sample_chunk_sums_kernel<>, grid, block, 0, stream, /*pdl=*/true, p);
  launch_kernel(sampling::sample_chunk_race_kernel<>, grid, block, 0, stream, /*pdl=*/true, p);
  launch_kernel(sampling::sample_finish_kernel<>, dim3(static_cast<unsigned>(rows)), block, 0, stream,
                /*pdl=*/true, p);
}

}  // namespace persimmon_rt
