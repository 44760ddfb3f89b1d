// schedule_verify_lens on the GPU: its device code (docs/drafting.md).
// The launcher is csrc/cuda/schedule_verify_lens.cu; the arithmetic is the shared
// __host__ __device__ functions of dspark/schedule.h, so the CPU kernel (tested
// against the reference in CI) runs the same rules the GPU runs.
//
// schedule_verify_lens, three launches, no host sync (sizes from shapes only):
//
//  1. survival_kernel  one thread per request: the fp32 running products, each
//                      candidate's 64-bit sort key and fixed-point survival.
//  2. rank_kernel      one thread per candidate e, keys streamed through shared
//                      memory in tiles: e's rank (how many keys are larger) and the
//                      exact int64 sum of the survivals before it; from those, Theta
//                      before and after admitting e. Because the fixed-point sum of a
//                      set does not depend on the order of the additions, this equals
//                      the sequential scan of Algorithm 1 bit for bit, without a sort.
//                      Per block: the smallest rank whose admission does not improve
//                      Theta (lossless mode) or the largest Theta after admission with
//                      the smallest count on ties (async mode).
//  3. finish_kernel    one block: merges the block results into the admitted count
//                      k*, counts each request's candidates of rank < k* and writes
//                      verify_lens and the offsets (a block-wide scan per tile of rows).
//
// Cost: O(n^2 / threads) comparisons for n = R * gamma candidates (n = 7680 at
// R = 512, gamma = 15: 59M compare-and-adds over 30 blocks).
//
// No torch header here: the kernels also compile under NVRTC.
#pragma once

#include "philox.h"
#include "launch.h"  // block sizes and launch plans
#include "schedule.h"

namespace dspark {
namespace sched {

#define DSPARK_NEG_INF_D (-__longlong_as_double(0x7ff0000000000000LL))

constexpr int64_t kNoCount = 0x7fffffffLL;

__global__ void __launch_bounds__(kThreads)
    survival_kernel(const float* __restrict__ conf, int64_t stride_r, int64_t stride_j, int64_t R, int64_t gamma,
                    unsigned long long* __restrict__ keys, long long* __restrict__ quant) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= R) return;
  float a = 1.f;
  for (int64_t j = 0; j < gamma; ++j) {
    a = __fmul_rn(a, schedule_clamp(conf[r * stride_r + j * stride_j]));
    const int64_t e = r * gamma + j;
    keys[e] = schedule_key(a, e);
    quant[e] = schedule_quantize(a);
  }
}

// (Theta, count) pairs: the larger Theta wins, the smaller count on ties.
struct ThetaCount {
  double theta;
  long long count;
};

__device__ __forceinline__ ThetaCount better(ThetaCount a, ThetaCount b) {
  if (b.theta > a.theta || (b.theta == a.theta && b.count < a.count)) return b;
  return a;
}

__device__ __forceinline__ long long warp_min(long long v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const long long o = __shfl_xor_sync(0xffffffffu, v, m);
    v = o < v ? o : v;
  }
  return v;
}

__device__ __forceinline__ ThetaCount warp_best(ThetaCount v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    ThetaCount o;
    o.theta = __shfl_xor_sync(0xffffffffu, v.theta, m);
    o.count = __shfl_xor_sync(0xffffffffu, v.count, m);
    v = better(v, o);
  }
  return v;
}

// Block reductions (every thread of the block must call them; result valid in all).
template <int kBlock>
__device__ long long block_min(long long v) {
  __shared__ long long s[kBlock / 32];
  v = warp_min(v);
  if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kBlock / 32 ? s[threadIdx.x] : kNoCount;
  if (threadIdx.x < 32) v = warp_min(v);
  __shared__ long long out;
  if (threadIdx.x == 0) out = v;
  __syncthreads();
  return out;
}

template <int kBlock>
__device__ ThetaCount block_best(ThetaCount v) {
  __shared__ double st[kBlock / 32];
  __shared__ long long sc[kBlock / 32];
  v = warp_best(v);
  if ((threadIdx.x & 31) == 0) {
    st[threadIdx.x >> 5] = v.theta;
    sc[threadIdx.x >> 5] = v.count;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    ThetaCount w;
    w.theta = threadIdx.x < kBlock / 32 ? st[threadIdx.x] : DSPARK_NEG_INF_D;
    w.count = threadIdx.x < kBlock / 32 ? sc[threadIdx.x] : kNoCount;
    v = warp_best(w);
  }
  __shared__ ThetaCount out;
  if (threadIdx.x == 0) out = v;
  __syncthreads();
  return out;
}

