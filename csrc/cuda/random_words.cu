// random_words on CUDA: the raw Philox words of the randomness contract
// (docs/randomness.md), elementwise; the same words as csrc/cpu/random_words.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "dspark/philox.h"
#include "random_words.h"

namespace dspark {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this

__global__ void __launch_bounds__(kThreads)
    random_words_kernel(const int64_t* __restrict__ seed, const int64_t* __restrict__ position,
                        const int64_t* __restrict__ index, uint32_t salt, int64_t* __restrict__ out, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < n; k += step) {
    const int64_t i = index[k];
    // An index outside [0, 2^32) (a CPU error) gives -1, never a truncated index's word.
    out[k] = i >= 0 && i < kRandomWordsIndexEnd
                 ? static_cast<int64_t>(random_word(static_cast<uint64_t>(seed[k]), static_cast<uint64_t>(position[k]),
                                                    salt, static_cast<uint32_t>(i)))
                 : int64_t{-1};
  }
}

}  // namespace

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
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
  random_words_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s.const_data_ptr<int64_t>(), p.const_data_ptr<int64_t>(), i.const_data_ptr<int64_t>(),
      static_cast<uint32_t>(salt), out.mutable_data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dspark
