// The DSpark prefix scheduler's arithmetic (docs/drafting.md: schedule_verify_lens),
// shared by the CPU kernel (csrc/cpu/schedule_verify_lens.cpp) and the CUDA kernels
// (dspark/schedule_verify_lens.cuh) as __host__ __device__ functions; the PyTorch reference
// (dspark_kernels/reference/schedule_verify_lens.py) and the Triton kernels restate
// the same rules.
//
//   c       = confidence clamped to [0, 1] in fp32 (NaN counts as 0)
//   a_{r,j} = fp32 running product c_{r,0} * ... * c_{r,j}, left to right
//   order   = a descending, then r ascending, then j ascending: one total order,
//             encoded as the 64-bit key  (bits(a) << 32) | (2^32 - 1 - (r*gamma + j)),
//             candidate e' comes before e  iff  key(e') > key(e)
//   tau_k   = R + sum of the first k survivals, accumulated EXACTLY in fixed point:
//             each a counts as floor(a * 2^40) / 2^40 (an int64), so the sum does not
//             depend on the order it is taken in (a GPU parallel sum equals the CPU's
//             sequential one, bit for bit)
//   Theta_k = double(R * 2^40 + sum of the first k quantised a) * double(sps[R + k])
//             (the common factor 2^40 does not change any comparison)
//
// Because a_{r,j+1} = a_{r,j} * c with c in [0, 1] cannot exceed a_{r,j} (round to
// nearest of a product <= a is <= a), and equal survivals are ordered by j, the first
// k candidates of the order always hold a prefix of every request's block.
//
// No torch header: also compiles under NVRTC.
#pragma once

#include "types.h"  // uint32_t ..., DSPARK_HD

namespace dspark {

// Survival units: 2^40 per unit of probability.
constexpr double kScheduleScale = 1099511627776.0;  // 2^40

// A confidence as the scheduler uses it: fp32 in [0, 1], NaN and negatives are 0.
DSPARK_HD float schedule_clamp(float c) { return c > 0.f ? (c < 1.f ? c : 1.f) : 0.f; }

// The fixed-point survival: floor(a * 2^40) (exact: a * 2^40 is exact in fp64).
DSPARK_HD int64_t schedule_quantize(float a) { return (int64_t)((double)a * kScheduleScale); }

// Sort key of candidate index e = r * gamma + j with survival a >= +0 (larger key first).
DSPARK_HD uint64_t schedule_key(float a, int64_t e) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(a);
#else
  uint32_t u;
  __builtin_memcpy(&u, &a, sizeof(u));
#endif
  return ((uint64_t)u << 32) | (uint64_t)(0xffffffffu - (uint32_t)e);
}

// Theta of a candidate set, up to the factor 2^40: tau_q = R * 2^40 + sum of quantised a.
DSPARK_HD double schedule_theta(int64_t tau_q, double sps) { return (double)tau_q * sps; }

// Largest number of candidates that may be admitted: B = R + k must stay <= Bmax.
DSPARK_HD int64_t schedule_max_admit(int64_t R, int64_t gamma, int64_t bmax) {
  const int64_t room = bmax - R;
  const int64_t n = R * gamma;
  return room <= 0 ? 0 : (room < n ? room : n);
}

}  // namespace dspark
