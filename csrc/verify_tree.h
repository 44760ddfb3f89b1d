// verify_tree: declarations and argument checks shared by the CPU and CUDA launchers
// (docs/verification.md, "verify_tree"). The op schema is its OpSpec
// (dspark_kernels/verification.py, VERIFY_TREE).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

#include "torch_checks.h"

namespace dspark {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_draft, const std::optional<at::Tensor>& draft_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset, int64_t max_depth, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index);

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_draft, const std::optional<at::Tensor>& draft_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset, int64_t max_depth, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index);

// Shape / dtype / device checks (no data reads, so no host sync on CUDA).
inline void check_verify_tree_args(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_draft, const std::optional<at::Tensor>& draft_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset, int64_t max_depth, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index) {
  constexpr const char* op = "verify_tree";
  DSPARK_CHECK_DIM(op, target_logits, 2);
  DSPARK_CHECK_FLOAT(op, target_logits);
  DSPARK_CHECK_DIM(op, draft_tokens, 1);
  DSPARK_CHECK_INT(op, draft_tokens);
  DSPARK_CHECK_DIM(op, parents, 1);
  DSPARK_CHECK_INT(op, parents);
  DSPARK_CHECK_DIM(op, cu_num_draft, 1);
  DSPARK_CHECK_INT(op, cu_num_draft);
  DSPARK_CHECK(cu_num_draft.size(0) >= 1, op, "cu_num_draft must have B + 1 >= 1 entries, got shape ",
               cu_num_draft.sizes());
  const int64_t B = cu_num_draft.size(0) - 1;
  const int64_t N = draft_tokens.size(0);
  const int64_t V = target_logits.size(1);
  DSPARK_CHECK(parents.size(0) == N, op, "parents must have shape [", N, "] (like draft_tokens), got ",
               parents.sizes());
  DSPARK_CHECK(V >= 1, op, "target_logits must have a vocabulary of at least 1, got shape ",
               target_logits.sizes());
  DSPARK_CHECK(target_logits.size(0) == N + B, op,
               "target_logits must have N + B = ", N + B, " rows (N = draft_tokens.size(0) = ", N,
               ", B = cu_num_draft.size(0) - 1 = ", B, "), got ", target_logits.size(0));
  DSPARK_CHECK(max_depth >= 0 && max_depth <= (int64_t{1} << 31) - 2, op,
               "max_depth must be in [0, 2^31 - 2], got ", max_depth);
  DSPARK_CHECK(!(draft_logits.has_value() && draft_probs.has_value()), op,
               "give draft_logits or draft_probs, not both");
  DSPARK_CHECK_DEVICE(op, draft_tokens, target_logits);
  DSPARK_CHECK_DEVICE(op, parents, target_logits);
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

// The data-dependent checks (host reads of contiguous int64 copies): on the CPU always,
// on CUDA under DSPARK_DEBUG=1. The messages are the Python checks' (verification.py).
inline void check_verify_tree_data(const int64_t* cu, const int64_t* parents, const int64_t* drafts, int64_t B,
                                   int64_t N, int64_t V, int64_t max_depth) {
  constexpr const char* op = "verify_tree";
  DSPARK_CHECK(cu[0] == 0, op, "cu_num_draft[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b < B; ++b)
    DSPARK_CHECK(cu[b + 1] >= cu[b], op, "cu_num_draft must be non-decreasing, got cu_num_draft[", b, "] = ",
                 cu[b], " > cu_num_draft[", b + 1, "] = ", cu[b + 1]);
  DSPARK_CHECK(cu[B] == N, op, "cu_num_draft[B] must equal draft_tokens.size(0) = ", N, ", got cu_num_draft[",
               B, "] = ", cu[B]);
  int64_t deepest = 0, where = 0;
  std::vector<int64_t> depth;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    depth.assign(n, 0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = cu[b] + j, pj = parents[i];
      DSPARK_CHECK(pj >= -1, op, "parents[", i, "] = ", pj, " is out of range (request ", b,
                   ": local parent indices are >= -1)");
      DSPARK_CHECK(pj < j, op, "parents[", i, "] = ", pj, " must be < its local index ", j, " (request ", b,
                   ": nodes in topological order, parents within the request; -1 = the root)");
      depth[j] = pj < 0 ? 1 : depth[pj] + 1;
      if (depth[j] > deepest) {
        deepest = depth[j];
        where = b;
      }
    }
  }
  DSPARK_CHECK(deepest <= max_depth, op, "request ", where, "'s tree has depth ", deepest,
               ", more than max_depth = ", max_depth);
  for (int64_t i = 0; i < N; ++i)
    DSPARK_CHECK(drafts[i] >= -1 && drafts[i] < V, op, "draft_tokens[", i, "] = ", drafts[i],
                 " is outside [-1, V) with V = ", V);
}

}  // namespace dspark
