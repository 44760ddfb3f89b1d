// token_logprobs: log p(token) under the filtered target distribution of a row
// (docs/verification.md, "Log-probabilities"); verify_block / verify_tree call it
// for return_logprobs=True. The op schema is its OpSpec (dspark_kernels/verification.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "torch_checks.h"

namespace dspark {

at::Tensor token_logprobs_cpu(const at::Tensor& target_logits, const at::Tensor& tokens, const at::Tensor& rows,
                              const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
                              const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p);

}  // namespace dspark
