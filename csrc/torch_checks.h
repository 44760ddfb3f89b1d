// Host-side argument checks shared by the CPU and CUDA launchers. Every message
// names the op and the argument, says what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define DSPARK_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

#define DSPARK_CHECK_DIM(op, t, d)                                                      \
  DSPARK_CHECK((t).dim() == (d), op, #t " must be a " #d "-D tensor, got shape ",     \
               (t).sizes())

#define DSPARK_CHECK_DEVICE(op, t, ref)                                                 \
  DSPARK_CHECK((t).device() == (ref).device(), op, #t " must be on ", (ref).device(), \
               " (like " #ref "), got ", (t).device())

#define DSPARK_CHECK_SIZE(op, t, d, n)                                                  \
  DSPARK_CHECK((t).size(d) == (n), op, #t ".size(" #d ") must be ", (n), ", got ",     \
               (t).size(d), " (shape ", (t).sizes(), ")")

#define DSPARK_CHECK_FLOAT(op, t)                                                       \
  DSPARK_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||    \
                   (t).scalar_type() == at::kBFloat16,                                 \
               op, #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())

#define DSPARK_CHECK_INT(op, t)                                                         \
  DSPARK_CHECK((t).scalar_type() == at::kInt || (t).scalar_type() == at::kLong, op,    \
               #t " must be int32 or int64, got ", (t).scalar_type())

#include <c10/util/Optional.h>

namespace dspark {

// The per-request sampling arguments every sampling op takes (temperature, top_k,
// top_p optional; seed and offset required): each a [B] tensor on `ref`'s device,
// floating for temperature / top_p, int32 / int64 for the others.
inline void check_sampling_args(const char* op, const at::Tensor& ref, int64_t B,
                                const std::optional<at::Tensor>& temperature,
                                const std::optional<at::Tensor>& top_k,
                                const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
                                const at::Tensor& offset) {
  auto check = [&](const at::Tensor& t, const char* name, bool floating) {
    DSPARK_CHECK(t.dim() == 1 && t.size(0) == B, op, name, " must have shape [B] = [", B, "], got ",
                 t.sizes());
    DSPARK_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ", t.device());
    if (floating) {
      DSPARK_CHECK(at::isFloatingType(t.scalar_type()), op, name, " must be a floating tensor, got ",
                   t.scalar_type());
    } else {
      DSPARK_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, name,
                   " must be int32 or int64, got ", t.scalar_type());
    }
  };
  if (temperature.has_value()) check(*temperature, "temperature", true);
  if (top_k.has_value()) check(*top_k, "top_k", false);
  if (top_p.has_value()) check(*top_p, "top_p", true);
  check(seed, "seed", false);
  check(offset, "offset", false);
}

// min_p [B]? (verify_block, verify_tree, draft_sample_block, token_logprobs): floating,
// on ref's device.
inline void check_min_p_arg(const char* op, const at::Tensor& ref, int64_t B, const std::optional<at::Tensor>& min_p) {
  if (!min_p.has_value()) return;
  const at::Tensor& t = *min_p;
  DSPARK_CHECK(t.dim() == 1 && t.size(0) == B, op, "min_p must have shape [B] = [", B, "], got ", t.sizes());
  DSPARK_CHECK(t.device() == ref.device(), op, "min_p must be on ", ref.device(), ", got ", t.device());
  DSPARK_CHECK(at::isFloatingType(t.scalar_type()), op, "min_p must be a floating tensor, got ", t.scalar_type());
}

// min_p as the kernels read it: contiguous fp32 (undefined when absent).
inline at::Tensor min_p_contiguous(const std::optional<at::Tensor>& min_p) {
  return min_p ? min_p->to(at::kFloat).contiguous() : at::Tensor();
}
inline const float* min_p_ptr(const at::Tensor& min_p_c) {
  return min_p_c.defined() ? min_p_c.const_data_ptr<float>() : nullptr;
}

// draft_index [N]? (verify_block, verify_tree): int32 / int64 on ref's device, and it
// selects rows of draft_logits / draft_probs, so one of them must be given. The range
// [0, rows) is a data check (CPU always; CUDA reads treat an entry out of range as an
// unusable q, never an out-of-bounds read).
inline void check_draft_index_arg(const char* op, const at::Tensor& ref, int64_t N,
                                  const std::optional<at::Tensor>& draft_index, bool has_draft_dist,
                                  int64_t draft_rows) {
  if (!draft_index.has_value()) return;
  const at::Tensor& t = *draft_index;
  DSPARK_CHECK(t.dim() == 1 && t.size(0) == N, op, "draft_index must have shape [N] = [", N, "], got ", t.sizes());
  DSPARK_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op,
               "draft_index must be int32 or int64, got ", t.scalar_type());
  DSPARK_CHECK(t.device() == ref.device(), op, "draft_index must be on ", ref.device(), ", got ", t.device());
  DSPARK_CHECK(has_draft_dist, op, "draft_index needs draft_logits or draft_probs (it selects their rows)");
  // A shape check (no sync): the kernels clamp entries into [0, rows), which needs a row.
  DSPARK_CHECK(N == 0 || draft_rows >= 1, op, "draft_index needs at least one row of draft_logits / draft_probs for N = ",
               N, " drafts");
}

// The host range check of draft_index (contiguous int64 values): every entry a row.
inline void check_draft_index_data(const char* op, const int64_t* idx, int64_t N, int64_t rows, const char* name) {
  for (int64_t i = 0; i < N; ++i)
    DSPARK_CHECK(idx[i] >= 0 && idx[i] < rows, op, "draft_index[", i, "] = ", idx[i], " is outside [0, ", name,
                 ".size(0)) = [0, ", rows, ")");
}

// The same arguments as the CPU kernels read them: contiguous int64 seed / offset /
// top_k and fp32 temperature / top_p (undefined tensors for absent optionals).
struct SamplingTensors {
  at::Tensor seed, offset, temperature, top_k, top_p;

  SamplingTensors(const std::optional<at::Tensor>& temperature_, const std::optional<at::Tensor>& top_k_,
                  const std::optional<at::Tensor>& top_p_, const at::Tensor& seed_, const at::Tensor& offset_)
      : seed(seed_.to(at::kLong).contiguous()), offset(offset_.to(at::kLong).contiguous()) {
    if (temperature_) temperature = temperature_->to(at::kFloat).contiguous();
    if (top_k_) top_k = top_k_->to(at::kLong).contiguous();
    if (top_p_) top_p = top_p_->to(at::kFloat).contiguous();
  }
  const float* temperature_ptr() const { return temperature.defined() ? temperature.const_data_ptr<float>() : nullptr; }
  const int64_t* top_k_ptr() const { return top_k.defined() ? top_k.const_data_ptr<int64_t>() : nullptr; }
  const float* top_p_ptr() const { return top_p.defined() ? top_p.const_data_ptr<float>() : nullptr; }
};

}  // namespace dspark
