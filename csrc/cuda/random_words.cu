// random_words on CUDA: argument checks and the launch of random_words_kernel
// (dspark/random_words.cuh; block count from dspark/launch.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dspark/random_words.cuh"
#include "random_words.h"

namespace dspark {
at::Tensor random_words_cuda(const at::Tensor& seed, const at::Tensor& position, const at::Tensor& index,
                             int64_t salt) {
  check_random_words_args(seed, position, index, salt);
  TORCH_CHECK(seed.is_cuda(), "random_words: seed must be a CUDA tensor, got ", seed.device());
  c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor s = seed.to(at::kLong).contiguous();
  const at::Tensor p = position.to(at::kLong).contiguous();
  const at::Tensor i = index.to(at::kLong).contiguous();
  at::Tensor out = at::empty(seed.sizes(), seed.options().dtype(at::kLong));
  const int64_t n = out.numel();
  if (n == 0) return out;
  rw::random_words_kernel<<<static_cast<unsigned>(rw::blocks(n)), rw::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s.const_data_ptr<int64_t>(), p.const_data_ptr<int64_t>(), i.const_data_ptr<int64_t>(),
      static_cast<uint32_t>(salt), out.mutable_data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dspark
