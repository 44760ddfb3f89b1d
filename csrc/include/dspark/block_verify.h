// verify_block(method="block"): the scalar rules of block verification (Sun et al.
// 2024; docs/verification.md#block-verification), shared by the CPU and CUDA kernels
// (__host__ __device__). The PyTorch reference (dspark_kernels/reference/verify_block.py,
// block_ratio_step / block_residual_mass / block_accept_prob) states the same rules and
// the Triton kernel (dspark_kernels/triton/verify_block_method.py) restates them.
//
//   log rho_0 = 0,  log rho_{j+1} = min(0, log rho_j + (log p_j(x_j) - log q_j(x_j)))   (fp32)
//   Z_j = sum_v max(rho_j p_j(v) - q_j(v), 0)       fp64 sum of fp64 terms from fp32 rho, p, q
//       = rho_j (1 - p_j(x_j))                      for a point-mass draft (closed form)
//   h_j = Z_j / (Z_j + (1 - rho_j))                  fp64; 1 when rho_j = 1
//   coin j (accept stream, offset + j - 1) passes iff u < h_j (fp64), or, for the last
//   draft of the block, iff log u < log rho_j (fp32, exactly the token rule).
// No torch header: also compiles under NVRTC.
#pragma once

#include "philox.h"
#include "sampling.h"

namespace dspark {

// log rho after draft x: -inf once p(x) = 0 or rho = 0 (also for a NaN), 0 when
// q(x) = 0 < p(x) (p/q = inf); a NaN difference stays NaN (its coin never passes).
DSPARK_HD float block_ratio_step(float log_rho, float log_p, float log_q) {
  if (!(log_rho > DSPARK_NEG_INF) || !(log_p > DSPARK_NEG_INF)) return DSPARK_NEG_INF;
  if (!(log_q > DSPARK_NEG_INF)) return 0.f;
  const float d = log_rho + (log_p - log_q);
  return d >= 0.f ? 0.f : d;
}

// exp(log x) as fp64, 0 for -inf or NaN.
DSPARK_HD double block_prob(float log_x) { return log_x > DSPARK_NEG_INF ? static_cast<double>(expf(log_x)) : 0.0; }

// One term max(rho p - q, 0) of the residual mass Z (a NaN term counts 0).
DSPARK_HD double block_residual_term(double rho, float log_p, double q) {
  const double d = rho * block_prob(log_p) - q;
  return d > 0.0 ? d : 0.0;
}

// rho = exp(log rho) in fp32, as fp64.
DSPARK_HD double block_rho(float log_rho) { return static_cast<double>(expf(log_rho)); }

// The closed form of Z for a point-mass draft at x: rho (1 - p(x)).
DSPARK_HD double block_point_mass_residual(double rho, float log_p_x) { return rho * (1.0 - block_prob(log_p_x)); }

// h = Z / (Z + 1 - rho), 1 when rho = 1.
DSPARK_HD double block_accept_prob(double rho, double z) { return rho >= 1.0 ? 1.0 : z / (z + (1.0 - rho)); }

}  // namespace dspark
