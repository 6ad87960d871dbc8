// Launcher: the chunks follow the vocabulary (sampling::row_chunking).
#include "greedy_advance.h"

#include <climits>

#include "kernels/greedy_advance.cuh"

namespace persimmon_rt {

size_t greedy_advance_workspace_bytes(int64_t rows, int64_t vocab) {
  return vocab < 1 ? 0 : size_t(rows) * sampling::row_chunking(vocab).chunks * sizeof(sampling::ArgmaxPair);
}

void launch_greedy_advance(const float* logits, int64_t* tokens, int64_t* positions, int64_t* slots,
                           int32_t* seq_lens, const int32_t* active, void* workspace, int64_t rows, int64_t vocab,
                           cudaStream_t stream) {
  PRT_REQUIRE(vocab >= 1 && vocab < INT_MAX, "vocab must be in [1, 2^31 - 1)");
  PRT_REQUIRE(rows >= 0 && rows <= kMaxGridDimYZ, "rows must be in [0, 65535]");
  if (rows == 0) return;
  PRT_REQUIRE(workspace != nullptr, "workspace is required");
  const sampling::RowChunking c = sampling::row_chunking(vocab);
  auto* partial = static_cast<sampling::ArgmaxPair*>(workspace);
  const bool vec4 = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(c.chunks), static_cast<unsigned>(rows));
  if (vec4)
    launch_kernel(sampling::argmax_chunks_kernel<true>, grid, dim3(sampling::kGreedyThreads), 0, stream,
                  /*pdl=*/true, logits, vocab, c.chunk, partial);
  else
    launch_kernel(sampling::argmax_chunks_kernel<false>, grid, dim3(sampling::kGreedyThreads), 0, stream,
                  /*pdl=*/true, logits, vocab, c.chunk, partial);
  launch_kernel(sampling::greedy_finish_kernel<>, dim3(static_cast<unsigned>(rows)), dim3(sampling::kGreedyThreads), 0,
                stream, /*pdl=*/true, partial, c.chunks, tokens, positions, slots, seq_lens, active);
}

}  // namespace persimmon_rt
