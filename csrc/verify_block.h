// verify_block: declarations and argument checks shared by the CPU and CUDA
// launchers (docs/verification.md). The op schema is its OpSpec (dspark_kernels/verification.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

#include "torch_checks.h"

namespace dspark {

std::tuple<at::Tensor, at::Tensor> verify_block_cpu(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_logits, const std::optional<at::Tensor>& draft_probs,
    const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& offset,
    int64_t max_num_draft, c10::string_view method, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index);

std::tuple<at::Tensor, at::Tensor> verify_block_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_logits, const std::optional<at::Tensor>& draft_probs,
    const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& offset,
    int64_t max_num_draft, c10::string_view method, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index);

// The schema's `str method`: "token" (false) or "block" (true); anything else is an error.
inline bool parse_verify_method(c10::string_view method) {
  if (method == c10::string_view("token")) return false;
  if (method == c10::string_view("block")) return true;
  TORCH_CHECK_VALUE(false, "verify_block: method must be one of ('token', 'block'), got '",
                    std::string(method.data(), method.size()), "'");
  return false;
}

// Shape / dtype / device checks (no data reads, so no host sync on CUDA).
inline void check_verify_block_args(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_logits, const std::optional<at::Tensor>& draft_probs,
    const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& offset,
    int64_t max_num_draft, const std::optional<at::Tensor>& min_p, const std::optional<at::Tensor>& draft_index) {
  constexpr const char* op = "verify_block";
  DSPARK_CHECK_DIM(op, target_logits, 2);
  DSPARK_CHECK_FLOAT(op, target_logits);
  DSPARK_CHECK_DIM(op, draft_tokens, 1);
  DSPARK_CHECK_INT(op, draft_tokens);
  DSPARK_CHECK_DIM(op, cu_num_draft, 1);
  DSPARK_CHECK_INT(op, cu_num_draft);
  DSPARK_CHECK(cu_num_draft.size(0) >= 1, op, "cu_num_draft must have B + 1 >= 1 entries, got shape ",
               cu_num_draft.sizes());
  const int64_t B = cu_num_draft.size(0) - 1;
  const int64_t N = draft_tokens.size(0);
  const int64_t V = target_logits.size(1);
  DSPARK_CHECK(V >= 1, op, "target_logits must have a vocabulary of at least 1, got shape ",
               target_logits.sizes());
  DSPARK_CHECK(V <= int64_t{0x7fffffff}, op, "vocabulary too large for int32 token ids (V = ", V, " > 2^31 - 1)");
  DSPARK_CHECK(target_logits.size(0) == N + B, op,
               "target_logits must have N + B = ", N + B, " rows (N = draft_tokens.size(0) = ", N,
               ", B = cu_num_draft.size(0) - 1 = ", B, "), got ", target_logits.size(0));
  // The output is [B, max_num_draft + 1] int32 and num_accepted (<= max_num_draft) is
  // int32: max_num_draft + 1 must fit in int32 (checked before anything adds 1 to it).
  DSPARK_CHECK(max_num_draft >= 0 && max_num_draft <= int64_t{0x7ffffffe}, op,
               "max_num_draft must be in [0, 2^31 - 2] (the output has max_num_draft + 1 int32 columns), got ",
               max_num_draft);
  DSPARK_CHECK(!(draft_logits.has_value() && draft_probs.has_value()), op,
               "give draft_logits or draft_probs, not both");
  DSPARK_CHECK_DEVICE(op, draft_tokens, target_logits);
  DSPARK_CHECK_DEVICE(op, cu_num_draft, target_logits);
  for (const auto* named : {&draft_logits, &draft_probs}) {
    if (!named->has_value()) continue;
    const at::Tensor& d = named->value();
    const char* name = named == &draft_logits ? "draft_logits" : "draft_probs";
    // With draft_index, q rows are gathered: any number of rows.
    if (draft_index.has_value()) {
      DSPARK_CHECK(d.dim() == 2 && d.size(1) == V, op, name, " must have shape [R, V] with V = ", V, ", got ",
                   d.sizes());
    } else {
      DSPARK_CHECK(d.dim() == 2 && d.size(0) == N && d.size(1) == V, op, name, " must have shape [N, V] = [",
                   N, ", ", V, "], got ", d.sizes());
    }
    DSPARK_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == at::kHalf ||
                     d.scalar_type() == at::kBFloat16,
                 op, name, " must be float32, float16 or bfloat16, got ", d.scalar_type());
    DSPARK_CHECK(d.device() == target_logits.device(), op, name, " must be on ", target_logits.device(),
                 ", got ", d.device());
  }
  check_sampling_args(op, target_logits, B, temperature, top_k, top_p, seed, offset);
  check_min_p_arg(op, target_logits, B, min_p);
  check_draft_index_arg(op, target_logits, N, draft_index, draft_logits.has_value() || draft_probs.has_value(),
                        draft_logits ? draft_logits->size(0) : (draft_probs ? draft_probs->size(0) : 0));
}

}  // namespace dspark
