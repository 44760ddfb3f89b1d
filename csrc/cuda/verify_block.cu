// verify_block on CUDA: argument checks, workspace, dtype dispatch and the launches
// of the kernels in dspark/verify_block.cuh (the pipeline is described there).
// No host sync: every size comes from shapes, every per-request value stays on the
// device, and the call can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "dspark/verify_block.cuh"
#include "dspark/verify_block_method.cuh"
#include "verify_block.h"

namespace dspark {
namespace {

constexpr const char* kOp = "verify_block";

// Calls f(tag) with the element tag of a logits / probabilities tensor.
template <class F>
void dispatch_float_type(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat: f(vb::F32()); break;
    case at::kHalf: f(vb::F16()); break;
    case at::kBFloat16: f(vb::BF16()); break;
    default:
      TORCH_CHECK(false, kOp, ": ", name, " must be float32, float16 or bfloat16, got ", type);
  }
}

bool debug_checks() {
  const char* e = std::getenv("DSPARK_DEBUG");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

vb::IntArray int_array(const at::Tensor& t) {
  vb::IntArray a;
  a.ptr = t.const_data_ptr();
  a.is_int64 = t.scalar_type() == at::kLong ? 1 : 0;
  return a;
}

// Rows can be read 16 bytes at a time: aligned base and a row stride of whole 16 bytes.
bool rows_vectorizable(const at::Tensor& t) {
  const int64_t row_bytes = t.stride(0) * static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && row_bytes % 16 == 0;
}

void check_vocab_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, kOp, ": ", name,
              " must have stride 1 along the vocabulary (rows may be strided), got strides ", t.strides(),
              " for shape ", t.sizes(), "; pass ", name, ".contiguous()");
}

