// verify_block on the CPU: at::parallel_for over requests; per request one pass
// over each verified row (max, log-sum-exp, the draft token's logit), stopping at
// the first rejection; a full-vocabulary pass only for the row that is sampled
// (first rejection or bonus). The accept / residual / race rules are the shared
// __host__ __device__ functions of dspark/sampling.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/row_ops.h"
#include "dspark/block_verify.h"
#include "dspark/philox.h"
#include "dspark/sampling.h"
#include "verify_block.h"

namespace dspark {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();


// Gumbel race over the vocabulary: argmax_v weight(v) + G_v, lowest index on ties.
// bound(v) >= weight(v) is a cheap upper bound (log p for a residual); groups of
// four whose bound cannot reach the running best skip the Philox call.
template <typename B, typename F>
int64_t gumbel_race(int64_t V, uint64_t seed, uint64_t position, B bound, F weight) {
  return gumbel_race_salted(V, seed, position, kSaltResample, bound, weight);  // cpu/row_ops.h
}

template <typename F>
int64_t gumbel_race(int64_t V, uint64_t seed, uint64_t position, F weight) {
  return gumbel_race(V, seed, position, weight, weight);
}

enum class DraftKind { kPointMass, kLogits, kProbs };

template <typename TT, typename DT>
void verify_block_kernel(const at::Tensor& target_logits, const int32_t* drafts, const int64_t* cu,
                         const at::Tensor* draft_dist, DraftKind kind, const float* temperature,
                         const int64_t* top_k, const float* top_p, const float* min_p,
                         const int64_t* draft_index, const int64_t* seed, const int64_t* offset, int64_t B,
                         int64_t max_num_draft, int32_t* out, int32_t* num_accepted) {
  const int64_t V = target_logits.size(1);
  const TT* tptr = target_logits.const_data_ptr<TT>();
  const int64_t ts0 = target_logits.stride(0), ts1 = target_logits.stride(1);
  const DT* dptr = draft_dist ? draft_dist->const_data_ptr<DT>() : nullptr;
  const int64_t ds0 = draft_dist ? draft_dist->stride(0) : 0, ds1 = draft_dist ? draft_dist->stride(1) : 0;
  const int64_t width = max_num_draft + 1;
  // The row of the draft distribution that is q of draft i (draft_index gathers rows).
  auto draft_row = [&](int64_t i) { return draft_index ? draft_index[i] : i; };

  // Small problems run inline: opening a parallel region costs more than they do.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1));
  at::parallel_for(0, B, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> scratch;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t start = cu[b];
      const int64_t n = std::min<int64_t>(cu[b + 1] - cu[b], max_num_draft);
      const float T = temperature ? temperature[b] : 0.f;
      const int64_t k = top_k ? top_k[b] : 0;
      const float p = top_p ? top_p[b] : 1.f;
      const float lmp = log_min_p_at(min_p, b);
      const uint64_t s = static_cast<uint64_t>(seed[b]);
      const uint64_t o = static_cast<uint64_t>(offset[b]);
      const bool greedy = !(T > 0.f);
      auto target_row = [&](int64_t i) { return Row<TT>{tptr + (start + b + i) * ts0, ts1}; };

      int32_t* out_row = out + b * width;
      int64_t accepted = 0;
      int64_t emitted = -1;
      for (int64_t i = 0; i < n && emitted < 0; ++i) {
        const int64_t x = drafts[start + i];
        const bool valid = x >= 0 && x < V;
        const Row<TT> trow = target_row(i);
        if (greedy) {
          const int64_t am = row_argmax(trow, V);
          if (valid && x == am) {
            out_row[accepted++] = static_cast<int32_t>(x);
          } else {
            emitted = am;
          }
          continue;
        }
        const RowStats ps = row_stats(trow, V, T, k, p, lmp, scratch);
        RowStats qs{kNegInf, 0.f};
        Row<DT> drow{dptr ? dptr + draft_row(start + i) * ds0 : nullptr, ds1};
        if (kind == DraftKind::kLogits) qs = row_stats(drow, V, T, k, p, lmp, scratch);
        auto log_q = [&](int64_t v) -> float {
          switch (kind) {
            case DraftKind::kLogits: return qs.log_prob(scale_logit(drow[v], T));
            case DraftKind::kProbs: return std::log(drow[v]);
            default: return v == x ? 0.f : kNegInf;
          }
        };
        auto log_p = [&](int64_t v) { return ps.log_prob(scale_logit(trow[v], T)); };
        const uint64_t position = o + static_cast<uint64_t>(i);
        if (valid) {
          const float log_u = std::log(uniform_from_word(random_word(s, position, kSaltAccept, 0)));
          const float log_qx = log_q(x);
          if (accept_token(log_u, log_p(x), log_qx)) {
            out_row[accepted++] = static_cast<int32_t>(x);
            continue;
          }
          if (draft_prob_ok(log_qx))  // else q(x) is not a finite positive number: sample p
            emitted = gumbel_race(V, s, position, log_p,  // the residual's weight is at most p's
                                  [&](int64_t v) { return residual_log_weight(log_p(v), log_q(v)); });
        }
        // Padding id, q(x) unusable, or a residual with no mass (p == q numerically): sample p.
        if (emitted < 0) emitted = gumbel_race(V, s, position, log_p);
        if (emitted < 0) emitted = 0;
      }
      if (emitted < 0) {  // all drafts accepted: the bonus token from row n
        const Row<TT> trow = target_row(n);
        if (greedy) {
          emitted = row_argmax(trow, V);
        } else {
          const RowStats ps = row_stats(trow, V, T, k, p, lmp, scratch);
          emitted = gumbel_race(V, s, o + static_cast<uint64_t>(n),
                                [&](int64_t v) { return ps.log_prob(scale_logit(trow[v], T)); });
          if (emitted < 0) emitted = 0;
        }
      }
      out_row[accepted] = static_cast<int32_t>(emitted);
      num_accepted[b] = static_cast<int32_t>(accepted);
    }
  });
}

