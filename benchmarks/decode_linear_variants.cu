// Development harness for the decode GEMV (csrc/kernels/decode_linear.cuh): runs several tile
// configurations on the Persimmon-8B decode shapes, checks each against an fp32 reference before
// timing it, and prints achieved GB/s beside a measured device-to-device copy. Torch-free; fp16.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --use_fast_math -Icsrc \
//        -o build/dev/decode_linear_variants benchmarks/decode_linear_variants.cu
//   build/dev/decode_linear_variants            # all shapes, M = 1, 8, 16, 32
//   build/dev/decode_linear_variants 16 32      # only these M
//
// Timing: a CUDA graph of kLaunches launches, each on the next of several weight buffers (together
// well over the 50 MB L2), replayed kReps times; the median replay / kLaunches is one launch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/decode_linear.cuh"

using namespace persimmon_rt;
using gemv::DecodeLinearParams;
using gemv::GemvConfig;

namespace {

constexpr int kLaunches = 20;
constexpr int kReps = 25;
constexpr int kMaxRows = 32;                         // x / residual / out buffers hold this many rows
constexpr size_t kRotateBytes = size_t(256) << 20;  // weights rotated over at least this many bytes

#define CHECK(expr) PRT_CUDA_CHECK(expr)

__device__ uint32_t hash32(uint64_t i, uint32_t seed) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + seed;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}

// Uniform in [-scale, scale).
__global__ void fill_random(__half* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2half_rn((hash32(i, seed) * (1.f / 4294967296.f) * 2.f - 1.f) * scale);
}

// One warp per output feature n: fp32 dot products for every row m, then the same epilogue.
__global__ void reference_kernel(DecodeLinearParams p, float* out) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= p.N) return;
  const __half* w = static_cast<const __half*>(p.weight) + n * p.K;
  for (int m = 0; m < p.M; ++m) {
    const __half* x = static_cast<const __half*>(p.x) + m * p.ldx;
    float s = 0.f;
    for (int k = lane; k < p.K; k += 32) s += __half2float(w[k]) * __half2float(x[k]);
    s = group_sum<32>(s);
    if (lane == 0) {
      if (p.bias) s += __half2float(static_cast<const __half*>(p.bias)[n]);
      if (p.relu2) s = s < 0.f ? 0.f : s * s;
      if (p.residual) s += __half2float(static_cast<const __half*>(p.residual)[m * int64_t(p.N) + n]);
      out[m * int64_t(p.N) + n] = s;
    }
  }
}

struct Shape {
  const char* name;
  int N, K;
  bool bias, residual, relu2, out_fp32;
};

struct Variant {
  std::string name;
  int max_m;
  void (*launch)(const DecodeLinearParams&, bool out_fp32, cudaStream_t);
};

template <typename Cfg>
void launch_cfg(const DecodeLinearParams& p, bool out_fp32, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, Cfg::kRowsPerBlock)));
  if (out_fp32)
    gemv::decode_linear_kernel<__half, float, Cfg><<<grid, Cfg::kThreads, 0, s>>>(p);
  else
    gemv::decode_linear_kernel<__half, __half, Cfg><<<grid, Cfg::kThreads, 0, s>>>(p);
}

