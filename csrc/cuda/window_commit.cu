// window_commit on CUDA: one CTA per row (window_commit_kernel in
// dspark/kv.cuh). No host sync.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dspark/kv.cuh"
#include "kv.h"

namespace dspark {
namespace {

kv::IntArray int_array(const at::Tensor& t) { return {t.const_data_ptr(), t.scalar_type() == at::kLong ? 1 : 0}; }

}  // namespace

void window_commit_cuda(const at::Tensor& window, const at::Tensor& rows, const at::Tensor& cu,
                        const at::Tensor& positions, const at::Tensor& keep) {
  constexpr const char* op = "window_commit";
  check_window_commit_args(window, rows, cu, positions, keep);
  TORCH_CHECK(window.is_cuda(), op, ": window must be a CUDA tensor, got ", window.device());
  c10::cuda::CUDAGuard guard(window.device());
  const int64_t B = window.size(0), T = rows.size(0);
  const int64_t row_bytes = kvcheck::row_bytes(rows, 1);
  if (B == 0 || T == 0 || row_bytes == 0) return;
  TORCH_CHECK(T <= 0x7fffffffLL, op, ": ", T, " rows are too many for one grid");
  TORCH_CHECK(row_bytes <= 0x7fffffffLL, op, ": a row of ", row_bytes, " bytes is too large");
  const at::Tensor cu_c = cu.contiguous();
  const at::Tensor pos_c = positions.contiguous();
  const at::Tensor keep_c = keep.contiguous();
  const int64_t es = static_cast<int64_t>(window.element_size());

  kv::WindowParams p{};
  p.window = static_cast<char*>(window.data_ptr());
  p.rows = static_cast<const char*>(rows.const_data_ptr());
  p.cu = int_array(cu_c);
  p.positions = int_array(pos_c);
  p.keep = {keep_c.const_data_ptr(), static_cast<int32_t>(keep_c.element_size())};
  p.window_stride0 = window.stride(0) * es;
  p.window_stride1 = window.stride(1) * es;
  p.rows_stride0 = rows.stride(0) * es;
  p.B = B;
  p.W = window.size(1);
  p.T = T;
  p.row_bytes = static_cast<int32_t>(row_bytes);
  p.vec = kv::vector_bytes(reinterpret_cast<uint64_t>(p.window) | reinterpret_cast<uint64_t>(p.rows) |
                           static_cast<uint64_t>(p.window_stride0) | static_cast<uint64_t>(p.window_stride1) |
                           static_cast<uint64_t>(p.rows_stride0) | static_cast<uint64_t>(row_bytes));
  kv::window_commit_kernel<<<static_cast<unsigned>(T), kv::kWindowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dspark