// method="block": block verification (dspark/block_verify.h states the rules; the
// reference's _block_request is the spec). Greedy requests are unchanged. A sampling
// request makes one pass over each row of its block (h_j needs the residual mass of
// row j; none for point masses), then one race at the row it stops at.
template <typename TT, typename DT>
void verify_block_block_kernel(const at::Tensor& target_logits, const int32_t* drafts, const int64_t* cu,
                               const at::Tensor* draft_dist, DraftKind kind, const float* temperature,
                               const int64_t* top_k, const float* top_p, const float* min_p,
                               const int64_t* draft_index, const int64_t* seed, const int64_t* offset, int64_t B,
                               int64_t max_num_draft, int32_t* out, int32_t* num_accepted) {
  const int64_t V = target_logits.size(1);
  const TT* tptr = target_logits.const_data_ptr<TT>();
  const int64_t ts0 = target_logits.stride(0), ts1 = target_logits.stride(1);
  const DT* dptr = draft_dist ? draft_dist->const_data_ptr<DT>() : nullptr;
  const int64_t ds0 = draft_dist ? draft_dist->stride(0) : 0, ds1 = draft_dist ? draft_dist->stride(1) : 0;
  const int64_t width = max_num_draft + 1;
  auto draft_row = [&](int64_t i) { return draft_index ? draft_index[i] : i; };

  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1));
  at::parallel_for(0, B, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> scratch;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t start = cu[b];
      const int64_t n = std::min<int64_t>(cu[b + 1] - cu[b], max_num_draft);
      const float T = temperature ? temperature[b] : 0.f;
      const int64_t k = top_k ? top_k[b] : 0;
      const float p = top_p ? top_p[b] : 1.f;
      const float lmp = log_min_p_at(min_p, b);
      const uint64_t s = static_cast<uint64_t>(seed[b]);
      const uint64_t o = static_cast<uint64_t>(offset[b]);
      auto target_row = [&](int64_t i) { return Row<TT>{tptr + (start + b + i) * ts0, ts1}; };
      int32_t* out_row = out + b * width;
      int64_t accepted = 0;
      int64_t emitted = -1;

      if (!(T > 0.f)) {  // greedy: unchanged
        for (int64_t i = 0; i < n && emitted < 0; ++i) {
          const int64_t x = drafts[start + i];
          const int64_t am = row_argmax(target_row(i), V);
          if (x >= 0 && x < V && x == am) out_row[accepted++] = static_cast<int32_t>(x);
          else emitted = am;
        }
        if (emitted < 0) emitted = row_argmax(target_row(n), V);
        out_row[accepted] = static_cast<int32_t>(emitted);
        num_accepted[b] = static_cast<int32_t>(accepted);
        continue;
      }

      // The block: the leading run of valid ids.
      int64_t g = 0;
      while (g < n && drafts[start + g] >= 0 && drafts[start + g] < V) ++g;

      // Row i's distributions: log p, log q and q (fp32 values) at v.
      struct RowDists {
        Row<TT> trow;
        Row<DT> drow;
        RowStats ps, qs;
        int64_t x;
      };
      auto row_dists = [&](int64_t i) {
        // No draft row at n (the bonus row): its q is never read.
        RowDists r{target_row(i), Row<DT>{dptr && i < n ? dptr + draft_row(start + i) * ds0 : nullptr, ds1},
                   row_stats(target_row(i), V, T, k, p, lmp, scratch), RowStats{kNegInf, 0.f},
                   i < n ? static_cast<int64_t>(drafts[start + i]) : -1};
        if (kind == DraftKind::kLogits && i < n) r.qs = row_stats(r.drow, V, T, k, p, lmp, scratch);
        return r;
      };
      auto log_p_at = [&](const RowDists& r, int64_t v) { return r.ps.log_prob(scale_logit(r.trow[v], T)); };
      auto log_q_at = [&](const RowDists& r, int64_t v) -> float {
        switch (kind) {
          case DraftKind::kLogits: return r.qs.log_prob(scale_logit(r.drow[v], T));
          case DraftKind::kProbs: return std::log(r.drow[v]);
          default: return v == r.x ? 0.f : kNegInf;
        }
      };

      float log_rho = 0.f, tau_log_rho = 0.f;
      int64_t tau = 0;
      RowDists prev{};  // row j - 1 at step j (computed once: step j - 1 made it)
      if (g > 0) prev = row_dists(0);
      for (int64_t j = 1; j <= g; ++j) {
        log_rho = block_ratio_step(log_rho, log_p_at(prev, prev.x), log_q_at(prev, prev.x));
        if (!(log_rho > kNegInf)) break;  // rho = 0 from here on: every later h is 0
        const float u = uniform_from_word(random_word(s, o + static_cast<uint64_t>(j - 1), kSaltAccept, 0));
        bool ok;
        if (j == g) {
          ok = std::log(u) < log_rho;
        } else {
          const RowDists r = row_dists(j);
          const double rho = block_rho(log_rho);
          double z;
          if (kind == DraftKind::kPointMass) {
            z = block_point_mass_residual(rho, log_p_at(r, r.x));
          } else {
            z = 0.0;
            for (int64_t v = 0; v < V; ++v) {
              const double q = kind == DraftKind::kProbs ? static_cast<double>(r.drow[v]) : block_prob(log_q_at(r, v));
              z += block_residual_term(rho, log_p_at(r, v), q);
            }
          }
          ok = static_cast<double>(u) < block_accept_prob(rho, z);
          prev = r;
        }
        if (ok) {
          tau = j;
          tau_log_rho = log_rho;
        }
      }

      const RowDists r = row_dists(tau);
      const uint64_t position = o + static_cast<uint64_t>(tau);
      auto log_p = [&](int64_t v) { return log_p_at(r, v); };
      if (tau < g) {  // the correction: norm(max(rho_tau p - q, 0))
        emitted = gumbel_race(V, s, position, log_p, [&](int64_t v) {
          return residual_log_weight(tau_log_rho + log_p_at(r, v), log_q_at(r, v));
        });
      }
      if (emitted < 0) emitted = gumbel_race(V, s, position, log_p);  // bonus, or no residual mass
      if (emitted < 0) emitted = 0;
      for (int64_t i = 0; i < tau; ++i) out_row[i] = drafts[start + i];
      out_row[tau] = static_cast<int32_t>(emitted);
      num_accepted[b] = static_cast<int32_t>(tau);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_block_cpu(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_logits, const std::optional<at::Tensor>& draft_probs,
    const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& offset,
    int64_t max_num_draft, c10::string_view method, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index) {
  const bool block = parse_verify_method(method);
  check_verify_block_args(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs,
                          temperature, top_k, top_p, seed, offset, max_num_draft, min_p, draft_index);
  constexpr const char* op = "verify_block";
  const int64_t B = cu_num_draft.size(0) - 1;
  const int64_t N = draft_tokens.size(0);
  const int64_t V = target_logits.size(1);

  // Small per-request tensors: normalise dtype and layout (cheap copies). Offsets and
  // ids are range-checked in int64 before any narrowing, so an int64 value like
  // 2^32 + 2 cannot pass as 2; the kernel reads the int64 offsets.
  const at::Tensor cu = cu_num_draft.to(at::kLong).contiguous();
  const at::Tensor drafts_wide = draft_tokens.to(at::kLong).contiguous();
  const SamplingTensors sp(temperature, top_k, top_p, seed, offset);
  const at::Tensor min_p_c = min_p_contiguous(min_p);
  const at::Tensor draft_index_c = draft_index ? draft_index->to(at::kLong).contiguous() : at::Tensor();
  const int64_t* di_p = draft_index ? draft_index_c.const_data_ptr<int64_t>() : nullptr;
  if (di_p)
    check_draft_index_data(op, di_p, N, (draft_logits ? *draft_logits : *draft_probs).size(0),
                           draft_logits ? "draft_logits" : "draft_probs");

  // Data-dependent checks: always on the CPU (docs/verification.md). Comparisons only, no
  // arithmetic on unchecked values: cu[0] = 0, cu non-decreasing and cu[B] = N put
  // every offset in [0, N], after which differences cannot overflow.
  const int64_t* cu_p = cu.const_data_ptr<int64_t>();
  DSPARK_CHECK(cu_p[0] == 0, op, "cu_num_draft[0] must be 0, got ", cu_p[0]);
  DSPARK_CHECK(cu_p[B] == N, op, "cu_num_draft[B] must equal draft_tokens.size(0) = ", N, ", got ", cu_p[B]);
  for (int64_t b = 0; b < B; ++b)
    DSPARK_CHECK(cu_p[b] <= cu_p[b + 1], op, "cu_num_draft must be non-decreasing, got cu_num_draft[", b, "] = ",
                 cu_p[b], " > cu_num_draft[", b + 1, "] = ", cu_p[b + 1]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu_p[b + 1] - cu_p[b];
    DSPARK_CHECK(n <= max_num_draft, op, "request ", b, " has ", n, " drafts (cu_num_draft[", b + 1, "] - cu_num_draft[",
                 b, "]), more than max_num_draft = ", max_num_draft);
  }
  const int64_t* dw_p = drafts_wide.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    DSPARK_CHECK(dw_p[i] >= -1 && dw_p[i] < V, op, "draft_tokens[", i, "] = ", dw_p[i],
                 " is outside [-1, V) with V = ", V);
  const at::Tensor drafts = drafts_wide.to(at::kInt);  // every id checked in [-1, V): exact
  const int32_t* d_p = drafts.const_data_ptr<int32_t>();

  at::Tensor out = at::full({B, max_num_draft + 1}, -1, target_logits.options().dtype(at::kInt));
  at::Tensor num_accepted = at::empty({B}, target_logits.options().dtype(at::kInt));

  const at::Tensor* draft_dist = nullptr;
  DraftKind kind = DraftKind::kPointMass;
  if (draft_logits) { draft_dist = &draft_logits.value(); kind = DraftKind::kLogits; }
  if (draft_probs) { draft_dist = &draft_probs.value(); kind = DraftKind::kProbs; }
  const at::ScalarType draft_type = draft_dist ? draft_dist->scalar_type() : target_logits.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_logits.scalar_type(), "verify_block_cpu_target", [&] {
    using TT = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, draft_type, "verify_block_cpu_draft", [&] {
      (block ? verify_block_block_kernel<TT, scalar_t> : verify_block_kernel<TT, scalar_t>)(
          target_logits, d_p, cu_p, draft_dist, kind, sp.temperature_ptr(), sp.top_k_ptr(), sp.top_p_ptr(),
          min_p_ptr(min_p_c), di_p, sp.seed.const_data_ptr<int64_t>(), sp.offset.const_data_ptr<int64_t>(), B, max_num_draft,
          out.mutable_data_ptr<int32_t>(), num_accepted.mutable_data_ptr<int32_t>());
    });
  });
  return {out, num_accepted};
}

}  // namespace dspark
