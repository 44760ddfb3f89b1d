// verify_tree on CUDA: argument checks, workspace, dtype dispatch and the launch of the
// kernel in dspark/verify_tree.cuh. No host sync (every size comes from shapes) except
// the data-dependent checks under DSPARK_DEBUG=1.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "dspark/verify_tree.cuh"
#include "verify_tree.h"

namespace dspark {
namespace {

constexpr const char* kOp = "verify_tree";

template <class F>
void dispatch_float_type(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat: f(vt::F32()); break;
    case at::kHalf: f(vt::F16()); break;
    case at::kBFloat16: f(vt::BF16()); break;
    default:
      TORCH_CHECK(false, kOp, ": ", name, " must be float32, float16 or bfloat16, got ", type);
  }
}

vt::IntArray int_array(const at::Tensor& t) {
  vt::IntArray a;
  a.ptr = t.const_data_ptr();
  a.is_int64 = t.scalar_type() == at::kLong ? 1 : 0;
  return a;
}

bool debug_checks() {
  const char* e = std::getenv("DSPARK_DEBUG");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_draft, const std::optional<at::Tensor>& draft_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset, int64_t max_depth, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index) {
  check_verify_tree_args(target_logits, draft_tokens, parents, cu_num_draft, draft_logits, draft_probs,
                         temperature, top_k, top_p, seed, offset, max_depth, min_p, draft_index);
  TORCH_CHECK(target_logits.is_cuda(), kOp, ": target_logits must be a CUDA tensor, got ", target_logits.device());
  const int64_t B = cu_num_draft.size(0) - 1;
  const int64_t N = draft_tokens.size(0);
  const int64_t V = target_logits.size(1);
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), kOp, ": too many requests for the CUDA kernel (", B, ")");

  c10::cuda::CUDAGuard guard(target_logits.device());
  const auto int_opts = target_logits.options().dtype(at::kInt);
  at::Tensor accept_path = at::empty({B, max_depth + 1}, int_opts);
  at::Tensor output_tokens = at::empty({B, max_depth + 1}, int_opts);
  at::Tensor num_accepted = at::empty({B}, int_opts);
  if (B == 0) return {accept_path, num_accepted, output_tokens};

  const at::Tensor drafts_c = draft_tokens.contiguous();
  const at::Tensor parents_c = parents.contiguous();
  const at::Tensor cu_c = cu_num_draft.contiguous();
  if (debug_checks()) {  // host reads: only under DSPARK_DEBUG=1
    const at::Tensor cu_h = cu_c.to(at::kCPU).to(at::kLong).contiguous();
    const at::Tensor par_h = parents_c.to(at::kCPU).to(at::kLong).contiguous();
    const at::Tensor drafts_h = drafts_c.to(at::kCPU).to(at::kLong).contiguous();
    check_verify_tree_data(cu_h.const_data_ptr<int64_t>(), par_h.const_data_ptr<int64_t>(),
                           drafts_h.const_data_ptr<int64_t>(), B, N, V, max_depth);
    if (draft_index) {
      const at::Tensor di_h = draft_index->to(at::kCPU).to(at::kLong).contiguous();
      check_draft_index_data(kOp, di_h.const_data_ptr<int64_t>(), N,
                             (draft_logits ? *draft_logits : *draft_probs).size(0),
                             draft_logits ? "draft_logits" : "draft_probs");
    }
  }
  const at::Tensor seed_c = seed.contiguous();
  const at::Tensor offset_c = offset.contiguous();
  at::Tensor temp_c, top_k_c, top_p_c;
  if (temperature) temp_c = temperature->to(at::kFloat).contiguous();
  if (top_k) top_k_c = top_k->contiguous();
  if (top_p) top_p_c = top_p->to(at::kFloat).contiguous();
  const at::Tensor min_p_c = min_p_contiguous(min_p);
  const at::Tensor draft_index_c = draft_index ? draft_index->contiguous() : at::Tensor();
  const bool sampling = temperature.has_value();
  at::Tensor workspace = at::empty({vt::workspace_floats(B, V, sampling)}, target_logits.options().dtype(at::kFloat));

  const at::Tensor* draft_dist = draft_logits ? &draft_logits.value() : (draft_probs ? &draft_probs.value() : nullptr);
  const char* draft_name = draft_logits ? "draft_logits" : "draft_probs";

  vt::Params p;
  p.target = target_logits.const_data_ptr();
  p.target_stride0 = target_logits.stride(0);
  p.target_stride1 = target_logits.stride(1);
  p.draft = draft_dist ? draft_dist->const_data_ptr() : nullptr;
  p.draft_stride0 = draft_dist ? draft_dist->stride(0) : 0;
  p.draft_stride1 = draft_dist ? draft_dist->stride(1) : 0;
  p.draft_kind = draft_logits ? vt::kDraftLogits : (draft_probs ? vt::kDraftProbs : vt::kPointMass);
  p.draft_tokens = int_array(drafts_c);
  p.parents = int_array(parents_c);
  p.cu = int_array(cu_c);
  p.top_k = top_k ? int_array(top_k_c) : vt::IntArray{nullptr, 0};
  p.seed = int_array(seed_c);
  p.offset = int_array(offset_c);
  p.temperature = temperature ? temp_c.const_data_ptr<float>() : nullptr;
  p.top_p = top_p ? top_p_c.const_data_ptr<float>() : nullptr;
  p.min_p = min_p_ptr(min_p_c);
  p.draft_index = draft_index ? int_array(draft_index_c) : vt::IntArray{nullptr, 0};
  p.draft_rows = draft_dist ? draft_dist->size(0) : 0;
  p.B = B;
  p.N = N;
  p.V = V;
  p.max_depth = max_depth;
  p.workspace = sampling ? workspace.mutable_data_ptr<float>() : nullptr;
  p.accept_path = accept_path.mutable_data_ptr<int32_t>();
  p.num_accepted = num_accepted.mutable_data_ptr<int32_t>();
  p.output_tokens = output_tokens.mutable_data_ptr<int32_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType draft_type = draft_dist ? draft_dist->scalar_type() : at::kFloat;
  dispatch_float_type(target_logits.scalar_type(), "target_logits", [&](auto target_tag) {
    using TT = decltype(target_tag);
    dispatch_float_type(draft_type, draft_name, [&](auto draft_tag) {
      using DT = decltype(draft_tag);
      vt::tree_kernel<TT, DT><<<static_cast<unsigned>(B), vt::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {accept_path, num_accepted, output_tokens};
}

}  // namespace dspark
