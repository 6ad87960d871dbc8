// Kernel-development harness for the attention kernels: runs template variants (tile shapes, unroll,
// split counts; for prefill also the Hopper wgmma kernel's warpgroups, key tile, stages, issue turns and
// softmax options) on the Persimmon layer shape (64 heads x 64, fp16), checks each against the shipped
// mma.sync configuration (which tests/test_attention_*.py check against the fp32 reference) before timing
// it, and prints TFLOP/s (prefill, causal) or TB/s on the KV bytes (decode) beside a device copy.
// Prefill also checks every variant on ragged packs with cached prefixes and NaN past each sequence's
// end (the cases of tests/test_attention_prefill.py), and against fp32 attention on two heads.
// Decode also times a bulk-copy form (benchmarks/attention_decode_bulk.cuh: all heads a block, one block an
// SM), with its arithmetic, without its combine, and as copies alone; rows marked "not checked" are timings
// of incomplete work.
// Torch-free; build and run on the GPU machine:
//   nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc -Ibenchmarks \
//        benchmarks/attention_variants.cu -o /tmp/attention_variants && /tmp/attention_variants [prefill|decode]
// `prefill` takes optional lengths (comma-separated, default 2048,4096,8192,16384) and a substring that
// variant names must contain, e.g. `/tmp/attention_variants prefill 8192,16384 "3 WG"`. One allocation
// serves every length, checks run on the device, and each timing is ~0.1 s of kernels, so the whole prefill
// table is meant to take well under a minute (it prints its own time).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common.cuh"
#include "kernels/attention_decode.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/attention_prefill_sm90.cuh"
#include "attention_decode_bulk.cuh"

using namespace persimmon_rt;
using namespace persimmon_rt::attention;
using T = __half;

constexpr int H = 64;
constexpr int D = 64;
constexpr float kScaleLog2 = 0.125f * 1.4426950408889634f;

__global__ void fill_random(T* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    x[i] = __float2half((h & 0xffff) / 16384.f - 2.f);  // uniform in [-2, 2)
  }
}

T* random_buffer(size_t n, uint32_t seed) {
  T* p = nullptr;
  PRT_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
  fill_random<<<1024, 256>>>(p, n, seed);
  PRT_CUDA_CHECK(cudaGetLastError());
  return p;
}

// Median time of fn in ms over `reps` runs after 2 warm-ups.
float median_ms(const std::function<void()>& fn, int reps) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 2; ++i) fn();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a);
    fn();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms);
  }
  PRT_CUDA_CHECK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

float max_abs_diff(const T* a, const T* b, size_t n) {
  std::vector<T> ha(n), hb(n);
  cudaMemcpy(ha.data(), a, n * sizeof(T), cudaMemcpyDeviceToHost);
  cudaMemcpy(hb.data(), b, n * sizeof(T), cudaMemcpyDeviceToHost);
  float m = 0.f;
  for (size_t i = 0; i < n; ++i) {
    const float d = std::fabs(__half2float(ha[i]) - __half2float(hb[i]));
    m = std::isnan(d) ? INFINITY : std::max(m, d);
  }
  return m;
}

// ---- prefill ------------------------------------------------------------------------------------------

using PrefillLaunch = void (*)(const PrefillParams&, int num_tokens, int batch, int max_q_len, cudaStream_t);

template <typename Tile>
void launch_mma_sync(const PrefillParams& p, int, int batch, int max_q_len, cudaStream_t s) {
  auto kernel = attention_prefill_kernel<T, Tile>;
  PRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  kernel<<<dim3(p.num_heads, ceil_div(max_q_len, Tile::kBlockM), batch), Tile::kThreads, Tile::kSmemBytes, s>>>(p);
}

template <typename Cfg>
void launch_wgmma(const PrefillParams& p, int num_tokens, int batch, int max_q_len, cudaStream_t s) {
  launch_attention_prefill_sm90<T, Cfg>(p, num_tokens, batch, max_q_len, s);
}

struct PrefillVariant {
  std::string name;
  PrefillLaunch launch;
};

template <typename Tile>
PrefillVariant mma_sync(const char* name) {
  return {std::string("mma.sync ") + name, launch_mma_sync<Tile>};
}

