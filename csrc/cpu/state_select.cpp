// state_select on the CPU (docs/kv.md): out[b] = states[b, index[b]], the
// recurrent / linear-attention state of the accepted step. index[b] = -1 is
// padding (out[b] untouched); any other index outside [0, S) is an error,
// checked before anything is written.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>

#include "dspark/kv_rules.h"
#include "kv.h"

namespace dspark {

void state_select_cpu(const at::Tensor& states, const at::Tensor& index, const at::Tensor& out) {
  constexpr const char* op = "state_select";
  check_state_select_args(states, index, out);
  DSPARK_CHECK(states.device().is_cpu(), op, "the CPU kernel needs CPU tensors, got ", states.device());
  const int64_t B = states.size(0), S = states.size(1);
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    DSPARK_CHECK(ip[b] == -1 || kv::state_index_valid(ip[b], S), op, "index[", b, "] = ", ip[b],
                 " is outside [0, S) with S = states.size(1) = ", S, " (-1 = leave out[", b, "] as it is)");
  const int64_t rb = kvcheck::row_bytes(out, 1);
  if (rb == 0 || B == 0) return;
  const int64_t es = static_cast<int64_t>(states.element_size());
  const uint8_t* const sb = static_cast<const uint8_t*>(states.const_data_ptr());
  uint8_t* const ob = static_cast<uint8_t*>(out.data_ptr());
  const int64_t ss0 = states.stride(0) * es, ss1 = states.stride(1) * es, os0 = out.stride(0) * es;
  // Per request one memcpy of the whole state; big states split into chunks over threads.
  constexpr int64_t kChunk = 1 << 18;
  const int64_t chunks = (rb + kChunk - 1) / kChunk;
  const int64_t grain = B * rb < kvcheck::kParallelBytes ? B * chunks : 1;
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      if (!kv::state_index_valid(ip[b], S)) continue;
      const int64_t off = k * kChunk, len = std::min(kChunk, rb - off);
      std::memcpy(ob + b * os0 + off, sb + b * ss0 + ip[b] * ss1 + off, len);
    }
  });
}

}  // namespace dspark
