// verify_tree on the CPU (docs/verification.md, "verify_tree"): at::parallel_for over
// requests; per request the walk of dspark/tree.h from the root: greedy requests follow
// the child equal to the row's argmax, sampling requests keep the current p' as a
// full-vocabulary fp32 vector of log-probabilities, try the children in order with the
// accept test of sampling.h and replace p' by the normalised residual after each
// rejection; the emitted token is one Gumbel race (cpu/row_ops.h) over the last
// residual (or p'). The per-token rules are those of verify_block, unchanged, so a chain
// gives verify_block's integers.
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
#include "dspark/philox.h"
#include "dspark/sampling.h"
#include "dspark/tree.h"
#include "verify_tree.h"

namespace dspark {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// log p of a temperature-scaled, filtered row into `out` (V entries), from the row
// statistics verify_block's CPU kernel uses (row_ops.h), so a chain reproduces its
// decisions bit for bit.
template <typename T>
void filtered_log_probs(Row<T> row, int64_t V, float temperature, int64_t top_k, float top_p, float log_min_p,
                        std::vector<float>& scratch, std::vector<float>& out) {
  out.resize(V);
  const RowStats st = row_stats(row, V, temperature, top_k, top_p, log_min_p, scratch);
  for (int64_t v = 0; v < V; ++v) out[v] = st.log_prob(scale_logit(row[v], temperature));
}

enum class DraftKind { kPointMass, kLogits, kProbs };

template <typename TT, typename DT>
void verify_tree_kernel(const at::Tensor& target_logits, const int64_t* drafts, const int64_t* parents,
                        const int64_t* cu, const at::Tensor* draft_dist, DraftKind kind, const float* temperature,
                        const int64_t* top_k, const float* top_p, const float* min_p,
                        const int64_t* draft_index, const int64_t* seed, const int64_t* offset, int64_t B, int64_t max_depth, int32_t* accept_path, int32_t* num_accepted,
                        int32_t* output_tokens) {
  const int64_t V = target_logits.size(1);
  const TT* tptr = target_logits.const_data_ptr<TT>();
  const int64_t ts0 = target_logits.stride(0), ts1 = target_logits.stride(1);
  const DT* dptr = draft_dist ? draft_dist->const_data_ptr<DT>() : nullptr;
  const int64_t ds0 = draft_dist ? draft_dist->stride(0) : 0, ds1 = draft_dist ? draft_dist->stride(1) : 0;
  const int64_t width = max_depth + 1;

  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1));
  at::parallel_for(0, B, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> scratch, log_p, log_q, w, raced;
    std::vector<int64_t> depth;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t start = cu[b];
      const int64_t n = cu[b + 1] - cu[b];
      const float T = temperature ? temperature[b] : 0.f;
      const int64_t k = top_k ? top_k[b] : 0;
      const float p = top_p ? top_p[b] : 1.f;
      const float lmp = log_min_p_at(min_p, b);
      const uint64_t s = static_cast<uint64_t>(seed[b]);
      const uint64_t o = static_cast<uint64_t>(offset[b]);
      const bool greedy = !(T > 0.f);
      depth.assign(n, 0);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pj = parents[start + j];
        depth[j] = tree_child_depth(pj < 0 ? 0 : depth[pj]);
      }
      auto target_row = [&](int64_t node) { return Row<TT>{tptr + tree_target_row(start, b, node) * ts0, ts1}; };

      int32_t* path_row = accept_path + b * width;
      int32_t* out_row = output_tokens + b * width;
      for (int64_t j = 0; j < width; ++j) path_row[j] = out_row[j] = -1;
      path_row[0] = tree_window_index(-1);
      int64_t node = -1, d = 0, accepted = 0, emitted = -1;
      while (emitted < 0) {
        const bool may_descend = tree_may_descend(d, max_depth);
        const Row<TT> trow = target_row(node);
        int64_t next = -1;
        if (greedy) {
          const int64_t am = row_argmax(trow, V);
          for (int64_t c = 0; c < n && may_descend && next < 0; ++c)
            if (parents[start + c] == node && drafts[start + c] == am && tree_child_valid(am, V)) next = c;
          if (next < 0) emitted = am;
        } else {
          filtered_log_probs(trow, V, T, k, p, lmp, scratch, log_p);
          bool residual_taken = false;
          const uint64_t position = tree_position(o, d);
          int64_t rank = 0;
          for (int64_t c = 0; c < n && may_descend && next < 0; ++c) {
            if (parents[start + c] != node) continue;
            const int64_t r = rank++;
            const int64_t x = drafts[start + c];
            if (!tree_child_valid(x, V)) continue;
            // q of node c: its own row, or row draft_index[c] (gathered in place).
            const int64_t qrow = draft_index ? draft_index[start + c] : start + c;
            Row<DT> drow{dptr ? dptr + qrow * ds0 : nullptr, ds1};
            if (kind == DraftKind::kLogits) filtered_log_probs(drow, V, T, k, p, lmp, scratch, log_q);
            auto lq = [&](int64_t v) -> float {
              switch (kind) {
                case DraftKind::kLogits: return log_q[v];
                case DraftKind::kProbs: return std::log(drow[v]);
                default: return v == x ? 0.f : kNegInf;
              }
            };
            const float log_u =
                std::log(uniform_from_word(random_word(s, position, kSaltAccept, static_cast<uint32_t>(r))));
            // q(x) not a finite positive number: the child was not drawn from q, skipped
            // like padding (p' unchanged), as verify_block samples that row from p.
            if (!draft_prob_ok(lq(x))) continue;
            if (accept_token(log_u, log_p[x], lq(x))) {
              next = c;
              break;
            }
            // Rejected: w = log max(p' - q_c, 0); p' <- w - lse(w) unless w has no mass.
            w.resize(V);
            float m = kNegInf;
            for (int64_t v = 0; v < V; ++v) {
              w[v] = residual_log_weight(log_p[v], lq(v));
              if (w[v] > m) m = w[v];
            }
            if (!(m > kNegInf)) continue;  // p' == q_c numerically: keep p'
            // lse(w): the fixed-point mass rule of a filtered row (row_ops.h), -inf terms 0.
            const int bits = mass_fraction_bits(V);
            const float lse = lse_from_mass(m, fixed_row_mass(V, m, bits, [&](int64_t v) { return w[v]; }), bits);
            for (int64_t v = 0; v < V; ++v) log_p[v] = tree_normalised(w[v], lse);
            raced.swap(w);  // the emitted token races over the last residual taken
            residual_taken = true;
          }
          if (next < 0) {
            const std::vector<float>& weights = residual_taken ? raced : log_p;
            auto weight = [&](int64_t v) { return weights[v]; };
            emitted = gumbel_race_salted(V, s, position, kSaltResample, weight, weight);
            if (emitted < 0) emitted = 0;
          }
        }
        if (next >= 0) {
          out_row[accepted] = static_cast<int32_t>(drafts[start + next]);
          ++accepted;
          path_row[accepted] = tree_window_index(next);
          node = next;
          d = depth[next];
        }
      }
      out_row[accepted] = static_cast<int32_t>(emitted);
      num_accepted[b] = static_cast<int32_t>(accepted);
    }
  });
}

}  // namespace
}  // namespace dspark

