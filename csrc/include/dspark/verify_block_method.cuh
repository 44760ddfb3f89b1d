// verify_block(method="block") on the GPU (docs/verification.md#block-verification).
// The rules are the __host__ __device__ functions of block_verify.h (the CPU kernel runs
// the same ones); the pipeline reuses verify_block.cuh's steps 1, 2, 4 and 5 and
// replaces step 3:
//
//  1-2. stats_kernel / mass_kernel / filter_kernel   unchanged (every row's
//                        log-sum-exp / threshold).
//  3a. block_z_kernel    one CTA per target row j of a sampling request with
//                        1 <= j < g (g: the leading run of valid ids) and rho_j > 0:
//                        log rho_j (a walk over the j earlier drafts, one warp), then the
//                        residual mass Z_j = sum_v max(rho_j p_j(v) - q_j(v), 0) in fp64
//                        (a fixed-order block reduction). Not launched for point-mass
//                        drafts (closed form rho_j (1 - p_j(x_j))).
//  3b. block_walk_kernel one warp per request: greedy rows as walk_kernel; sampling
//                        rows: rho_j, h_j, the coins (accept stream at offset + j - 1),
//                        tau = the largest j whose coin passes; writes the accepted
//                        drafts, num_accepted and the RaceDesc of row tau (the residual
//                        max(rho_tau p - q, 0) via RaceDesc::log_rho, or p for the bonus).
//  4-5. race_kernel / finish_kernel    unchanged.
//
// Kept simple (sequential over positions, one warp): block verification costs a full
// pass over every row of the block anyway (Z_j), which 3a spreads over the GPU.
#pragma once

#include "block_verify.h"
#include "launch.h"  // block sizes and launch plans
#include "verify_block.cuh"

namespace dspark {
namespace vb {


struct BlockParams {
  Params p;
  double* z;  // [T]: Z_j at target row start + b + j (rows 3a computes), else unused
};

// The number of leading valid draft ids of a request.
__device__ __forceinline__ int64_t block_length(const Params& p, const Request& rq) {
  int64_t g = 0;
  while (g < rq.n && valid_token(p.draft_tokens[rq.start + g], p.V)) ++g;
  return g;
}

// Warp-collective: log p_i(x) and log q_i(x) of draft i = x (a valid id) of request b,
// as accept_position computes them.
template <class TT, class DT>
__device__ void draft_log_probs(const Params& p, const Request& rq, int64_t b, int64_t i, int64_t x, float& log_p,
                                float& log_q) {
  const int64_t trow = rq.start + b + i;
  const RowFilter pf = row_filter_at(p, trow, rq.filtered);
  const float t = load_float<TT>(static_cast<const typename TT::storage*>(p.target) + trow * p.target_stride, x);
  log_p = filtered_log_prob(scale_logit(t, rq.temperature), pf.threshold, pf.lse);
  log_q = 0.f;  // point mass at x
  const int64_t drow = rq.start + i;
  if (p.draft_kind == kDraftLogits) {
    const RowFilter qf = row_filter_at(p, p.T + drow, rq.filtered);
    const float d =
        load_float<DT>(static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, drow) * p.draft_stride, x);
    log_q = filtered_log_prob(scale_logit(d, rq.temperature), qf.threshold, qf.lse);
  } else if (p.draft_kind == kDraftProbs) {
    log_q = logf(
        load_float<DT>(static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, drow) * p.draft_stride, x));
  }
}

// Warp-collective: log rho_j (after drafts 0..j-1); -inf once rho is 0.
template <class TT, class DT>
__device__ float block_log_rho(const Params& p, const Request& rq, int64_t b, int64_t j) {
  float log_rho = 0.f;
  for (int64_t i = 0; i < j && log_rho > DSPARK_NEG_INF; ++i) {
    float lp, lq;
    draft_log_probs<TT, DT>(p, rq, b, i, p.draft_tokens[rq.start + i], lp, lq);
    log_rho = block_ratio_step(log_rho, lp, lq);
  }
  return log_rho > DSPARK_NEG_INF ? log_rho : DSPARK_NEG_INF;
}

// grid (T target rows), kBlockZThreads: Z_j of target row r = start + b + j.
template <class TT, class DT>
__global__ void __launch_bounds__(kBlockZThreads) block_z_kernel(const BlockParams bp) {
  const Params& p = bp.p;
  const int64_t r = blockIdx.x;
  const int64_t b = row_owner(p, r);
  const Request rq = load_request(p, b);
  const int64_t j = r - (rq.start + b);
  if (rq.greedy || j < 1 || j >= rq.n) return;
  if (j >= block_length(p, rq)) return;
  __shared__ float s_log_rho;
  if (threadIdx.x < 32) {
    const float lr = block_log_rho<TT, DT>(p, rq, b, j);
    if (threadIdx.x == 0) s_log_rho = lr;
  }
  __syncthreads();
  const float log_rho = s_log_rho;
  if (!(log_rho > DSPARK_NEG_INF)) return;  // uniform over the block
  const double rho = block_rho(log_rho);
  const RowFilter pf = row_filter_at(p, r, rq.filtered);  // every warp merges for itself
  RowFilter qf;
  qf.threshold = DSPARK_NEG_INF;
  qf.lse = 0.f;
  const int64_t drow = rq.start + j;
  if (p.draft_kind == kDraftLogits) qf = row_filter_at(p, p.T + drow, rq.filtered);
  const typename TT::storage* trow = static_cast<const typename TT::storage*>(p.target) + r * p.target_stride;
  const typename DT::storage* dr =
      static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, drow) * p.draft_stride;
  double acc = 0.0;
  for (int64_t v = threadIdx.x; v < p.V; v += kBlockZThreads) {
    const float lp = filtered_log_prob(scale_logit(load_float<TT>(trow, v), rq.temperature), pf.threshold, pf.lse);
    double q;
    if (p.draft_kind == kDraftProbs)
      q = static_cast<double>(load_float<DT>(dr, v));
    else
      q = block_prob(filtered_log_prob(scale_logit(load_float<DT>(dr, v), rq.temperature), qf.threshold, qf.lse));
    acc += block_residual_term(rho, lp, q);
  }
  acc = block_allreduce<kBlockZThreads>(acc, AddF64Op());
  if (threadIdx.x == 0) bp.z[r] = acc;
}

