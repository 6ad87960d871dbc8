// Kernel-development harness for the attention kernels: runs template variants (tile shapes, unroll,
// split counts; for prefill also the Hopper wgmma kernel's warpgroups, key tile, stages and issue turns)
// on the Persimmon layer shape (64 heads x 64, fp16), checks each against the shipped mma.sync
// configuration (which tests/test_attention_*.py check against the fp32 reference) before timing it,
// and prints TFLOP/s (prefill, causal) or TB/s on the KV bytes (decode) beside a device copy.
// Torch-free; build and run on the GPU machine:
//   nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        benchmarks/attention_variants.cu -o /tmp/attention_variants && /tmp/attention_variants [prefill|decode]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common.cuh"
#include "kernels/attention_decode.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/attention_prefill_sm90.cuh"

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

// ---- prefill --------------------------------------------------------------------------------------------

template <typename Tile>
void run_prefill(const PrefillParams& p, int T_len, cudaStream_t s) {
  auto kernel = attention_prefill_kernel<T, Tile>;
  PRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  kernel<<<dim3(H, ceil_div(T_len, Tile::kBlockM), 1), Tile::kThreads, Tile::kSmemBytes, s>>>(p);
}

using Shipped = PrefillTile<64, 2, 4, 64>;

template <typename Tile>
void prefill_variant(const char* name, int T_len, const T* q, const T* k, const T* v, const int* cu, const int* lens,
                     T* out, const T* want) {
  PRT_CUDA_CHECK(cudaMemset(out, 0xff, size_t(T_len) * H * D * sizeof(T)));  // NaN
  const PrefillParams p{q, k, v, cu, lens, out, H, T_len, kScaleLog2};
  run_prefill<Tile>(p, T_len, 0);
  PRT_CUDA_CHECK(cudaDeviceSynchronize());
  const float diff = want ? max_abs_diff(out, want, size_t(T_len) * H * D) : 0.f;
  const double flops = 4.0 * T_len * T_len * H * D / 2;
  const float ms = median_ms([&] { run_prefill<Tile>(p, T_len, 0); }, 10);
  std::printf("| prefill %5d | %-34s | %8.3f ms | %6.0f TFLOP/s | diff %.1e |\n", T_len, name, ms, flops / ms / 1e9,
              diff);
}

// The wgmma kernel (sm_90a), batch 1: one sequence of T_len queries over T_len keys.
template <typename Cfg>
void prefill_sm90_variant(const char* name, int T_len, const T* q, const T* k, const T* v, const int* cu,
                          const int* lens, T* out, const T* want) {
  PRT_CUDA_CHECK(cudaMemset(out, 0xff, size_t(T_len) * H * D * sizeof(T)));  // NaN
  const PrefillParams p{q, k, v, cu, lens, out, H, T_len, kScaleLog2};
  auto run = [&] { launch_attention_prefill_sm90<T, Cfg>(p, T_len, 1, T_len, 0); };
  run();
  PRT_CUDA_CHECK(cudaDeviceSynchronize());
  const float diff = max_abs_diff(out, want, size_t(T_len) * H * D);
  const double flops = 4.0 * T_len * T_len * H * D / 2;
  const float ms = median_ms(run, 10);
  std::printf("| prefill %5d | %-34s | %8.3f ms | %6.0f TFLOP/s | diff %.1e |\n", T_len, name, ms, flops / ms / 1e9,
              diff);
}

