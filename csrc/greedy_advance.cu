// Launcher: the chunk count follows the vocabulary (at least kGreedyChunkFloats a chunk, at most
// kGreedyMaxChunks chunks), a multiple of 4 floats so that 16-byte loads stay aligned.
#include "greedy_advance.h"

#include <algorithm>
#include <climits>

#include "kernels/greedy_advance.cuh"

namespace persimmon_rt {
namespace {

struct Chunking {
  int64_t chunk;  // floats a chunk
  int chunks;     // chunks a row
};

Chunking chunking(int64_t vocab) {
  const int64_t wanted = std::clamp<int64_t>(ceil_div(vocab, sampling::kGreedyChunkFloats), 1,
                                             sampling::kGreedyMaxChunks);
  const int64_t chunk = ceil_div(ceil_div(vocab, wanted), 4) * 4;
  return {chunk, static_cast<int>(ceil_div(vocab, chunk))};
}

}  // namespace

size_t greedy_advance_workspace_bytes(int64_t rows, int64_t vocab) {
  return vocab < 1 ? 0 : size_t(rows) * chunking(vocab).chunks * sizeof(sampling::ArgmaxPair);
}

void launch_greedy_advance(const float* logits, int64_t* tokens, int64_t* positions, int64_t* slots,
                           int32_t* seq_lens, const int32_t* active, void* workspace, int64_t rows, int64_t vocab,
                           cudaStream_t stream) {
  PRT_REQUIRE(vocab >= 1 && vocab < INT_MAX, "vocab must be in [1, 2^31 - 1)");
  PRT_REQUIRE(rows >= 0 && rows <= kMaxGridDimYZ, "rows must be in [0, 65535]");
  if (rows == 0) return;
  PRT_REQUIRE(workspace != nullptr, "workspace is required");
  const Chunking c = chunking(vocab);
  auto* partial = static_cast<sampling::ArgmaxPair*>(workspace);
  const bool vec4 = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(c.chunks), static_cast<unsigned>(rows));
  if (vec4)
    launch_kernel(sampling::argmax_chunks_kernel<true>, grid, dim3(sampling::kGreedyThreads), 0, stream,
                  /*pdl=*/true, logits, vocab, c.chunk, partial);
  else
    launch_kernel(sampling::argmax_chunks_kernel<false>, grid, dim3(sampling::kGreedyThreads), 0, stream,
                  /*pdl=*/true, logits, vocab, c.chunk, partial);
  launch_kernel(sampling::greedy_finish_kernel, dim3(static_cast<unsigned>(rows)), dim3(sampling::kGreedyThreads), 0,
                stream, /*pdl=*/true, partial, c.chunks, tokens, positions, slots, seq_lens, active);
}

}  // namespace persimmon_rt