template <int RT, int MT, int J, int W, int MINB, bool L2>
Variant variant() {
  char buf[96];
  snprintf(buf, sizeof buf, "RT%d MT%d J%d W%d B%d%s", RT, MT, J, W, MINB, L2 ? "" : " noL2pf");
  return {buf, 8 * MT, &launch_cfg<GemvConfig<RT, MT, J, W, MINB, L2>>};
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Milliseconds per launch of `fn(i)` (i = launch index), from graph replays.
template <typename F>
float time_graph(cudaStream_t s, F fn) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  fn(0);  // warm-up outside the capture
  CHECK(cudaStreamSynchronize(s));
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kLaunches; ++i) fn(i);
  CHECK(cudaStreamEndCapture(s, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaGraphLaunch(exec, s));
  std::vector<float> ms;
  for (int r = 0; r < kReps; ++r) {
    CHECK(cudaEventRecord(a, s));
    CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t / kLaunches);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  return median(ms);
}

}  // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s;
  CHECK(cudaStreamCreate(&s));

  // Ceiling: device-to-device copy of 1 GiB, bytes read + written.
  const size_t copy_bytes = size_t(1) << 30;
  void *src, *dst;
  CHECK(cudaMalloc(&src, copy_bytes));
  CHECK(cudaMalloc(&dst, copy_bytes));
  CHECK(cudaMemset(src, 1, copy_bytes));
  const float copy_ms = time_graph(s, [&](int) { CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, s)); });
  const double copy_gbs = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
  printf("%s, %d SMs, L2 %d MB: device copy %.0f GB/s\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20,
         copy_gbs);

  const std::vector<Shape> shapes = {
      {"qkv 12288x4096", 12288, 4096, true, false, false, false},
      {"dense 4096x4096", 4096, 4096, true, true, false, false},
      {"mlp_up 16384x4096", 16384, 4096, true, false, true, false},
      {"mlp_down 4096x16384", 4096, 16384, true, true, false, false},
      {"lm_head 262144x4096", 262144, 4096, false, false, false, true},
  };
  const std::vector<Variant> variants = {
      variant<1, 1, 4, 8, 3, true>(),  variant<1, 1, 4, 8, 3, false>(), variant<1, 1, 8, 8, 2, true>(),
      variant<1, 1, 2, 8, 4, true>(),  variant<1, 1, 4, 4, 6, true>(),  variant<1, 1, 4, 16, 1, true>(),
      variant<1, 1, 2, 16, 2, true>(), variant<2, 1, 4, 8, 2, true>(),  variant<2, 1, 2, 8, 3, true>(),
      variant<1, 2, 4, 8, 3, true>(),  variant<1, 2, 2, 8, 4, true>(),  variant<2, 2, 2, 8, 3, true>(),
      variant<2, 2, 4, 8, 2, true>(),  variant<1, 2, 4, 16, 1, true>(),  variant<1, 4, 2, 8, 2, true>(),
      variant<1, 4, 2, 8, 3, true>(),  variant<1, 4, 4, 8, 2, true>(),  variant<1, 4, 1, 8, 4, true>(),
      variant<1, 4, 2, 16, 1, true>(),
      // 16 and 32 rows with 2 or 4 tiles a block: each x fragment serves more weight rows, so the x
      // re-read from L2 per weight byte falls by RT (RT * MT * WARPS <= 96 keeps the partial sums within
      // 48 KB of static shared memory).
      variant<2, 2, 2, 16, 1, true>(), variant<2, 2, 1, 8, 3, true>(), variant<4, 2, 1, 8, 2, true>(),
      variant<4, 2, 2, 8, 1, true>(),  variant<4, 2, 2, 4, 3, true>(), variant<4, 2, 1, 4, 4, true>(),
      variant<2, 4, 1, 8, 2, true>(),  variant<2, 4, 2, 8, 1, true>(), variant<2, 4, 1, 4, 4, true>(),
      variant<4, 4, 1, 4, 3, true>(),  variant<4, 4, 2, 4, 2, true>(),
  };
  // Rows to run: the command line's (e.g. `16 32`), else all.
  std::vector<int> ms_ = {1, 8, 16, 32};
  if (argc > 1) {
    ms_.clear();
    for (int i = 1; i < argc; ++i) ms_.push_back(std::atoi(argv[i]));
  }

  printf("%-22s %3s  %-22s %9s %8s %7s %9s\n", "shape", "M", "variant", "us", "GB/s", "%copy", "max_err");
  int failures = 0;
  for (const Shape& sh : shapes) {
    const size_t w_elems = size_t(sh.N) * sh.K;
    const int nbuf = static_cast<int>(std::max<size_t>(2, (kRotateBytes + w_elems * 2 - 1) / (w_elems * 2)));
    std::vector<__half*> w(nbuf);
    for (int i = 0; i < nbuf; ++i) {
      CHECK(cudaMalloc(&w[i], w_elems * 2));
      fill_random<<<1024, 256, 0, s>>>(w[i], w_elems, 100 + i, 1.f / 64);  // |x W^T| of order 1
    }
    __half *x, *bias, *residual;
    void* out;
    float* ref;
    CHECK(cudaMalloc(&x, size_t(kMaxRows) * sh.K * 2));
    CHECK(cudaMalloc(&bias, size_t(sh.N) * 2));
    CHECK(cudaMalloc(&residual, size_t(kMaxRows) * sh.N * 2));
    CHECK(cudaMalloc(&out, size_t(kMaxRows) * sh.N * 4));
    CHECK(cudaMalloc(&ref, size_t(kMaxRows) * sh.N * 4));
    fill_random<<<64, 256, 0, s>>>(x, size_t(kMaxRows) * sh.K, 7, 1.f);
    fill_random<<<64, 256, 0, s>>>(bias, sh.N, 8, 0.5f);
    fill_random<<<64, 256, 0, s>>>(residual, size_t(kMaxRows) * sh.N, 9, 1.f);
    std::vector<float> host_out(size_t(kMaxRows) * sh.N), host_ref(size_t(kMaxRows) * sh.N);
    for (int M : ms_) {
      DecodeLinearParams p{x, w[0], sh.bias ? bias : nullptr, sh.residual ? residual : nullptr, out, sh.K, M, sh.N,
                           sh.K, sh.relu2};
      reference_kernel<<<ceil_div(sh.N, 8), 256, 0, s>>>(p, ref);
      CHECK(cudaGetLastError());
      CHECK(cudaMemcpyAsync(host_ref.data(), ref, size_t(M) * sh.N * 4, cudaMemcpyDeviceToHost, s));
      CHECK(cudaStreamSynchronize(s));
      float ref_max = 0.f;
      for (size_t i = 0; i < size_t(M) * sh.N; ++i) ref_max = std::max(ref_max, std::abs(host_ref[i]));
      const double bytes = double(w_elems) * 2 + double(M) * sh.K * 2 + (sh.bias ? sh.N * 2.0 : 0.0) +
                           (sh.residual ? double(M) * sh.N * 2 : 0.0) + double(M) * sh.N * (sh.out_fp32 ? 4 : 2);
      for (const Variant& v : variants) {
        if (M > v.max_m || (M <= 8 && v.max_m > 8)) continue;
        CHECK(cudaMemsetAsync(out, 0xff, size_t(kMaxRows) * sh.N * 4, s));  // NaN in fp16 and fp32
        v.launch(p, sh.out_fp32, s);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpyAsync(host_out.data(), out, size_t(M) * sh.N * (sh.out_fp32 ? 4 : 2), cudaMemcpyDeviceToHost,
                              s));
        CHECK(cudaStreamSynchronize(s));
        float err = 0.f;
        for (size_t i = 0; i < size_t(M) * sh.N; ++i) {
          const float o = sh.out_fp32 ? host_out[i] : __half2float(reinterpret_cast<const __half*>(host_out.data())[i]);
          const float e = std::abs(o - host_ref[i]);
          err = (e == e) ? std::max(err, e) : INFINITY;
        }
        // fp16 output: half an ulp of the largest value, plus accumulation-order slack.
        const float tol = (sh.out_fp32 ? 1e-5f : 1e-3f) * ref_max + 1e-4f;
        const bool ok = err <= tol;
        failures += !ok;
        const float t_ms = time_graph(s, [&](int i) {
          DecodeLinearParams pi = p;
          pi.weight = w[i % nbuf];
          v.launch(pi, sh.out_fp32, s);
        });
        const double gbs = bytes / (t_ms * 1e-3) / 1e9;
        printf("%-22s %3d  %-22s %9.2f %8.0f %6.1f%% %9.2e%s\n", sh.name, M, v.name.c_str(), t_ms * 1e3, gbs,
               100.0 * gbs / copy_gbs, err, ok ? "" : "  FAIL");
      }
    }
    for (auto* b : w) CHECK(cudaFree(b));
    CHECK(cudaFree(x));
    CHECK(cudaFree(bias));
    CHECK(cudaFree(residual));
    CHECK(cudaFree(out));
    CHECK(cudaFree(ref));
  }
  printf("%s\n", failures ? "SOME VARIANTS FAILED" : "all variants match the reference");
  return failures ? 1 : 0;
}
