// random_words(seed, position, index, salt): seed and position are any int64 (taken
// as uint64 bits, each split over two 32-bit words of the key / counter); index is
// the vocabulary index of philox.h, a uint32 value: index in [0, 2^32) (the counter
// holds index >> 2 in its first word and index & 3 picks the word). An index outside
// [0, 2^32) is an error on the CPU (checked before narrowing, naming `index`); the
// CUDA kernel cannot raise without a host sync and writes -1 (never a valid word)
// for it instead.
#pragma once

#include <ATen/core/Tensor.h>

#include "dspark/philox.h"  // kRandomWordsIndexEnd
#include "torch_checks.h"

namespace dspark {

at::Tensor random_words_cpu(const at::Tensor& seed, const at::Tensor& position, const at::Tensor& index,
                            int64_t salt);
at::Tensor random_words_cuda(const at::Tensor& seed, const at::Tensor& position, const at::Tensor& index,
                             int64_t salt);

inline void check_random_words_args(const at::Tensor& seed, const at::Tensor& position, const at::Tensor& index,
                                    int64_t salt) {
  constexpr const char* op = "random_words";
  DSPARK_CHECK_INT(op, seed);
  DSPARK_CHECK_INT(op, position);
  DSPARK_CHECK_INT(op, index);
  DSPARK_CHECK(position.sizes() == seed.sizes() && index.sizes() == seed.sizes(), op,
               "seed, position and index must have the same shape, got ", seed.sizes(), ", ",
               position.sizes(), ", ", index.sizes());
  DSPARK_CHECK_DEVICE(op, position, seed);
  DSPARK_CHECK_DEVICE(op, index, seed);
  DSPARK_CHECK(salt >= 0 && salt <= 0xffffffffLL, op, "salt must be a uint32 value, got ", salt);
}

}  // namespace dspark
