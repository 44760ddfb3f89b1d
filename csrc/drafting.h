// Drafting ops (docs/drafting.md): schedule_verify_lens and draft_sample_block.
// Declarations and the host argument checks shared by the CPU and CUDA launchers.
// The op schemas live in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "torch_checks.h"

namespace dspark {

// ---------------------------------------------------------------------------
// schedule_verify_lens(confidence [R, gamma], sps [Bmax + 1], early_stop)
//   -> verify_lens [R] int32, cu_verify [R + 1] int32
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> schedule_verify_lens_cpu(const at::Tensor& confidence, const at::Tensor& sps,
                                                            bool early_stop);
std::tuple<at::Tensor, at::Tensor> schedule_verify_lens_cuda(const at::Tensor& confidence, const at::Tensor& sps,
                                                             bool early_stop);

// Candidates are indexed r * gamma + j in 32 bits and their fixed-point survival sums
// (2^40 per unit) must stay below 2^63: R * gamma <= 2^22.
constexpr int64_t kScheduleMaxCandidates = int64_t{1} << 22;

inline void check_schedule_verify_lens_args(const at::Tensor& confidence, const at::Tensor& sps) {
  constexpr const char* op = "schedule_verify_lens";
  DSPARK_CHECK_DIM(op, confidence, 2);
  DSPARK_CHECK(at::isFloatingType(confidence.scalar_type()), op,
               "confidence must be a floating tensor, got ", confidence.scalar_type());
  DSPARK_CHECK_DIM(op, sps, 1);
  DSPARK_CHECK(at::isFloatingType(sps.scalar_type()), op, "sps must be a floating tensor, got ",
               sps.scalar_type());
  DSPARK_CHECK_DEVICE(op, sps, confidence);
  const int64_t R = confidence.size(0);
  DSPARK_CHECK(sps.size(0) >= R + 1, op, "sps must have Bmax + 1 >= R + 1 = ", R + 1,
               " entries (SPS(R) is the rate without speculation), got shape ", sps.sizes());
  DSPARK_CHECK(R * confidence.size(1) <= kScheduleMaxCandidates, op, "R * gamma = ", R * confidence.size(1),
               " candidates is more than the supported ", kScheduleMaxCandidates, " (confidence shape ",
               confidence.sizes(), ")");
}

// ---------------------------------------------------------------------------
// draft_sample_block(base_logits [B, gamma, V], anchor [B], markov_w1 [V, r]?, markov_w2 [r, V]?,
//                    temperature [B]?, top_k [B]?, top_p [B]?, seed [B], offset [B], return_logits,
//                    min_p [B]?)
//   -> draft_tokens [B, gamma] int32, draft_logits [B, gamma, V] fp32 (or [0])
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> draft_sample_block_cpu(
    const at::Tensor& base_logits, const at::Tensor& anchor, const std::optional<at::Tensor>& markov_w1,
    const std::optional<at::Tensor>& markov_w2, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset, bool return_logits, const std::optional<at::Tensor>& min_p);

inline void check_draft_sample_block_args(
    const at::Tensor& base_logits, const at::Tensor& anchor, const std::optional<at::Tensor>& markov_w1,
    const std::optional<at::Tensor>& markov_w2, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset) {
  constexpr const char* op = "draft_sample_block";
  DSPARK_CHECK_DIM(op, base_logits, 3);
  DSPARK_CHECK_FLOAT(op, base_logits);
  const int64_t B = base_logits.size(0);
  const int64_t V = base_logits.size(2);
  DSPARK_CHECK(V >= 1, op, "base_logits must have a vocabulary of at least 1, got shape ", base_logits.sizes());
  DSPARK_CHECK(V <= 0x7fffffffLL, op, "vocabulary too large (", V, " > 2^31 - 1)");
  DSPARK_CHECK_DIM(op, anchor, 1);
  DSPARK_CHECK_INT(op, anchor);
  DSPARK_CHECK_SIZE(op, anchor, 0, B);
  DSPARK_CHECK_DEVICE(op, anchor, base_logits);
  DSPARK_CHECK(markov_w1.has_value() == markov_w2.has_value(), op,
               "give both markov_w1 and markov_w2 or neither, got markov_w1 ",
               markov_w1.has_value() ? "set" : "None", " and markov_w2 ", markov_w2.has_value() ? "set" : "None");
  if (markov_w1.has_value()) {
    const at::Tensor& w1 = *markov_w1;
    const at::Tensor& w2 = *markov_w2;
    DSPARK_CHECK(w1.dim() == 2 && w1.size(0) == V && w1.size(1) >= 1, op,
                 "markov_w1 must have shape [V, r] = [", V, ", r >= 1], got ", w1.sizes());
    DSPARK_CHECK(w2.dim() == 2 && w2.size(0) == w1.size(1) && w2.size(1) == V, op,
                 "markov_w2 must have shape [r, V] = [", w1.size(1), ", ", V, "], got ", w2.sizes());
    DSPARK_CHECK(w1.scalar_type() == at::kFloat || w1.scalar_type() == at::kHalf ||
                     w1.scalar_type() == at::kBFloat16,
                 op, "markov_w1 must be float32, float16 or bfloat16, got ", w1.scalar_type());
    DSPARK_CHECK(w2.scalar_type() == w1.scalar_type(), op, "markov_w2 must have markov_w1's dtype ",
                 w1.scalar_type(), ", got ", w2.scalar_type());
    DSPARK_CHECK(w1.device() == base_logits.device(), op, "markov_w1 must be on ", base_logits.device(),
                 ", got ", w1.device());
    DSPARK_CHECK(w2.device() == base_logits.device(), op, "markov_w2 must be on ", base_logits.device(),
                 ", got ", w2.device());
  }
  check_sampling_args(op, base_logits, B, temperature, top_k, top_p, seed, offset);
}

}  // namespace dspark