// Named by its configuration: consumer warpgroups, key tile, stages, issue turns, blocks per SM, then the
// softmax options (PrefillSm90Config).
template <typename Cfg>
PrefillVariant wgmma(const char* tag = "") {
  std::string n = std::string(tag) + "wgmma " + std::to_string(Cfg::kConsumers) + " WG, N" +
                  std::to_string(Cfg::kBlockN) + ", " + std::to_string(Cfg::kStages) + " st";
  if (Cfg::kPingpong) n += ", turns";
  if (Cfg::kBlocksPerSm > 1) n += ", " + std::to_string(Cfg::kBlocksPerSm) + " blk/SM";
  if (Cfg::kExpPoly16 > 0) n += ", poly " + std::to_string(Cfg::kExpPoly16) + "/16";
  if (Cfg::kExpPoly16 > 0 && Cfg::kPolyDegree != 3) n += " deg " + std::to_string(Cfg::kPolyDegree);
  if (Cfg::kMaxSlack >= 0) n += ", slack " + std::to_string(Cfg::kMaxSlack);
  if (Cfg::kRowsumMma) n += ", rowsum mma";
  return {n, launch_wgmma<Cfg>};
}

// The first is the reference of the diff columns (the shipped mma.sync tile, csrc/attention.cu:
// PrefillTileFor<64>); the first wgmma one is csrc/attention.cu's PrefillSm90Tile, the base of the ratios.
std::vector<PrefillVariant> prefill_variants() {
  return {
      mma_sync<PrefillTile<64, 2, 4, 64>>("shipped: warp 2x16 rows, 4 warps, N64"),
      mma_sync<PrefillTile<64, 1, 8, 64>>("warp 16 rows, 8 warps, N64"),
      mma_sync<PrefillTile<64, 2, 4, 32>>("warp 2x16 rows, 4 warps, N32"),
      mma_sync<PrefillTile<64, 1, 4, 128>>("warp 16 rows, 4 warps, N128"),
      wgmma<PrefillSm90Config<3, 128, 2, true>>("shipped: "),
      // Softmax options on the 2-warpgroup, 3-slot shape (PrefillSm90Config<..., EXP_POLY16, MAX_SLACK,
      // ROWSUM_MMA>): the rescale skip alone and with slack, the FMA-pipe share of exp2, the tensor-core
      // row sums.
      wgmma<PrefillSm90Config<2, 128, 3, true>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 0, 0>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 0, 8>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 2, -1>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 1, 8>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 2, 8>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 3, 8>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 0, 8, true>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 2, 8, true>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 3, 8, true>>(),
      wgmma<PrefillSm90Config<2, 128, 3, true, 1, 4, 8, true>>(),
      // Shapes, plain and with the options: turns, stages, key tile, 3 consumer warpgroups (192-row
      // tiles), 2 blocks per SM.
      wgmma<PrefillSm90Config<2, 128, 3, false>>(),
      wgmma<PrefillSm90Config<2, 128, 3, false, 1, 3, 8, true>>(),
      wgmma<PrefillSm90Config<2, 128, 2, true>>(),
      wgmma<PrefillSm90Config<2, 64, 2, true>>(),
      wgmma<PrefillSm90Config<3, 128, 2, true, 1, 2, 8, true>>(),
      wgmma<PrefillSm90Config<3, 128, 2, true, 1, 3, 8, true>>(),
      wgmma<PrefillSm90Config<3, 128, 2, false>>(),
      wgmma<PrefillSm90Config<3, 128, 2, false, 1, 3, 8, true>>(),
      wgmma<PrefillSm90Config<3, 128, 3, true, 1, 3, 8, true>>(),
      wgmma<PrefillSm90Config<1, 128, 2, false, 2>>(),
      wgmma<PrefillSm90Config<1, 128, 2, false, 2, 2, 8>>(),
      wgmma<PrefillSm90Config<1, 128, 2, false, 2, 3, 8, true>>(),
      // Not here: 2 WG, N64, 2 st, turns, 2 blk/SM (with or without the options): on the H200 its edge-case
      // check did not return (twice, within 150 s and 200 s); not investigated, as no shipped path uses it.
  };
}

// max |a - b| over n elements into *result (as float bits: non-negative floats order as unsigned ints);
// NaN counts as +inf.
__global__ void max_abs_diff_kernel(const T* a, const T* b, size_t n, unsigned* result) {
  float m = 0.f;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float d = fabsf(__half2float(a[i]) - __half2float(b[i]));
    m = d == d ? fmaxf(m, d) : INFINITY;
  }
  atomicMax(result, __float_as_uint(m));
}

// max |out - ref| where ref [T, heads, D] in fp32 holds heads ref_heads[0..heads) of out [T, H, D].
__global__ void max_abs_err_kernel(const T* out, const float* ref, int tokens, int2 ref_heads, unsigned* result) {
  float m = 0.f;
  const size_t n = size_t(tokens) * 2 * D;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t tok = i / (2 * D);
    const int slot = int(i / D % 2);
    const int head = slot == 0 ? ref_heads.x : ref_heads.y;
    const float d = fabsf(__half2float(out[(tok * H + head) * D + i % D]) - ref[i]);
    m = d == d ? fmaxf(m, d) : INFINITY;
  }
  atomicMax(result, __float_as_uint(m));
}