// grid (B), one warp per request.
template <class TT, class DT>
__global__ void __launch_bounds__(kBlockWalkThreads) block_walk_kernel(const BlockParams bp) {
  const Params& p = bp.p;
  const int64_t b = blockIdx.x;
  const Request rq = load_request(p, b);
  const int lane = threadIdx.x & 31;
  int32_t* out_row = p.output_tokens + b * (p.max_num_draft + 1);

  RaceDesc d;
  d.draft_token = -1;
  d.seed = rq.seed;
  d.temperature = rq.temperature;
  d.p_threshold = DSPARK_NEG_INF;
  d.p_lse = DSPARK_NEG_INF;
  d.p_floor = DSPARK_NEG_INF;
  d.q_threshold = DSPARK_NEG_INF;
  d.q_lse = DSPARK_NEG_INF;
  d.mode = kRaceNone;
  d.log_rho = 0.f;

  int64_t tau = 0;
  if (rq.greedy) {  // unchanged: accept while x == argmax, then the argmax
    int64_t am = 0;
    for (;;) {
      am = row_argmax_at(p, rq.start + b + tau);
      if (tau >= rq.n) break;
      const int64_t x = p.draft_tokens[rq.start + tau];
      if (!(valid_token(x, p.V) && x == am)) break;
      ++tau;
    }
    if (lane == 0) out_row[tau] = static_cast<int32_t>(am);
  } else {
    const int64_t g = block_length(p, rq);
    float log_rho = 0.f, tau_log_rho = 0.f;
    for (int64_t j = 1; j <= g; ++j) {
      float lp, lq;
      draft_log_probs<TT, DT>(p, rq, b, j - 1, p.draft_tokens[rq.start + j - 1], lp, lq);
      log_rho = block_ratio_step(log_rho, lp, lq);
      if (!(log_rho > DSPARK_NEG_INF)) break;  // rho = 0 from here on: every later h is 0
      const float u = uniform_from_word(random_word(rq.seed, rq.offset + static_cast<uint64_t>(j - 1), kSaltAccept, 0));
      bool ok;
      if (j == g) {
        ok = logf(u) < log_rho;
      } else {
        const double rho = block_rho(log_rho);
        double z;
        if (p.draft_kind == kPointMass) {
          float lpj, lqj;
          draft_log_probs<TT, DT>(p, rq, b, j, p.draft_tokens[rq.start + j], lpj, lqj);
          z = block_point_mass_residual(rho, lpj);
        } else {
          z = bp.z[rq.start + b + j];
        }
        ok = static_cast<double>(u) < block_accept_prob(rho, z);
      }
      if (ok) {
        tau = j;
        tau_log_rho = log_rho;
      }
    }
    const int64_t trow = rq.start + b + tau;
    const RowFilter pf = row_filter_at(p, trow, rq.filtered);
    d.p_threshold = pf.threshold;
    d.p_lse = pf.lse;
    const float log_p_max = filtered_log_prob(pf.max, pf.threshold, pf.lse);
    if (log_p_max > DSPARK_NEG_INF) d.p_floor = log_p_max + gumbel_min_bound();
    if (tau < g) {  // the correction: max(rho_tau p - q, 0)
      d.mode = kRaceResidual;
      d.draft_token = p.draft_tokens[rq.start + tau];
      d.log_rho = tau_log_rho;
      if (p.draft_kind == kDraftLogits) {
        const RowFilter qf = row_filter_at(p, p.T + rq.start + tau, rq.filtered);
        d.q_threshold = qf.threshold;
        d.q_lse = qf.lse;
      }
    } else {  // the bonus (or the row of a padding id that ends the block): p
      d.mode = kRaceTarget;
    }
  }
  for (int64_t i = lane; i < tau; i += 32) out_row[i] = static_cast<int32_t>(p.draft_tokens[rq.start + i]);
  d.target_row = rq.start + b + tau;
  d.draft_row = rq.start + tau;
  d.position = rq.offset + static_cast<uint64_t>(tau);
  d.accepted = static_cast<int32_t>(tau);
  if (lane == 0) {
    p.num_accepted[b] = static_cast<int32_t>(tau);
    p.desc[b] = d;
  }
}

}  // namespace vb
}  // namespace dspark