namespace dspark {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_draft, const std::optional<at::Tensor>& draft_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset, int64_t max_depth, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index) {
  check_verify_tree_args(target_logits, draft_tokens, parents, cu_num_draft, draft_logits, draft_probs,
                         temperature, top_k, top_p, seed, offset, max_depth, min_p, draft_index);
  const int64_t B = cu_num_draft.size(0) - 1;
  const int64_t N = draft_tokens.size(0);
  const int64_t V = target_logits.size(1);

  // Small per-node / per-request tensors: int64, contiguous (ids are range-checked wide).
  const at::Tensor cu = cu_num_draft.to(at::kLong).contiguous();
  const at::Tensor drafts = draft_tokens.to(at::kLong).contiguous();
  const at::Tensor par = parents.to(at::kLong).contiguous();
  const SamplingTensors sp(temperature, top_k, top_p, seed, offset);
  // Data-dependent checks: always on the CPU.
  check_verify_tree_data(cu.const_data_ptr<int64_t>(), par.const_data_ptr<int64_t>(),
                         drafts.const_data_ptr<int64_t>(), B, N, V, max_depth);
  const at::Tensor min_p_c = min_p_contiguous(min_p);
  const at::Tensor draft_index_c = draft_index ? draft_index->to(at::kLong).contiguous() : at::Tensor();
  const int64_t* di_p = draft_index ? draft_index_c.const_data_ptr<int64_t>() : nullptr;
  if (di_p)
    check_draft_index_data("verify_tree", di_p, N, (draft_logits ? *draft_logits : *draft_probs).size(0),
                           draft_logits ? "draft_logits" : "draft_probs");

  const auto int_options = target_logits.options().dtype(at::kInt);
  at::Tensor accept_path = at::empty({B, max_depth + 1}, int_options);
  at::Tensor output_tokens = at::empty({B, max_depth + 1}, int_options);
  at::Tensor num_accepted = at::empty({B}, int_options);

  const at::Tensor* draft_dist = nullptr;
  DraftKind kind = DraftKind::kPointMass;
  if (draft_logits) { draft_dist = &draft_logits.value(); kind = DraftKind::kLogits; }
  if (draft_probs) { draft_dist = &draft_probs.value(); kind = DraftKind::kProbs; }
  const at::ScalarType draft_type = draft_dist ? draft_dist->scalar_type() : target_logits.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_logits.scalar_type(), "verify_tree_cpu_target", [&] {
    using TT = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, draft_type, "verify_tree_cpu_draft", [&] {
      verify_tree_kernel<TT, scalar_t>(
          target_logits, drafts.const_data_ptr<int64_t>(), par.const_data_ptr<int64_t>(),
          cu.const_data_ptr<int64_t>(), draft_dist, kind, sp.temperature_ptr(), sp.top_k_ptr(), sp.top_p_ptr(),
          min_p_ptr(min_p_c), di_p, sp.seed.const_data_ptr<int64_t>(), sp.offset.const_data_ptr<int64_t>(), B, max_depth,
          accept_path.mutable_data_ptr<int32_t>(), num_accepted.mutable_data_ptr<int32_t>(),
          output_tokens.mutable_data_ptr<int32_t>());
    });
  });
  return {accept_path, num_accepted, output_tokens};
}

}  // namespace dspark
