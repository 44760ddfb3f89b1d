// kv_release_pages on CUDA: one warp per request (release_kernel in
// dspark/kv.cuh). Refcounts drop with compare-and-swap and never go below zero;
// a page shared by requests is returned by the decrement that reaches zero.
// No host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "dspark/kv.cuh"
#include "kv.h"

namespace dspark {
namespace {

kv::IntArray int_array(const at::Tensor& t) { return {t.const_data_ptr(), t.scalar_type() == at::kLong ? 1 : 0}; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> kv_release_pages_cuda(const at::Tensor& block_table, const at::Tensor& new_len,
                                                         const at::Tensor& old_len, int64_t page_size,
                                                         const at::Tensor& refcount) {
  constexpr const char* op = "kv_release_pages";
  check_kv_release_pages_args(block_table, new_len, old_len, page_size, refcount);
  TORCH_CHECK(block_table.is_cuda(), op, ": block_table must be a CUDA tensor, got ", block_table.device());
  c10::cuda::CUDAGuard guard(block_table.device());
  const int64_t B = block_table.size(0);
  const int64_t P = block_table.size(1);
  at::Tensor freed = at::empty({B, P}, block_table.options().dtype(at::kInt));
  at::Tensor num_freed = at::empty({B}, block_table.options().dtype(at::kInt));
  if (B == 0) return {freed, num_freed};
  const at::Tensor bt = (P <= 1 || block_table.stride(1) == 1) ? block_table : block_table.contiguous();
  const at::Tensor nl = new_len.contiguous();
  const at::Tensor ol = old_len.contiguous();

  kv::ReleaseParams p{};
  p.block_table = int_array(bt);
  p.new_len = int_array(nl);
  p.old_len = int_array(ol);
  p.refcount = refcount.data_ptr();
  p.rc_is_int64 = refcount.scalar_type() == at::kLong ? 1 : 0;
  p.rc_stride = refcount.stride(0);
  p.freed = freed.mutable_data_ptr<int32_t>();
  p.num_freed = num_freed.mutable_data_ptr<int32_t>();
  p.bt_stride = bt.stride(0);
  p.B = B;
  p.P = P;
  p.num_pages = refcount.size(0);
  p.page_size = page_size;
  const int64_t blocks = kv::release_blocks(B);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kv::release_kernel<<<static_cast<unsigned>(blocks), kv::kReleaseWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {freed, num_freed};
}

}  // namespace dspark
