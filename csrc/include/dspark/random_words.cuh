// random_words on the GPU: the raw Philox words of the randomness contract
// (docs/randomness.md), elementwise, grid-stride; the same words as
// csrc/cpu/random_words.cpp. The launcher is csrc/cuda/random_words.cu (block
// count: rw::blocks in launch.h).
//
// No torch header here: the kernel also compiles under NVRTC.
#pragma once

#include "launch.h"
#include "philox.h"

namespace dspark {
namespace rw {

// An index outside [0, 2^32) (a CPU error) gives -1, never a truncated index's word.
__global__ void __launch_bounds__(kThreads)
    random_words_kernel(const int64_t* __restrict__ seed, const int64_t* __restrict__ position,
                        const int64_t* __restrict__ index, uint32_t salt, int64_t* __restrict__ out, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < n; k += step) {
    const int64_t i = index[k];
    out[k] = i >= 0 && i < kRandomWordsIndexEnd
                 ? static_cast<int64_t>(random_word(static_cast<uint64_t>(seed[k]), static_cast<uint64_t>(position[k]),
                                                    salt, static_cast<uint32_t>(i)))
                 : int64_t{-1};
  }
}

}  // namespace rw
}  // namespace dspark
