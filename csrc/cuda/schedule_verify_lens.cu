// schedule_verify_lens on CUDA: argument checks, workspace and the three launches
// of dspark/schedule_verify_lens.cuh (the pipeline is described there). No host sync: every
// size comes from shapes, and the call can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "drafting.h"
#include "dspark/schedule_verify_lens.cuh"

namespace dspark {

std::tuple<at::Tensor, at::Tensor> schedule_verify_lens_cuda(const at::Tensor& confidence, const at::Tensor& sps,
                                                             bool early_stop) {
  check_schedule_verify_lens_args(confidence, sps);
  TORCH_CHECK(confidence.is_cuda(), "schedule_verify_lens: confidence must be a CUDA tensor, got ",
              confidence.device());
  c10::cuda::CUDAGuard guard(confidence.device());
  const int64_t R = confidence.size(0);
  const int64_t gamma = confidence.size(1);
  const int64_t n = R * gamma;
  const int64_t bmax = sps.size(0) - 1;
  const int64_t max_admit = schedule_max_admit(R, gamma, bmax);

  // Small tensors: fp32 confidences (any strides) and an fp64 table (no-ops when given so).
  const at::Tensor conf = confidence.scalar_type() == at::kFloat ? confidence : confidence.to(at::kFloat);
  const at::Tensor table = sps.to(at::kDouble).contiguous();
  const auto int_opts = confidence.options().dtype(at::kInt);
  at::Tensor verify_lens = at::empty({R}, int_opts);
  at::Tensor cu_verify = at::empty({R + 1}, int_opts);

  // One workspace: keys, survivals, block results, ranks (dspark/launch.h).
  const sched::Workspace w = sched::workspace(R, gamma);
  const int64_t num_parts = w.num_parts;
  at::Tensor ws = at::empty({w.bytes}, confidence.options().dtype(at::kByte));
  char* base = static_cast<char*>(ws.mutable_data_ptr());
  auto* keys = reinterpret_cast<unsigned long long*>(base + w.keys);
  auto* quant = reinterpret_cast<long long*>(base + w.quant);
  auto* part_count = reinterpret_cast<long long*>(base + w.part_count);
  auto* part_theta = reinterpret_cast<double*>(base + w.part_theta);
  auto* rank = reinterpret_cast<int32_t*>(base + w.rank);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0) {
    sched::survival_kernel<<<static_cast<unsigned>((R + sched::kThreads - 1) / sched::kThreads), sched::kThreads, 0,
                             stream>>>(conf.const_data_ptr<float>(), conf.stride(0), conf.stride(1), R, gamma, keys,
                                       quant);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sched::rank_kernel<<<static_cast<unsigned>(num_parts), sched::kThreads, 0, stream>>>(
        keys, quant, table.const_data_ptr<double>(), n, R, max_admit, early_stop ? 1 : 0, rank, part_count,
        part_theta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sched::finish_kernel<<<1, sched::kFinishThreads, 0, stream>>>(
      rank, table.const_data_ptr<double>(), part_count, part_theta, num_parts, R, gamma, max_admit,
      early_stop ? 1 : 0, verify_lens.mutable_data_ptr<int32_t>(), cu_verify.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {verify_lens, cu_verify};
}

}  // namespace dspark
