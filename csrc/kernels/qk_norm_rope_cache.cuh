// Fused QK-LayerNorm + NeoX rotary + KV-cache write, reading the head-major fused projection in place.
//
//   q_out[t, h]             = rope(LN(q[t, h]; q_weight, q_bias), pos[t])
//   k_cache[slot[t], h]     = rope(LN(k[t, h]; k_weight, k_bias), pos[t])
//   v_cache[slot[t], h]     = v[t, h]
//
// Grid (token, head block). A group of G lanes (G = next power of two >= D/8, at most a warp) owns one
// (token, head) unit: each lane holds 8 consecutive dims of q, k and v (one 16-byte load each), the
// LayerNorm statistics are group shuffles, and the rotate-half partner comes through shared memory (the
// partner of dim i is i +- R/2, which need not be in a lane at a fixed shuffle distance when R/2 % 8 != 0).
// cos/sin of the token's R/2 angles are computed once per block into shared memory (rope_sincos).
#pragma once

#include <cstdint>
#include <cstdio>

#include "common.cuh"
#include "ptx.cuh"

namespace persimmon_rt {

struct QkNormRopeCacheParams {
  const void* qkv;           // [T, H, 3, D]  strides (stride_t, stride_h, stride_s, 1)
  const void* positions;     // [T] int32 / int64
  const float* inv_freq;     // [R / 2]
  const void* q_weight;      // [D] or null (null: no LayerNorm)
  const void* q_bias;        // [D] or null
  const void* k_weight;      // [D] or null
  const void* k_bias;        // [D] or null
  void* k_cache;             // [num_slots, H, D]
  void* v_cache;             // [num_slots, H, D]
  const void* slot_mapping;  // [T] int32 / int64
  void* q_out;               // [T, H, D]
  int64_t num_slots;
  int64_t stride_t, stride_h, stride_s;
  int num_heads, head_dim, rotary_dim;
  bool positions_int64, slots_int64;
  float eps;
};

constexpr int kQkMaxThreads = 512;

// Dynamic shared memory: cos[R/2], sin[R/2], then per group a [2][R] scratch for the q and k rotary dims.
inline size_t qk_norm_rope_cache_smem_bytes(int rotary_dim, int groups) {
  return sizeof(float) * (static_cast<size_t>(rotary_dim) + static_cast<size_t>(groups) * 2 * rotary_dim);
}

// sin and cos of an fp32 angle with absolute error < 1e-7 (checked against fp64 for |x| <= 1e6).
// --use_fast_math would turn sincosf into __sincosf, whose error grows with |x| (angles reach 1e4+
// radians at long positions); so: reduce by pi/2 in double (k * pi/2 carries 53 bits), then
// minimax polynomials on [-pi/4, pi/4] in fp32.
__device__ __forceinline__ void rope_sincos(float x, float& s, float& c) {
  const double k = rint(static_cast<double>(x) * 0.63661977236758134308);       // 2 / pi
  const float r = static_cast<float>(fma(-k, 1.57079632679489661923, static_cast<double>(x)));
  const float z = r * r;
  const float sr = fmaf(fmaf(fmaf(-1.9515295891e-4f, z, 8.3321608736e-3f), z, -1.6666654611e-1f) * z, r, r);
  const float cr = fmaf(fmaf(fmaf(2.443315711809948e-5f, z, -1.388731625493765e-3f), z, 4.166664568298827e-2f) * z,
                        z, fmaf(-0.5f, z, 1.f));
  switch (static_cast<int>(static_cast<long long>(k) & 3)) {  // x = k pi/2 + r
    case 0: s = sr; c = cr; break;
    case 1: s = cr; c = -sr; break;
    case 2: s = -sr; c = -cr; break;
    default: s = -cr; c = sr; break;
  }
}

__device__ __forceinline__ int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// The 8 dims of `p` (a [D] vector) this lane owns, as raw 16 bytes; a null `p` reads as `fallback`.
template <typename T>
__device__ __forceinline__ uint4 load_affine(const void* p, int d0, bool active, float fallback) {
  if (p != nullptr && active) return load16(static_cast<const T*>(p) + d0);
  float f[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) f[e] = fallback;
  return pack8<T>(f);
}

// At most 40 registers, so three 512-thread blocks fit an SM: 1536 threads of 16-byte loads in flight
// (87 % of copy bandwidth at 4096 tokens, against 76 % with the 54 registers and 2 blocks unbounded).
template <typename T, int G>
__global__ void __launch_bounds__(kQkMaxThreads, 3) qk_norm_rope_cache_kernel(const QkNormRopeCacheParams p) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "group width must be a power of two <= 32");
  extern __shared__ float smem[];
  const int H = p.num_heads, D = p.head_dim, R = p.rotary_dim, half = R / 2;
  float* cos_tab = smem;
  float* sin_tab = smem + half;
  const int group = threadIdx.x / G;
  float* scratch = smem + R + group * 2 * R;  // [2][R]: q then k

  const int64_t t = blockIdx.x;
  const int h = blockIdx.y * (blockDim.x / G) + group;
  const int d0 = (threadIdx.x % G) * kVec;
  // Idle lanes (d0 >= D, or a head past H in the last block) still run every shuffle and __syncwarp
  // below, holding zeros: only their loads and stores are skipped.
  const bool active = d0 < D && h < H;

  // Programmatic dependent launch: the next kernel may be scheduled now; qkv comes from the previous
  // one (the QKV GEMV), so wait for it before the first load.
  pdl_launch_dependents();
  pdl_wait();

  // Issue the loads before anything that waits, so the sin/cos table below hides under them.
  uint4 rq = make_uint4(0, 0, 0, 0), rk = rq, rv = rq;
  if (active) {
    const T* src = static_cast<const T*>(p.qkv) + t * p.stride_t + h * p.stride_h + d0;
    rq = load16(src);
    rk = load16(src + p.stride_s);
    rv = load16(src + 2 * p.stride_s);
  }

  const int64_t slot = load_index(p.slot_mapping, p.slots_int64, t);
  if (slot < 0 || slot >= p.num_slots) {
    if (threadIdx.x == 0)
      printf("persimmon_rt qk_norm_rope_cache: slot_mapping[%lld] = %lld outside [0, %lld)\n",
             static_cast<long long>(t), static_cast<long long>(slot), static_cast<long long>(p.num_slots));
    __trap();
  }
  const int64_t hd = static_cast<int64_t>(h) * D + d0;  // offset of this lane's dims in a [H, D] row
  if (active) store16(static_cast<T*>(p.v_cache) + slot * H * D + hd, rv);  // v is a plain copy: done
  const float pos = static_cast<float>(load_index(p.positions, p.positions_int64, t));
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    // The angle is rounded to fp32 first, exactly as positions.float() * inv_freq in the reference.
    rope_sincos(pos * p.inv_freq[j], sin_tab[j], cos_tab[j]);
  }
  __syncthreads();

  float q[kVec], k[kVec];
  unpack8<T>(rq, q);
  unpack8<T>(rk, k);

  if (p.q_weight != nullptr) {  // the reference skips both LayerNorms without q_weight
    float2 sum = make_float2(0.f, 0.f);  // idle lanes hold zeros and add nothing
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      sum.x += q[e];
      sum.y += k[e];
    }
    sum = group_sum<G>(sum);
    const float2 mean = make_float2(sum.x / D, sum.y / D);
    float2 sq = make_float2(0.f, 0.f);
    if (active) {  // an idle lane's zeros deviate from the mean and must not count
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        sq.x += (q[e] - mean.x) * (q[e] - mean.x);
        sq.y += (k[e] - mean.y) * (k[e] - mean.y);
      }
    }
    sq = group_sum<G>(sq);
    const float rstd_q = rsqrtf(sq.x / D + p.eps), rstd_k = rsqrtf(sq.y / D + p.eps);
    // The affine vectors are shared by every token, so these loads hit L1/L2; loading them only now
    // keeps 16 registers free during the long qkv loads (more blocks resident per SM).
    float qw[kVec], qb[kVec], kw[kVec], kb[kVec];
    unpack8<T>(load_affine<T>(p.q_weight, d0, active, 1.f), qw);
    unpack8<T>(load_affine<T>(p.q_bias, d0, active, 0.f), qb);
    unpack8<T>(load_affine<T>(p.k_weight, d0, active, 1.f), kw);
    unpack8<T>(load_affine<T>(p.k_bias, d0, active, 0.f), kb);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      q[e] = (q[e] - mean.x) * rstd_q * qw[e] + qb[e];
      k[e] = (k[e] - mean.y) * rstd_k * kw[e] + kb[e];
    }
  }

  if (R > 0) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int i = d0 + e;
      if (active && i < R) {
        scratch[i] = q[e];
        scratch[R + i] = k[e];
      }
    }
    __syncwarp();
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int i = d0 + e;
      if (active && i < R) {
        // out[i] = x[i] cos - x[i + R/2] sin  (i < R/2);  out[i] = x[i] cos + x[i - R/2] sin  (i >= R/2)
        const bool first = i < half;
        const int j = first ? i : i - half, partner = first ? i + half : i - half;
        const float c = cos_tab[j], s = first ? -sin_tab[j] : sin_tab[j];
        q[e] = q[e] * c + scratch[partner] * s;
        k[e] = k[e] * c + scratch[R + partner] * s;
      }
    }
  }

  if (active) {
    store8(static_cast<T*>(p.q_out) + t * H * D + hd, q);
    store8(static_cast<T*>(p.k_cache) + slot * H * D + hd, k);
  }
}

}  // namespace persimmon_rt
