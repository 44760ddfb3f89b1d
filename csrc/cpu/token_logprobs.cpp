// token_logprobs on the CPU: one row_stats pass (the statistics verify_block and
// verify_tree accept with, cpu/row_ops.h) per non-padding entry, then one read.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/row_ops.h"
#include "dspark/sampling.h"
#include "token_logprobs.h"

namespace dspark {

at::Tensor token_logprobs_cpu(const at::Tensor& target_logits, const at::Tensor& tokens, const at::Tensor& rows,
                              const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
                              const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p) {
  constexpr const char* op = "token_logprobs";
  DSPARK_CHECK_DIM(op, target_logits, 2);
  DSPARK_CHECK_FLOAT(op, target_logits);
  DSPARK_CHECK(target_logits.size(1) >= 1, op, "target_logits must have a vocabulary of at least 1, got shape ",
               target_logits.sizes());
  DSPARK_CHECK_DIM(op, tokens, 2);
  DSPARK_CHECK_INT(op, tokens);
  DSPARK_CHECK_DEVICE(op, tokens, target_logits);
  DSPARK_CHECK_DIM(op, rows, 2);
  DSPARK_CHECK_INT(op, rows);
  DSPARK_CHECK_DEVICE(op, rows, target_logits);
  DSPARK_CHECK(rows.sizes() == tokens.sizes(), op, "rows must have tokens' shape ", tokens.sizes(), ", got ",
               rows.sizes());
  const int64_t B = tokens.size(0), W = tokens.size(1), V = target_logits.size(1), R = target_logits.size(0);
  auto check = [&](const std::optional<at::Tensor>& t, const char* name, bool floating) {
    if (!t) return;
    DSPARK_CHECK(t->dim() == 1 && t->size(0) == B, op, name, " must have shape [B] = [", B, "], got ", t->sizes());
    DSPARK_CHECK(t->device() == target_logits.device(), op, name, " must be on ", target_logits.device(), ", got ",
                 t->device());
    DSPARK_CHECK(at::isFloatingType(t->scalar_type()) == floating, op, name, " must be a ",
                 floating ? "floating" : "integer", " tensor, got ", t->scalar_type());
  };
  check(temperature, "temperature", true);
  check(top_k, "top_k", false);
  check(top_p, "top_p", true);
  check(min_p, "min_p", true);

  const at::Tensor tok = tokens.to(at::kLong).contiguous();
  const at::Tensor row = rows.to(at::kLong).contiguous();
  const at::Tensor temp_c = temperature ? temperature->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor top_k_c = top_k ? top_k->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor top_p_c = top_p ? top_p->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor min_p_c = min_p_contiguous(min_p);
  const int64_t* tok_p = tok.const_data_ptr<int64_t>();
  const int64_t* row_p = row.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * W; ++i)  // data check: always on the CPU
    DSPARK_CHECK(row_p[i] < R, op, "rows[", i / W, ", ", i % W, "] = ", row_p[i],
                 " is not a row of target_logits (it has ", R, "; -1 = padding)");
  const float* temp_p = temp_c.defined() ? temp_c.const_data_ptr<float>() : nullptr;
  const int64_t* top_k_p = top_k_c.defined() ? top_k_c.const_data_ptr<int64_t>() : nullptr;
  const float* top_p_p = top_p_c.defined() ? top_p_c.const_data_ptr<float>() : nullptr;
  const float* mp_p = min_p_ptr(min_p_c);

  at::Tensor out = at::empty({B, W}, target_logits.options().dtype(at::kFloat));
  float* out_p = out.mutable_data_ptr<float>();
  const int64_t ts0 = target_logits.stride(0), ts1 = target_logits.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_logits.scalar_type(), "token_logprobs_cpu", [&] {
    const scalar_t* tptr = target_logits.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1));
    at::parallel_for(0, B * W, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / W, r = row_p[i], x = tok_p[i];
        out_p[i] = kRowNegInf;
        if (r < 0 || x < 0 || x >= V) continue;
        const float t = temp_p ? temp_p[b] : 0.f;
        const float T = t > 0.f ? t : 1.f;  // greedy requests: the raw logits' distribution
        const Row<scalar_t> trow{tptr + r * ts0, ts1};
        const RowStats st = row_stats(trow, V, T, top_k_p ? top_k_p[b] : 0, top_p_p ? top_p_p[b] : 1.f,
                                      log_min_p_at(mp_p, b), scratch);
        // A -inf (or NaN) logit has p = 0, also in a row with no finite entry (lse = -inf).
        const float sx = scale_logit(trow[x], T);
        out_p[i] = sx > kRowNegInf ? st.log_prob(sx) : kRowNegInf;
      }
    });
  });
  return out;
}

}  // namespace dspark