// Causal attention in fp32 (expf, no tiling) for one query of one head of a single sequence of
// `tokens` queries over as many keys: block (query, head slot), 128 threads striding over the keys, each
// with its own running max, sum and output row, merged at the end.
__global__ void __launch_bounds__(128) reference_prefill_kernel(const T* q, const T* k, const T* v, int tokens,
                                                                 int2 ref_heads, float scale, float* ref) {
  __shared__ float qs[D];
  __shared__ float ms[128], ls[128];
  __shared__ float acc_s[128][D + 1];
  const int i = blockIdx.x, slot = blockIdx.y, tid = threadIdx.x;
  const int head = slot == 0 ? ref_heads.x : ref_heads.y;
  if (tid < D) qs[tid] = __half2float(q[(size_t(i) * H + head) * D + tid]);
  __syncthreads();
  float m = -INFINITY, l = 0.f, acc[D];
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  for (int j = tid; j <= i; j += 128) {
    const uint4* kj = reinterpret_cast<const uint4*>(k + (size_t(j) * H + head) * D);
    const uint4* vj = reinterpret_cast<const uint4*>(v + (size_t(j) * H + head) * D);
    float sc = 0.f;
    for (int c = 0; c < D / 8; ++c) {
      const uint4 raw = kj[c];
      const __half* h = reinterpret_cast<const __half*>(&raw);
      for (int e = 0; e < 8; ++e) sc += qs[8 * c + e] * __half2float(h[e]);
    }
    sc *= scale;
    const float nm = fmaxf(m, sc);
    const float a = expf(m - nm), pj = expf(sc - nm);
    l = l * a + pj;
    for (int c = 0; c < D / 8; ++c) {
      const uint4 raw = vj[c];
      const __half* h = reinterpret_cast<const __half*>(&raw);
      for (int e = 0; e < 8; ++e) acc[8 * c + e] = acc[8 * c + e] * a + pj * __half2float(h[e]);
    }
    m = nm;
  }
  ms[tid] = m;
  __syncthreads();
  float mx = -INFINITY;
  for (int t = 0; t < 128; ++t) mx = fmaxf(mx, ms[t]);
  const float a = m == -INFINITY ? 0.f : expf(m - mx);
  ls[tid] = l * a;
  for (int d = 0; d < D; ++d) acc_s[tid][d] = acc[d] * a;
  __syncthreads();
  if (tid < D) {
    float sum = 0.f, o = 0.f;
    for (int t = 0; t < 128; ++t) {
      sum += ls[t];
      o += acc_s[t][tid];
    }
    ref[(size_t(i) * 2 + slot) * D + tid] = o / sum;
  }
}

// Outputs are rounded to fp16 (|out| < 2 here): two correct kernels differ by a few 1e-3 at most. Rows
// past this, or an err32 over twice the mma.sync kernel's (+ 1e-3), are marked CHECK.
constexpr float kPrefillDiffBound = 1e-2f;

// One allocation for every length and check: the largest case's q, caches, outputs and results.
struct PrefillBuffers {
  size_t max_q, max_cache;  // elements
  T *q, *k, *v, *out, *want;
  float* ref;
  int *cu, *lens;
  unsigned* result;
};

PrefillBuffers prefill_buffers(size_t q_elems, size_t cache_elems, int max_tokens) {
  PrefillBuffers b{q_elems, cache_elems};
  PRT_CUDA_CHECK(cudaMalloc(&b.q, q_elems * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&b.k, cache_elems * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&b.v, cache_elems * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&b.out, q_elems * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&b.want, q_elems * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&b.ref, size_t(max_tokens) * 2 * D * sizeof(float)));
  PRT_CUDA_CHECK(cudaMalloc(&b.cu, 65 * sizeof(int)));
  PRT_CUDA_CHECK(cudaMalloc(&b.lens, 64 * sizeof(int)));
  PRT_CUDA_CHECK(cudaMalloc(&b.result, sizeof(unsigned)));
  return b;
}

void free_prefill_buffers(PrefillBuffers& b) {
  for (void* p : {(void*)b.q, (void*)b.k, (void*)b.v, (void*)b.out, (void*)b.want, (void*)b.ref, (void*)b.cu,
                  (void*)b.lens, (void*)b.result})
    cudaFree(p);
}

