// random_words: the raw Philox words of the randomness contract, exposed so
// tests can check that every backend draws the same bits (docs/randomness.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "dspark/philox.h"
#include "random_words.h"

namespace dspark {

at::Tensor random_words_cpu(const at::Tensor& seed, const at::Tensor& position, const at::Tensor& index,
                            int64_t salt) {
  check_random_words_args(seed, position, index, salt);
  const at::Tensor s = seed.to(at::kLong).contiguous();
  const at::Tensor p = position.to(at::kLong).contiguous();
  const at::Tensor i = index.to(at::kLong).contiguous();
  at::Tensor out = at::empty(seed.sizes(), seed.options().dtype(at::kLong));
  const int64_t* sp = s.const_data_ptr<int64_t>();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t* ip = i.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const int64_t n = out.numel();
  for (int64_t k = 0; k < n; ++k)  // before the narrowing to uint32 below
    DSPARK_CHECK(ip[k] >= 0 && ip[k] < kRandomWordsIndexEnd, "random_words", "index[", k, "] (flattened) = ", ip[k],
                 " is outside [0, 2^32) (a uint32 vocabulary index)");
  at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      op[k] = random_word(static_cast<uint64_t>(sp[k]), static_cast<uint64_t>(pp[k]),
                          static_cast<uint32_t>(salt), static_cast<uint32_t>(ip[k]));
  });
  return out;
}

}  // namespace dspark