void bench_prefill(int T_len) {
  const size_t n = size_t(T_len) * H * D;
  T* q = random_buffer(n, 1);
  T* k = random_buffer(n, 2);
  T* v = random_buffer(n, 3);
  T *out, *want;
  int *cu, *lens;
  PRT_CUDA_CHECK(cudaMalloc(&out, n * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&want, n * sizeof(T)));
  PRT_CUDA_CHECK(cudaMalloc(&cu, 2 * sizeof(int)));
  PRT_CUDA_CHECK(cudaMalloc(&lens, sizeof(int)));
  const int h_cu[2] = {0, T_len};
  cudaMemcpy(cu, h_cu, sizeof(h_cu), cudaMemcpyHostToDevice);
  cudaMemcpy(lens, &T_len, sizeof(int), cudaMemcpyHostToDevice);
  prefill_variant<Shipped>("shipped: warp 2x16 rows, 4 warps, N64", T_len, q, k, v, cu, lens, want, nullptr);
  prefill_variant<PrefillTile<64, 1, 8, 64>>("warp 16 rows, 8 warps, N64", T_len, q, k, v, cu, lens, out, want);
  prefill_variant<PrefillTile<64, 2, 4, 32>>("warp 2x16 rows, 4 warps, N32", T_len, q, k, v, cu, lens, out, want);
  prefill_variant<PrefillTile<64, 1, 4, 128>>("warp 16 rows, 4 warps, N128", T_len, q, k, v, cu, lens, out, want);
  // wgmma: consumer warpgroups (64 rows each), key tile, K/V stages, issue turns. The first is the one
  // csrc/attention.cu ships (PrefillSm90Tile).
  prefill_sm90_variant<PrefillSm90Config<2, 128, 3, true>>("wgmma 2 WG, N128, 3 stages, turns", T_len, q, k, v, cu,
                                                            lens, out, want);
  prefill_sm90_variant<PrefillSm90Config<2, 128, 3, false>>("wgmma 2 WG, N128, 3 stages", T_len, q, k, v, cu, lens,
                                                             out, want);
  prefill_sm90_variant<PrefillSm90Config<2, 128, 2, true>>("wgmma 2 WG, N128, 2 stages, turns", T_len, q, k, v, cu,
                                                            lens, out, want);
  prefill_sm90_variant<PrefillSm90Config<2, 64, 2, true>>("wgmma 2 WG, N64, 2 stages, turns", T_len, q, k, v, cu,
                                                           lens, out, want);
  prefill_sm90_variant<PrefillSm90Config<3, 128, 2, true>>("wgmma 3 WG, N128, 2 stages, turns", T_len, q, k, v, cu,
                                                            lens, out, want);
  prefill_sm90_variant<PrefillSm90Config<3, 128, 2, false>>("wgmma 3 WG, N128, 2 stages", T_len, q, k, v, cu, lens,
                                                             out, want);
  prefill_sm90_variant<PrefillSm90Config<1, 128, 2, false, 2>>("wgmma 1 WG, N128, 2 blocks/SM", T_len, q, k, v, cu,
                                                                lens, out, want);
  prefill_sm90_variant<PrefillSm90Config<2, 64, 2, true, 2>>("wgmma 2 WG, N64, turns, 2 blocks/SM", T_len, q, k, v,
                                                              cu, lens, out, want);
  for (void* p : {(void*)q, (void*)k, (void*)v, (void*)out, (void*)want, (void*)cu, (void*)lens}) cudaFree(p);
}

// ---- decode ---------------------------------------------------------------------------------------------

template <int THREADS, int UNROLL, int MIN_BLOCKS>
void launch_decode(const DecodeParams& p, int batch, bool pdl, cudaStream_t s) {
  attention_decode_split_kernel<T, D, THREADS, UNROLL, MIN_BLOCKS><<<dim3(p.num_splits, H, batch), THREADS, 0, s>>>(p);
  if (p.num_splits == 1) return;
  const auto combine = attention_decode_combine_kernel<T, D>;
  launch_kernel(combine, dim3(H, batch), dim3(D), 0, s, pdl, p);
}

struct DecodeSets {
  int batch, len, n;
  std::vector<T*> q, k, v;
  T* out;
  int* lens;
  float* ws;
};