__global__ void __launch_bounds__(kThreads)
    rank_kernel(const unsigned long long* __restrict__ keys, const long long* __restrict__ quant,
                const double* __restrict__ sps, int64_t n, int64_t R, int64_t max_admit, int early_stop,
                int32_t* __restrict__ rank_out, long long* __restrict__ part_count, double* __restrict__ part_theta) {
  __shared__ unsigned long long sk[kThreads];
  __shared__ long long sq[kThreads];
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = e < n;
  const unsigned long long ke = live ? keys[e] : ~0ull;
  long long before = 0, acc = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    sk[threadIdx.x] = t < n ? keys[t] : 0ull;  // 0 is below every key of a live candidate
    sq[threadIdx.x] = t < n ? quant[t] : 0;
    __syncthreads();
    const int m = static_cast<int>(n - t0 < kThreads ? n - t0 : kThreads);
    for (int i = 0; i < m; ++i) {
      const bool b = sk[i] > ke;
      before += b;
      acc += b ? sq[i] : 0;
    }
    __syncthreads();
  }
  long long stop = max_admit;
  ThetaCount tc;
  tc.theta = DSPARK_NEG_INF_D;
  tc.count = kNoCount;
  if (live) {
    rank_out[e] = static_cast<int32_t>(before);
    if (before < max_admit) {
      const long long tau_before = R * static_cast<long long>(kScheduleScale) + acc;
      const double after = schedule_theta(tau_before + quant[e], sps[R + before + 1]);
      if (early_stop) {
        const double prior = schedule_theta(tau_before, sps[R + before]);
        if (!(after > prior)) stop = before;  // NaN never improves
      } else if (after == after) {
        tc.theta = after;
        tc.count = before + 1;
      }
    }
  }
  if (early_stop) {
    const long long s = block_min<kThreads>(stop);
    if (threadIdx.x == 0) part_count[blockIdx.x] = s;
  } else {
    const ThetaCount b = block_best<kThreads>(tc);
    if (threadIdx.x == 0) {
      part_theta[blockIdx.x] = b.theta;
      part_count[blockIdx.x] = b.count;
    }
  }
}

__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const int32_t* __restrict__ rank, const double* __restrict__ sps,
                  const long long* __restrict__ part_count, const double* __restrict__ part_theta, int64_t num_parts,
                  int64_t R, int64_t gamma, int64_t max_admit, int early_stop, int32_t* __restrict__ lens,
                  int32_t* __restrict__ cu) {
  __shared__ long long kstar_s;
  if (early_stop) {
    long long v = max_admit;
    for (int64_t p = threadIdx.x; p < num_parts; p += kFinishThreads) v = part_count[p] < v ? part_count[p] : v;
    const long long k = block_min<kFinishThreads>(v);
    if (threadIdx.x == 0) kstar_s = k < max_admit ? k : max_admit;
  } else {
    ThetaCount v;
    v.theta = DSPARK_NEG_INF_D;
    v.count = kNoCount;
    for (int64_t p = threadIdx.x; p < num_parts; p += kFinishThreads) {
      ThetaCount o;
      o.theta = part_theta[p];
      o.count = part_count[p];
      v = better(v, o);
    }
    const ThetaCount b = block_best<kFinishThreads>(v);
    if (threadIdx.x == 0) {
      const double theta0 = schedule_theta(R * static_cast<long long>(kScheduleScale), sps[R]);
      kstar_s = b.theta > theta0 ? b.count : 0;  // a tie keeps the smaller count: 0
    }
  }
  __syncthreads();
  const long long kstar = kstar_s;

  __shared__ int32_t scan[kFinishThreads];
  __shared__ int32_t carry_s;
  if (threadIdx.x == 0) {
    carry_s = 0;
    cu[0] = 0;
  }
  __syncthreads();
  for (int64_t r0 = 0; r0 < R; r0 += kFinishThreads) {
    const int64_t r = r0 + threadIdx.x;
    int32_t len = 0;
    if (r < R)
      for (int64_t j = 0; j < gamma; ++j) len += rank[r * gamma + j] < kstar ? 1 : 0;
    scan[threadIdx.x] = len;
    __syncthreads();
    for (int off = 1; off < kFinishThreads; off <<= 1) {  // Hillis-Steele inclusive scan
      const int32_t add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    const int32_t carry = carry_s;
    if (r < R) {
      lens[r] = len;
      cu[r + 1] = carry + scan[threadIdx.x];
    }
    __syncthreads();
    if (threadIdx.x == kFinishThreads - 1) carry_s = carry + scan[kFinishThreads - 1];
    __syncthreads();
  }
}

}  // namespace sched
}  // namespace dspark
