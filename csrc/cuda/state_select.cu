// state_select on CUDA: grid (request, 16 KB tile) (state_select_kernel in
// dspark/kv.cuh). No host sync.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dspark/kv.cuh"
#include "kv.h"

namespace dspark {

void state_select_cuda(const at::Tensor& states, const at::Tensor& index, const at::Tensor& out) {
  constexpr const char* op = "state_select";
  check_state_select_args(states, index, out);
  TORCH_CHECK(states.is_cuda(), op, ": states must be a CUDA tensor, got ", states.device());
  c10::cuda::CUDAGuard guard(states.device());
  const int64_t B = states.size(0);
  const int64_t row_bytes = kvcheck::row_bytes(out, 1);
  if (B == 0 || row_bytes == 0) return;
  TORCH_CHECK(B <= 0x7fffffffLL, op, ": batch of ", B, " requests is too large for one grid");
  const int64_t tiles = kv::state_tiles(row_bytes);
  TORCH_CHECK(tiles <= 65535, op, ": a state of ", row_bytes, " bytes is too large for one grid");
  const at::Tensor idx = index.contiguous();
  const int64_t es = static_cast<int64_t>(states.element_size());

  kv::StateParams p{};
  p.states = static_cast<const char*>(states.const_data_ptr());
  p.out = static_cast<char*>(out.data_ptr());
  p.index = {idx.const_data_ptr(), idx.scalar_type() == at::kLong ? 1 : 0};
  p.states_stride0 = states.stride(0) * es;
  p.states_stride1 = states.stride(1) * es;
  p.out_stride0 = out.stride(0) * es;
  p.S = states.size(1);
  p.row_bytes = row_bytes;
  p.vec = kv::vector_bytes(reinterpret_cast<uint64_t>(p.states) | reinterpret_cast<uint64_t>(p.out) |
                           static_cast<uint64_t>(p.states_stride0) | static_cast<uint64_t>(p.states_stride1) |
                           static_cast<uint64_t>(p.out_stride0) | static_cast<uint64_t>(row_bytes));
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(tiles));
  kv::state_select_kernel<<<grid, kv::kStateThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dspark