template <int THREADS, int UNROLL, int MIN_BLOCKS>
// Checks the variant's output on cache set 0 against `want` (when given) and copies it to `keep` (when
// given), then times it.
void decode_variant(const char* name, DecodeSets& d, int splits, bool pdl, const T* want, double copy_tbps,
                    T* keep = nullptr) {
  const size_t out_n = size_t(d.batch) * H * D;
  auto params = [&](int i) {
    const size_t slots = size_t(d.batch) * H * splits;
    return DecodeParams{d.q[i], d.k[i], d.v[i], d.lens, d.out, d.ws, d.ws + slots * D, d.ws + slots * (D + 1),
                        H, d.len, splits, kScaleLog2};
  };
  PRT_CUDA_CHECK(cudaMemset(d.out, 0xff, out_n * sizeof(T)));
  launch_decode<THREADS, UNROLL, MIN_BLOCKS>(params(0), d.batch, pdl, 0);
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
  for (int i = 0; i < kCalls; ++i) launch_decode<THREADS, UNROLL, MIN_BLOCKS>(params(i % d.n), d.batch, pdl, s);
  PRT_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  PRT_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
  const float ms = median_ms([&] { cudaGraphLaunch(ge, 0); }, 20) / kCalls;
  const double bytes = 2.0 * d.batch * d.len * H * D * sizeof(T);
  std::printf("| decode b%d L%-5d | %-26s | combine %-5s | splits %2d | %7.2f us | %5.2f TB/s | %3.0f%% copy "
              "| diff %.1e |\n",
              d.batch, d.len, name, pdl ? "pdl" : "plain", splits, ms * 1e3, bytes / ms / 1e9,
              100 * bytes / ms / 1e9 / copy_tbps, diff);
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
  PRT_CUDA_CHECK(cudaMalloc(&d.ws, size_t(batch) * H * 128 * (D + 2) * sizeof(float)));
  std::vector<int> lens(batch, len);
  cudaMemcpy(d.lens, lens.data(), batch * sizeof(int), cudaMemcpyHostToDevice);
  // The launcher's choice (csrc/attention.cu: decode_shape) first, then its neighbours.
  const int splits128 = std::max(1, std::min({sms * 4 / (batch * H), int(ceil_div(len, 128)), 64}));
  const bool wide = splits128 >= 2;
  const int splits = wide ? splits128 / 2 : 1;
  if (wide) decode_variant<256, 4, 4>("shipped: 256 thr, unroll 4", d, splits, true, nullptr, copy_tbps, want);
  else decode_variant<128, 4, 8>("shipped: 128 thr, unroll 4", d, splits, true, nullptr, copy_tbps, want);
  if (wide) {
    decode_variant<256, 4, 4>("256 thr, unroll 4", d, splits, false, want, copy_tbps);
    for (int n : {splits - 1, splits + 1, splits * 2})
      if (n >= 1) decode_variant<256, 4, 4>("256 thr, unroll 4", d, n, true, want, copy_tbps);
    decode_variant<128, 4, 8>("128 thr, unroll 4", d, splits128, true, want, copy_tbps);
    decode_variant<512, 4, 2>("512 thr, unroll 4", d, std::max(1, splits / 2), true, want, copy_tbps);
    decode_variant<512, 4, 2>("512 thr, unroll 4", d, splits, true, want, copy_tbps);
  } else {
    decode_variant<256, 4, 4>("256 thr, unroll 4", d, 1, true, want, copy_tbps);
    decode_variant<128, 4, 8>("128 thr, unroll 4", d, 2, true, want, copy_tbps);
    decode_variant<128, 2, 8>("128 thr, unroll 2", d, 1, true, want, copy_tbps);
  }
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

// Usage: attention_variants [prefill|decode] (both by default).
int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a redirected log at once (a run may be cut short)
  cudaDeviceProp prop;
  PRT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double copy = copy_bandwidth();
  std::printf("# attention variants — %s, %d SMs, copy %.2f TB/s\n", prop.name, prop.multiProcessorCount, copy);
  if (only != "decode")
    for (int t : {2048, 4096, 8192, 16384}) bench_prefill(t);
  if (only != "prefill") {
    bench_decode(1, 2048, copy, prop.multiProcessorCount);
    bench_decode(1, 16384, copy, prop.multiProcessorCount);
    bench_decode(8, 2048, copy, prop.multiProcessorCount);
  }
  return 0;
}
