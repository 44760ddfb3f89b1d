// window_commit on the CPU (docs/kv.md): the drafter's circular context
// window. Request b's rows are rows[cu[b] : cu[b+1]]; a kept row t goes to
// window[b, positions[t] mod W], rejected rows leave the window untouched. When
// two kept rows of a request map to the same slot the later row wins (rows are
// written in order). Checked first: cu[0] = 0, cu[B] = T, cu non-decreasing, kept
// positions >= 0.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/ne.h>

#include <cstring>

#include "dspark/kv_rules.h"
#include "kv.h"

namespace dspark {

void window_commit_cpu(const at::Tensor& window, const at::Tensor& rows, const at::Tensor& cu,
                       const at::Tensor& positions, const at::Tensor& keep) {
  constexpr const char* op = "window_commit";
  check_window_commit_args(window, rows, cu, positions, keep);
  DSPARK_CHECK(window.device().is_cpu(), op, "the CPU kernel needs CPU tensors, got ", window.device());
  const int64_t B = window.size(0), W = window.size(1), T = rows.size(0);
  const at::Tensor cu64 = cu.to(at::kLong).contiguous();
  const at::Tensor pos64 = positions.to(at::kLong).contiguous();
  const at::Tensor keep8 = (keep.scalar_type() == at::kBool ? keep : keep.ne(0)).contiguous();
  const int64_t* cup = cu64.const_data_ptr<int64_t>();
  const int64_t* pp = pos64.const_data_ptr<int64_t>();
  const bool* kp = keep8.const_data_ptr<bool>();

  DSPARK_CHECK(cup[0] == 0, op, "cu[0] must be 0, got ", cup[0]);
  DSPARK_CHECK(cup[B] == T, op, "cu[B] must equal rows.size(0) = ", T, ", got cu[", B, "] = ", cup[B]);
  for (int64_t b = 0; b < B; ++b)
    DSPARK_CHECK(cup[b] <= cup[b + 1], op, "cu must be non-decreasing, got cu[", b, "] = ", cup[b], " > cu[", b + 1,
                 "] = ", cup[b + 1]);
  for (int64_t t = 0; t < T; ++t)
    DSPARK_CHECK(!kp[t] || pp[t] >= 0, op, "positions[", t, "] = ", pp[t], " is negative for a kept row");

  const int64_t rb = kvcheck::row_bytes(rows, 1);
  if (rb == 0 || T == 0) return;
  const int64_t es = static_cast<int64_t>(window.element_size());
  uint8_t* const wb = static_cast<uint8_t*>(window.data_ptr());
  const uint8_t* const rbase = static_cast<const uint8_t*>(rows.const_data_ptr());
  const int64_t ws0 = window.stride(0) * es, ws1 = window.stride(1) * es, rs0 = rows.stride(0) * es;
  const int64_t grain = T * rb < kvcheck::kParallelBytes ? B : 1;
  at::parallel_for(0, B, grain > 0 ? grain : 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = cup[b]; t < cup[b + 1]; ++t) {  // in order: the later row wins a shared slot
        if (!kp[t]) continue;
        const int64_t slot = kv::window_slot(pp[t], W);
        std::memcpy(wb + b * ws0 + slot * ws1, rbase + t * rs0, rb);
      }
    }
  });
}

}  // namespace dspark