// Steps 1, 1b and 2: every row's statistics (the split max, then the split masses of
// sampling rows; filtered rows in filter_kernel).
template <class TT, class DT>
void launch_row_stats(const vb::Params& p, int64_t stat_rows, bool with_filters, bool sampling, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(stat_rows), static_cast<unsigned>(p.num_splits));
  vb::stats_kernel<TT, DT><<<grid, vb::kStatsThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (sampling) {
    vb::mass_kernel<TT, DT><<<grid, vb::kStatsThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (with_filters) {
    vb::filter_kernel<TT, DT><<<static_cast<unsigned>(stat_rows), vb::kFilterThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <class TT, class DT>
void launch(const vb::Params& p, int64_t stat_rows, bool with_filters, bool sampling, cudaStream_t stream) {
  launch_row_stats<TT, DT>(p, stat_rows, with_filters, sampling, stream);
  vb::walk_kernel<TT, DT><<<static_cast<unsigned>(p.B), vb::kWalkThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (sampling) {
    vb::race_kernel<TT, DT><<<dim3(static_cast<unsigned>(p.B), static_cast<unsigned>(p.num_race_splits)),
                              vb::kRaceThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    vb::finish_kernel<<<static_cast<unsigned>(p.B), vb::kFinishThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// method="block" (sampling requests present): steps 1-2, then block_z_kernel (not for
// point masses) and block_walk_kernel in place of walk_kernel, then steps 4-5
// (dspark/verify_block_method.cuh).
template <class TT, class DT>
void launch_block(const vb::BlockParams& bp, int64_t stat_rows, bool with_filters, cudaStream_t stream) {
  const vb::Params& p = bp.p;
  launch_row_stats<TT, DT>(p, stat_rows, with_filters, true, stream);
  if (p.draft_kind != vb::kPointMass) {
    vb::block_z_kernel<TT, DT><<<static_cast<unsigned>(p.T), vb::kBlockZThreads, 0, stream>>>(bp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  vb::block_walk_kernel<TT, DT><<<static_cast<unsigned>(p.B), vb::kBlockWalkThreads, 0, stream>>>(bp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  vb::race_kernel<TT, DT><<<dim3(static_cast<unsigned>(p.B), static_cast<unsigned>(p.num_race_splits)),
                            vb::kRaceThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  vb::finish_kernel<<<static_cast<unsigned>(p.B), vb::kFinishThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_block_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_logits, const std::optional<at::Tensor>& draft_probs,
    const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& offset,
    int64_t max_num_draft, c10::string_view method, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& draft_index) {
  const bool block_method = parse_verify_method(method);
  check_verify_block_args(target_logits, draft_tokens, cu_num_draft, draft_logits, draft_probs, temperature,
                          top_k, top_p, seed, offset, max_num_draft, min_p, draft_index);
  TORCH_CHECK(target_logits.is_cuda(), kOp, ": target_logits must be a CUDA tensor, got ", target_logits.device());
  const int64_t B = cu_num_draft.size(0) - 1;
  const int64_t N = draft_tokens.size(0);
  const int64_t V = target_logits.size(1);
  const int64_t T = N + B;

  const at::Tensor* draft_dist = draft_logits ? &draft_logits.value() : (draft_probs ? &draft_probs.value() : nullptr);
  const char* draft_name = draft_logits ? "draft_logits" : "draft_probs";
  check_vocab_stride(target_logits, "target_logits");
  if (draft_dist) check_vocab_stride(*draft_dist, draft_name);

  const bool sampling = temperature.has_value();  // without temperature every row is greedy
  const bool q_stats = sampling && draft_logits.has_value();
  const bool with_filters = sampling && (top_k.has_value() || top_p.has_value() || min_p.has_value());
  const bool block = block_method && sampling;  // without temperature every row is greedy: the token walk
  // Grid sizes and the workspace layout (dspark/launch.h): split partials, filtered-row
  // thresholds, race descriptors, race partials, Z_j per target row.
  const vb::Plan plan = vb::plan(B, N, V, sampling, q_stats, with_filters, block, sizeof(vb::StatPartial),
                                 sizeof(vb::RowFilter), sizeof(vb::RaceDesc), sizeof(vb::RacePartial));
  const int64_t num_splits = plan.num_splits;
  const int64_t num_race_splits = plan.num_race_splits;
  TORCH_CHECK(num_splits <= vb::kMaxGridY && num_race_splits <= vb::kMaxGridY, kOp,
              ": vocabulary too large for the CUDA kernel, V = ", V, " > ", vb::kMaxGridY * vb::kRaceSplit);
  const int64_t stat_rows = plan.stat_rows;
  TORCH_CHECK(stat_rows <= std::numeric_limits<int32_t>::max() && B <= std::numeric_limits<int32_t>::max(), kOp,
              ": too many rows for the CUDA kernel (", stat_rows, ")");

  c10::cuda::CUDAGuard guard(target_logits.device());
  const auto int_opts = target_logits.options().dtype(at::kInt);
  at::Tensor output_tokens = at::full({B, max_num_draft + 1}, -1, int_opts);
  at::Tensor num_accepted = at::empty({B}, int_opts);
  if (B == 0) return {output_tokens, num_accepted};

  // Small per-request tensors: int32 / int64 are read as given; floats become fp32.
  // These are no-ops for the dtypes the Python wrapper produces.
  const at::Tensor drafts_c = draft_tokens.contiguous();
  const at::Tensor cu_c = cu_num_draft.contiguous();
  const at::Tensor seed_c = seed.contiguous();
  const at::Tensor offset_c = offset.contiguous();
  at::Tensor temp_c, top_k_c, top_p_c;
  if (temperature) temp_c = temperature->to(at::kFloat).contiguous();
  if (top_k) top_k_c = top_k->contiguous();
  if (top_p) top_p_c = top_p->to(at::kFloat).contiguous();
  const at::Tensor min_p_c = min_p_contiguous(min_p);
  const at::Tensor draft_index_c = draft_index ? draft_index->contiguous() : at::Tensor();
  if (draft_index && debug_checks()) {  // host read: only under DSPARK_DEBUG=1
    const at::Tensor di_h = draft_index_c.to(at::kCPU).to(at::kLong).contiguous();
    check_draft_index_data(kOp, di_h.const_data_ptr<int64_t>(), N, draft_dist->size(0), draft_name);
  }

  at::Tensor workspace = at::empty({plan.bytes}, target_logits.options().dtype(at::kByte));
  char* ws = static_cast<char*>(workspace.mutable_data_ptr());

  vb::Params p;
  p.target = target_logits.const_data_ptr();
  p.target_stride = target_logits.stride(0);
  p.target_vec = rows_vectorizable(target_logits) ? 1 : 0;
  p.draft = draft_dist ? draft_dist->const_data_ptr() : nullptr;
  p.draft_stride = draft_dist ? draft_dist->stride(0) : 0;
  p.draft_vec = draft_dist && rows_vectorizable(*draft_dist) ? 1 : 0;
  p.draft_kind = draft_logits ? vb::kDraftLogits : (draft_probs ? vb::kDraftProbs : vb::kPointMass);
  p.draft_tokens = int_array(drafts_c);
  p.cu = int_array(cu_c);
  p.top_k = top_k ? int_array(top_k_c) : vb::IntArray{nullptr, 0};
  p.seed = int_array(seed_c);
  p.offset = int_array(offset_c);
  p.temperature = temperature ? temp_c.const_data_ptr<float>() : nullptr;
  p.top_p = top_p ? top_p_c.const_data_ptr<float>() : nullptr;
  p.min_p = min_p_ptr(min_p_c);
  p.draft_index = draft_index ? int_array(draft_index_c) : vb::IntArray{nullptr, 0};
  p.draft_rows = draft_dist ? draft_dist->size(0) : 0;
  p.B = B;
  p.N = N;
  p.T = T;
  p.V = V;
  p.max_num_draft = max_num_draft;
  p.num_splits = num_splits;
  p.num_race_splits = num_race_splits;
  p.partials = reinterpret_cast<vb::StatPartial*>(ws + plan.partials);
  p.row_filter = with_filters ? reinterpret_cast<vb::RowFilter*>(ws + plan.row_filter) : nullptr;
  p.desc = reinterpret_cast<vb::RaceDesc*>(ws + plan.desc);
  p.race_partials = sampling ? reinterpret_cast<vb::RacePartial*>(ws + plan.race_partials) : nullptr;
  p.output_tokens = output_tokens.mutable_data_ptr<int32_t>();
  p.num_accepted = num_accepted.mutable_data_ptr<int32_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Point-mass drafts have no draft tensor; the draft tag is then never used.
  const at::ScalarType draft_type = draft_dist ? draft_dist->scalar_type() : at::kFloat;
  dispatch_float_type(target_logits.scalar_type(), "target_logits", [&](auto target_tag) {
    using TT = decltype(target_tag);
    dispatch_float_type(draft_type, draft_name, [&](auto draft_tag) {
      using DT = decltype(draft_tag);
      if (block) {
        vb::BlockParams bp;
        bp.p = p;
        bp.z = reinterpret_cast<double*>(ws + plan.z);
        launch_block<TT, DT>(bp, stat_rows, with_filters, stream);
      } else {
        launch<TT, DT>(p, stat_rows, with_filters, sampling, stream);
      }
    });
  });
  return {output_tokens, num_accepted};
}

}  // namespace dspark