float read_result(const PrefillBuffers& b) {
  unsigned bits = 0;
  PRT_CUDA_CHECK(cudaMemcpy(&bits, b.result, sizeof(bits), cudaMemcpyDeviceToHost));
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

float diff_vs_want(const PrefillBuffers& b, size_t n) {
  PRT_CUDA_CHECK(cudaMemset(b.result, 0, sizeof(unsigned)));
  max_abs_diff_kernel<<<528, 256>>>(b.out, b.want, n, b.result);
  return read_result(b);
}

// A batch of sequences of n_q new tokens over n_kv keys in caches of cache_len positions, NaN past each
// sequence's keys (a kernel reading a key it must not see makes NaN), on 4 heads.
struct EdgeCase {
  std::vector<int> n_q, n_kv;
  int cache_len;
};

__global__ void poison_cache_tail(T* k, T* v, const int* lens, int cache_len, int heads) {
  const int b = blockIdx.y;
  const size_t row = size_t(cache_len) * heads * D;
  for (size_t i = size_t(lens[b]) * heads * D + blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < row;
       i += size_t(gridDim.x) * blockDim.x) {
    k[b * row + i] = __float2half(NAN);
    v[b * row + i] = __float2half(NAN);
  }
}

// Max |variant - reference| over the edge cases (all rows are real queries).
float edge_diff(const PrefillVariant& variant, const PrefillVariant& reference, PrefillBuffers& b,
                const std::vector<EdgeCase>& cases) {
  constexpr int kHeads = 4;
  float worst = 0.f;
  for (const EdgeCase& c : cases) {
    const int batch = int(c.n_q.size());
    std::vector<int> cu(batch + 1, 0);
    for (int i = 0; i < batch; ++i) cu[i + 1] = cu[i] + c.n_q[i];
    const int tokens = cu[batch];
    const size_t n = size_t(tokens) * kHeads * D;
    fill_random<<<1024, 256>>>(b.q, n, 11);
    fill_random<<<1024, 256>>>(b.k, size_t(batch) * c.cache_len * kHeads * D, 12);
    fill_random<<<1024, 256>>>(b.v, size_t(batch) * c.cache_len * kHeads * D, 13);
    PRT_CUDA_CHECK(cudaMemcpy(b.cu, cu.data(), cu.size() * sizeof(int), cudaMemcpyHostToDevice));
    PRT_CUDA_CHECK(cudaMemcpy(b.lens, c.n_kv.data(), batch * sizeof(int), cudaMemcpyHostToDevice));
    poison_cache_tail<<<dim3(64, batch), 256>>>(b.k, b.v, b.lens, c.cache_len, kHeads);
    const PrefillParams want{b.q, b.k, b.v, b.cu, b.lens, b.want, kHeads, c.cache_len, kScaleLog2};
    const PrefillParams got{b.q, b.k, b.v, b.cu, b.lens, b.out, kHeads, c.cache_len, kScaleLog2};
    PRT_CUDA_CHECK(cudaMemset(b.want, 0xff, n * sizeof(T)));  // NaN
    PRT_CUDA_CHECK(cudaMemset(b.out, 0xff, n * sizeof(T)));
    // The loose grid bound of a caller that does not read cu_seqlens_q: all tokens.
    reference.launch(want, tokens, batch, tokens, 0);
    variant.launch(got, tokens, batch, tokens, 0);
    PRT_CUDA_CHECK(cudaGetLastError());
    worst = std::max(worst, diff_vs_want(b, n));
  }
  return worst;
}

// Time of one launch in ms: the median of 3 samples, each a run of back-to-back launches (~30 ms of
// kernels) between two events, so the host's per-launch work (tensor maps, attributes) overlaps the
// kernels instead of counting (at 2K tokens a launch is ~0.1 ms).
float prefill_ms(const std::function<void()>& run) {
  cudaEvent_t a, e;
  PRT_CUDA_CHECK(cudaEventCreate(&a));
  PRT_CUDA_CHECK(cudaEventCreate(&e));
  auto sample = [&](int n) {
    PRT_CUDA_CHECK(cudaEventRecord(a));
    for (int i = 0; i < n; ++i) run();
    PRT_CUDA_CHECK(cudaEventRecord(e));
    PRT_CUDA_CHECK(cudaEventSynchronize(e));
    float ms = 0.f;
    PRT_CUDA_CHECK(cudaEventElapsedTime(&ms, a, e));
    return ms / n;
  };
  const int n = std::max(3, std::min(200, int(30.f / std::max(sample(2), 1e-3f))));
  float t[3] = {sample(n), sample(n), sample(n)};
  std::sort(t, t + 3);
  PRT_CUDA_CHECK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(e);
  return t[1];
}

void bench_prefill(const std::vector<int>& lengths, const std::string& filter) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<PrefillVariant> all = prefill_variants();
  const PrefillVariant& reference = all[0];
  const PrefillVariant* shipped = nullptr;
  std::vector<const PrefillVariant*> chosen;
  for (const PrefillVariant& v : all)
    if (!shipped && v.name.find("wgmma") != std::string::npos) shipped = &v;
  chosen.push_back(shipped);  // first, always: the base of the ratios
  for (const PrefillVariant& v : all)
    if (&v != &reference && &v != shipped && v.name.find(filter) != std::string::npos) chosen.push_back(&v);
  const int max_len = *std::max_element(lengths.begin(), lengths.end());
  const std::vector<EdgeCase> edges = {
      {{83, 1, 1029, 7, 300, 128}, {83, 1, 1029, 7, 300, 128}, 1032},             // packed, no prefix
      {{7, 83, 1, 0, 200, 129}, {100, 583, 4096, 50, 1200, 4100}, 4103},          // chunks after prefixes
      {{4384, 1000}, {16384, 9001}, 16384},                                       // long chunk, no padding
  };
  size_t q_elems = size_t(max_len) * H * D, cache_elems = q_elems;
  for (const EdgeCase& c : edges) {
    size_t tokens = 0;
    for (int n : c.n_q) tokens += n;
    q_elems = std::max(q_elems, tokens * 4 * D);
    cache_elems = std::max(cache_elems, c.n_q.size() * c.cache_len * 4 * D);
  }
  PrefillBuffers b = prefill_buffers(q_elems, cache_elems, max_len);

  std::printf("\n## prefill edge cases: max |variant - %s| (packed, cached prefixes, NaN past the keys; "
              "fp16 rounding ~1e-3)\n\n| variant | edge diff |\n|---|---|\n",
              reference.name.c_str());
  for (const PrefillVariant* v : chosen) {
    const float diff = edge_diff(*v, reference, b, edges);
    std::printf("| %-60s | %.1e%s |\n", v->name.c_str(), diff, diff <= kPrefillDiffBound ? "" : " CHECK");
  }

  const int2 ref_heads = make_int2(0, 41);
  std::printf("\n## prefill, causal, batch 1, %d heads x %d, fp16: TFLOP/s; diff: max |variant - %s|; "
              "err32: max |variant - fp32 attention| on heads %d and %d\n\n"
              "| tokens | variant | ms | TFLOP/s | / shipped wgmma | diff | err32 |\n|---|---|---|---|---|---|---|\n",
              H, D, reference.name.c_str(), ref_heads.x, ref_heads.y);
  for (const int len : lengths) {
    const size_t n = size_t(len) * H * D;
    fill_random<<<1024, 256>>>(b.q, n, 1);
    fill_random<<<1024, 256>>>(b.k, n, 2);
    fill_random<<<1024, 256>>>(b.v, n, 3);
    const int h_cu[2] = {0, len};
    PRT_CUDA_CHECK(cudaMemcpy(b.cu, h_cu, sizeof(h_cu), cudaMemcpyHostToDevice));
    PRT_CUDA_CHECK(cudaMemcpy(b.lens, &len, sizeof(int), cudaMemcpyHostToDevice));
    reference_prefill_kernel<<<dim3(len, 2), 128>>>(b.q, b.k, b.v, len, ref_heads, 0.125f, b.ref);
    PRT_CUDA_CHECK(cudaGetLastError());
    const PrefillParams want{b.q, b.k, b.v, b.cu, b.lens, b.want, H, len, kScaleLog2};
    const PrefillParams got{b.q, b.k, b.v, b.cu, b.lens, b.out, H, len, kScaleLog2};
    reference.launch(want, len, 1, len, 0);
    const double flops = 4.0 * len * len * H * D / 2;
    auto err32 = [&](const T* out) {
      PRT_CUDA_CHECK(cudaMemset(b.result, 0, sizeof(unsigned)));
      max_abs_err_kernel<<<528, 256>>>(out, b.ref, len, ref_heads, b.result);
      return read_result(b);
    };
    const float ref_ms = prefill_ms([&] { reference.launch(want, len, 1, len, 0); });
    const float ref_err = err32(b.want);
    std::printf("| %5d | %-60s | %8.3f | %4.0f | | | %.1e |\n", len, reference.name.c_str(), ref_ms,
                flops / ref_ms / 1e9, ref_err);
    float shipped_ms = 0.f;
    for (const PrefillVariant* v : chosen) {
      PRT_CUDA_CHECK(cudaMemset(b.out, 0xff, n * sizeof(T)));  // NaN
      v->launch(got, len, 1, len, 0);
      PRT_CUDA_CHECK(cudaGetLastError());
      const float diff = diff_vs_want(b, n);
      const float err = err32(b.out);
      const float ms = prefill_ms([&] { v->launch(got, len, 1, len, 0); });
      if (v == shipped) shipped_ms = ms;
      const bool suspect = !(diff <= kPrefillDiffBound && err <= 2 * ref_err + 1e-3f);
      std::printf("| %5d | %-60s | %8.3f | %4.0f | %5.3f | %.1e | %.1e%s |\n", len, v->name.c_str(), ms,
                  flops / ms / 1e9, shipped_ms / ms, diff, err, suspect ? " CHECK" : "");
    }
  }
  free_prefill_buffers(b);
  std::printf("\n(prefill section: %.0f s)\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

// ---- decode ---------------------------------------------------------------------------------------------

using DecodeLaunch = void (*)(const DecodeParams&, int batch, bool pdl, cudaStream_t);

template <int THREADS, int UNROLL, int MIN_BLOCKS>
void launch_decode(const DecodeParams& p, int batch, bool pdl, cudaStream_t s) {
  attention_decode_split_kernel<T, D, THREADS, UNROLL, MIN_BLOCKS><<<dim3(p.num_splits, H, batch), THREADS, 0, s>>>(p);
  if (p.num_splits == 1) return;
  const auto combine = attention_decode_combine_kernel<T, D>;
  launch_kernel(combine, dim3(H, batch), dim3(D), 0, s, pdl, p);
}

// The bulk-copy kernel (attention_decode_bulk.cuh; one block a split and sequence, all heads) and its
// wide combine (unless !COMBINE: the split kernel's time alone), both under PDL when `pdl`.
template <int STAGE_KEYS, int STAGES, int COPIES = kCompute, bool COMBINE = true, bool DYNAMIC = false>
void launch_decode_bulk(const DecodeParams& p, int batch, bool pdl, cudaStream_t s) {
  static unsigned* claims = [] {
    unsigned* c = nullptr;
    PRT_CUDA_CHECK(cudaMalloc(&c, 1024 * sizeof(unsigned)));
    return c;
  }();
  if (DYNAMIC) PRT_CUDA_CHECK(cudaMemsetAsync(claims, 0, batch * sizeof(unsigned), s));
  constexpr int kVecs = H * D / (kBulkConsumers * kVec);
  constexpr int smem = bulk_decode_smem_bytes<T, kVecs, STAGE_KEYS, STAGES>();
  const auto kernel = attention_decode_bulk_kernel<T, D, kVecs, STAGE_KEYS, STAGES, COPIES, DYNAMIC>;
  static const bool sized = [&] {
    PRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)sized;
  launch_kernel(kernel, dim3(p.num_splits, batch), dim3(kBulkConsumers + 32), smem, s, pdl, p, claims);
  if (p.num_splits == 1 || !COMBINE) return;
  const auto combine = attention_decode_combine_wide_kernel<T, D, 512, DYNAMIC>;
  launch_kernel(combine, dim3(H, batch), dim3(512), 0, s, pdl, p);
}

struct DecodeSets {
  int batch, len, n;
  std::vector<T*> q, k, v;
  T* out;
  int* lens;
  float* ws;
};

std::string format_diff(float diff) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1e", diff);
  return buf;
}

// Checks the variant's output on cache set 0 against `want` (when given) and copies it to `keep` (when
// given), then times it.
void decode_variant(DecodeLaunch launch, const char* name, DecodeSets& d, int splits, bool pdl, const T* want,
                    double copy_tbps, T* keep = nullptr) {
  const size_t out_n = size_t(d.batch) * H * D;
  auto params = [&](int i) {
    const size_t slots = size_t(d.batch) * H * splits;
    return DecodeParams{d.q[i], d.k[i], d.v[i], d.lens, d.out, d.ws, d.ws + slots * D, d.ws + slots * (D + 1),
                        H,      d.len,  splits, kScaleLog2};
  };
  PRT_CUDA_CHECK(cudaMemset(d.out, 0xff, out_n * sizeof(T)));
  launch(params(0), d.batch, pdl, 0);
  PRT_CUDA_CHECK(cudaDeviceSynchronize());
  const float diff = want ? max_abs_diff(d.out, want, out_n) : 0.f;
  if (keep) PRT_CUDA_CHECK(cudaMemcpy(keep, d.out, out_n * sizeof(T), cudaMemcpyDeviceToDevice));
  // One graph of 24 calls cycling through the cache copies, as a captured decode step would run them.
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaGraph_t g;
  cudaGraphExec_t ge;
  constexpr int kCalls = 24;
  PRT_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kCalls; ++i) launch(params(i % d.n), d.batch, pdl, s);
  PRT_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  PRT_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
  const float ms = median_ms([&] { cudaGraphLaunch(ge, 0); }, 20) / kCalls;
  const double bytes = 2.0 * d.batch * d.len * H * D * sizeof(T);
  std::printf("| decode b%d L%-5d | %-30s | combine %-5s | splits %2d | %7.2f us | %5.2f TB/s | %3.0f%% copy "
              "| %s |\n",
              d.batch, d.len, name, pdl ? "pdl" : "plain", splits, ms * 1e3, bytes / ms / 1e9,
              100 * bytes / ms / 1e9 / copy_tbps, want   ? ("diff " + format_diff(diff)).c_str()
              : keep ? "reference"
                     : "not checked");
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
}

void bench_decode(int batch, int len, double copy_tbps, int sms) {
  DecodeSets d{batch, len, 0, {}, {}, {}, nullptr, nullptr, nullptr};
  const size_t kv_n = size_t(batch) * len * H * D;
  d.n = std::max<int>(2, int(std::ceil(400e6 / (2.0 * kv_n * sizeof(T)))));
  for (int i = 0; i < d.n; ++i) {
    d.q.push_back(random_buffer(size_t(batch) * H * D, 10 + i));
    d.k.push_back(random_buffer(kv_n, 100 + i));
    d.v.push_back(random_buffer(kv_n, 200 + i));
  }
  T* want;
  PRT_CUDA_CHECK(cudaMalloc(&d.out, size_t(batch) * H * D * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&want, size_t(batch) * H * D * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&d.lens, batch * sizeof(int)));
  PRT_CUDA_CHECK(cudaMalloc(&d.ws, size_t(batch) * H * 2 * sms * (D + 2) * sizeof(float)));
  std::vector<int> lens(batch, len);
  cudaMemcpy(d.lens, lens.data(), batch * sizeof(int), cudaMemcpyHostToDevice);
  // The launcher's choice (csrc/attention.cu: decode_shape) first, then its neighbours.
  const int splits128 = std::max(1, std::min({sms * 4 / (batch * H), int(ceil_div(len, 128)), 64}));
  const bool wide = splits128 >= 2;
  const int splits = wide ? splits128 / 2 : 1;
  if (wide)
    decode_variant(launch_decode<256, 4, 4>, "shipped: 256 thr, unroll 4", d, splits, true, nullptr, copy_tbps, want);
  else
    decode_variant(launch_decode<128, 4, 8>, "shipped: 128 thr, unroll 4", d, splits, true, nullptr, copy_tbps, want);
  if (wide) {
    decode_variant(launch_decode<256, 4, 4>, "256 thr, unroll 4", d, splits, false, want, copy_tbps);
    for (int n : {splits - 1, splits + 1, splits * 2})
      if (n >= 1) decode_variant(launch_decode<256, 4, 4>, "256 thr, unroll 4", d, n, true, want, copy_tbps);
    decode_variant(launch_decode<128, 4, 8>, "128 thr, unroll 4", d, splits128, true, want, copy_tbps);
    decode_variant(launch_decode<128, 4, 8>, "128 thr, unroll 4", d, splits128 * 2, true, want, copy_tbps);
    decode_variant(launch_decode<512, 4, 2>, "512 thr, unroll 4", d, std::max(1, splits / 2), true, want, copy_tbps);
    decode_variant(launch_decode<512, 4, 2>, "512 thr, unroll 4", d, splits, true, want, copy_tbps);
    decode_variant(launch_decode<256, 8, 2>, "256 thr, unroll 8", d, splits, true, want, copy_tbps);
    decode_variant(launch_decode<256, 8, 2>, "256 thr, unroll 8", d, splits * 2, true, want, copy_tbps);
    decode_variant(launch_decode<128, 8, 4>, "128 thr, unroll 8", d, splits128, true, want, copy_tbps);
    decode_variant(launch_decode<128, 8, 4>, "128 thr, unroll 8", d, splits128 * 2, true, want, copy_tbps);
  } else {
    decode_variant(launch_decode<256, 4, 4>, "256 thr, unroll 4", d, 1, true, want, copy_tbps);
    decode_variant(launch_decode<128, 4, 8>, "128 thr, unroll 4", d, 2, true, want, copy_tbps);
    decode_variant(launch_decode<128, 2, 8>, "128 thr, unroll 2", d, 1, true, want, copy_tbps);
    decode_variant(launch_decode<64, 4, 16>, "64 thr, unroll 4", d, 1, true, want, copy_tbps);
    decode_variant(launch_decode<64, 8, 8>, "64 thr, unroll 8", d, 1, true, want, copy_tbps);
  }
  // Bulk copies, all heads a block, one block an SM: splits = SMs / batch (and half, twice that).
  const int bulk_splits = std::max(1, sms / batch);
  decode_variant(launch_decode_bulk<1, 12>, "bulk: 1 key x 12 stages", d, bulk_splits, true, want, copy_tbps);
  decode_variant(launch_decode_bulk<4, 3>, "bulk: 4 keys x 3 stages", d, bulk_splits, true, want, copy_tbps);
  if (bulk_splits > 1)
    decode_variant(launch_decode_bulk<1, 12>, "bulk: 1 key x 12 stages", d, bulk_splits / 2, true, want, copy_tbps);
  decode_variant(launch_decode_bulk<1, 12>, "bulk: 1 key x 12 stages", d, 2 * bulk_splits, true, want, copy_tbps);
  decode_variant(launch_decode_bulk<1, 12>, "bulk: 1 key x 12, plain", d, bulk_splits, false, want, copy_tbps);
  // Unchecked timings: without the combine, and the copies alone.
  decode_variant(launch_decode_bulk<4, 3, kCompute, false>, "bulk: 4 x 3, no combine", d, bulk_splits, true, nullptr,
                 copy_tbps);
  decode_variant(launch_decode_bulk<4, 3, kCopyKV, false>, "bulk: 4 x 3, copies only", d, bulk_splits, true, nullptr,
                 copy_tbps);
  decode_variant(launch_decode_bulk<1, 12, kCopyKV, false>, "bulk: 1 x 12, copies only", d, bulk_splits, true, nullptr,
                 copy_tbps);
  decode_variant(launch_decode_bulk<1, 12, kCopyKVShifted, false>, "bulk: 1 x 12, copies, V shifted", d, bulk_splits,
                 true, nullptr, copy_tbps);
  // Stages claimed dynamically (with a memset of the claim counters before each call, which the static rows
  // do not pay).
  decode_variant(launch_decode_bulk<1, 12, kCompute, true, true>, "bulk: 1 x 12, dynamic", d, bulk_splits, true, want,
                 copy_tbps);
  decode_variant(launch_decode_bulk<4, 3, kCompute, true, true>, "bulk: 4 x 3, dynamic", d, bulk_splits, true, want,
                 copy_tbps);
  decode_variant(launch_decode_bulk<1, 12, kCopyKV, false, true>, "bulk: 1 x 12, dynamic, copies", d, bulk_splits,
                 true, nullptr, copy_tbps);
  // Half the bytes: the printed rate is twice the real one.
  decode_variant(launch_decode_bulk<1, 12, kCopyK, false>, "bulk: 1 x 12, K only (rate / 2)", d, bulk_splits, true,
                 nullptr, copy_tbps);
  for (int i = 0; i < d.n; ++i) {
    cudaFree(d.q[i]);
    cudaFree(d.k[i]);
    cudaFree(d.v[i]);
  }
  for (void* p : {(void*)d.out, (void*)want, (void*)d.lens, (void*)d.ws}) cudaFree(p);
}

double copy_bandwidth() {
  const size_t n = size_t(1) << 29;  // 1 GiB of fp16
  T* a = random_buffer(n, 7);
  T* b;
  PRT_CUDA_CHECK(cudaMalloc(&b, n * sizeof(T)));
  const float ms = median_ms([&] { cudaMemcpyAsync(b, a, n * sizeof(T), cudaMemcpyDeviceToDevice); }, 20);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * n * sizeof(T) / ms / 1e9;
}

// Usage: attention_variants [prefill [LENGTHS [FILTER]] | decode] (both sections by default).
int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // rows show as they finish, also when a timeout cuts the run
  const std::string only = argc > 1 ? argv[1] : "";
  std::vector<int> lengths = {2048, 4096, 8192, 16384};
  if (only == "prefill" && argc > 2) {
    lengths.clear();
    for (const char* p = argv[2]; *p != '\0';) {
      char* end = nullptr;
      lengths.push_back(int(std::strtol(p, &end, 10)));
      p = *end == ',' ? end + 1 : end;
      if (lengths.back() <= 0 || (*end != ',' && *end != '\0')) {
        std::fprintf(stderr, "lengths: comma-separated positive integers, got '%s'\n", argv[2]);
        return 2;
      }
    }
  }
  const std::string filter = only == "prefill" && argc > 3 ? argv[3] : "";
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a redirected log at once (a run may be cut short)
  cudaDeviceProp prop;
  PRT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double copy = copy_bandwidth();
  std::printf("# attention variants — %s, %d SMs, copy %.2f TB/s\n", prop.name, prop.multiProcessorCount, copy);
  if (only != "decode") bench_prefill(lengths, filter);
  if (only != "prefill") {
    bench_decode(1, 2048, copy, prop.multiProcessorCount);
    bench_decode(1, 8192, copy, prop.multiProcessorCount);
    bench_decode(1, 16384, copy, prop.multiProcessorCount);
    bench_decode(8, 2048, copy, prop.multiProcessorCount);
    // The engine's batch decode at short contexts (one split a row).
    bench_decode(8, 128, copy, prop.multiProcessorCount);
    bench_decode(32, 128, copy, prop.multiProcessorCount);
  }
  return 0;
}
