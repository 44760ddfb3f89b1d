// kv_release_pages on the CPU (docs/kv.md): the block-table columns past the
// new length (and before the old one) lose a reference; pages reaching zero are
// returned per request, in block-table order, -1 padded.
//
// Requests are processed in batch order, so a page shared by two requests that
// both release it is returned by the later one (the decrement that brings it to
// zero). Everything is checked before refcount is touched: lengths in
// [0, P * page_size] (both new_len and old_len; compared without forming the
// product when it does not fit in int64), released page ids in [0, num_pages), and no page
// released more times than its refcount (a double free is an error here; the
// CUDA kernel clamps at zero instead).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <unordered_map>

#include "dspark/kv_rules.h"
#include "kv.h"

namespace dspark {
namespace {

constexpr const char* kOp = "kv_release_pages";

template <typename RC>
void release(const int64_t* bt, const int64_t* new_len, const int64_t* old_len, int64_t B, int64_t P,
             int64_t page_size, RC* rc, int64_t rc_stride, int32_t* freed, int32_t* num_freed) {
  for (int64_t b = 0; b < B; ++b) {
    int64_t first, last;
    kv::release_columns(new_len[b], old_len[b], page_size, P, &first, &last);
    int32_t count = 0;
    for (int64_t col = first; col < last; ++col) {
      const int64_t page = bt[b * P + col];
      RC& r = rc[page * rc_stride];
      if (r <= 0) continue;  // unreachable after the checks; kept as the CUDA rule
      r -= 1;
      if (r == 0) freed[b * P + count++] = static_cast<int32_t>(page);
    }
    num_freed[b] = count;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kv_release_pages_cpu(const at::Tensor& block_table, const at::Tensor& new_len,
                                                        const at::Tensor& old_len, int64_t page_size,
                                                        const at::Tensor& refcount) {
  check_kv_release_pages_args(block_table, new_len, old_len, page_size, refcount);
  DSPARK_CHECK(block_table.device().is_cpu(), kOp, "the CPU kernel needs CPU tensors, got ", block_table.device());
  const int64_t B = block_table.size(0);
  const int64_t P = block_table.size(1);
  const int64_t num_pages = refcount.size(0);
  const at::Tensor bt = block_table.to(at::kLong).contiguous();
  const at::Tensor nl = new_len.to(at::kLong).contiguous();
  const at::Tensor ol = old_len.to(at::kLong).contiguous();
  const int64_t* btp = bt.const_data_ptr<int64_t>();
  const int64_t* nlp = nl.const_data_ptr<int64_t>();
  const int64_t* olp = ol.const_data_ptr<int64_t>();
  const bool rc64 = refcount.scalar_type() == at::kLong;
  const int64_t rc_stride = refcount.stride(0);
  auto rc_at = [&](int64_t page) -> int64_t {
    return rc64 ? refcount.const_data_ptr<int64_t>()[page * rc_stride]
                : refcount.const_data_ptr<int32_t>()[page * rc_stride];
  };

  // ---- checks (nothing is modified until all pass)
  std::unordered_map<int64_t, int64_t> releases;  // page -> how many times it is released
  const int64_t capacity = kv::table_capacity(P, page_size);  // P * page_size, saturated
  for (int64_t b = 0; b < B; ++b) {
    DSPARK_CHECK(nlp[b] >= 0, kOp, "new_len[", b, "] = ", nlp[b], " is negative");
    DSPARK_CHECK(olp[b] >= 0, kOp, "old_len[", b, "] = ", olp[b], " is negative");
    DSPARK_CHECK(nlp[b] <= capacity, kOp, "new_len[", b, "] = ", nlp[b], " is past the block_table's ", P,
                 " pages of ", page_size, " slots");
    DSPARK_CHECK(olp[b] <= capacity, kOp, "old_len[", b, "] = ", olp[b], " is past the block_table's ", P,
                 " pages of ", page_size, " slots");
    int64_t first, last;
    kv::release_columns(nlp[b], olp[b], page_size, P, &first, &last);
    for (int64_t col = first; col < last; ++col) {
      const int64_t page = btp[b * P + col];
      DSPARK_CHECK(kv::page_in_range(page, num_pages), kOp, "block_table[", b, ", ", col, "] = ", page,
                   " is released but outside [0, num_pages) with num_pages = refcount.size(0) = ", num_pages);
      const int64_t k = ++releases[page];
      DSPARK_CHECK(k <= rc_at(page), kOp, "page ", page, " (block_table[", b, ", ", col, "]) is released ", k,
                   " time(s) but refcount[", page, "] = ", rc_at(page),
                   " (a double free: refcounts never go negative)");
    }
  }

  at::Tensor freed = at::full({B, P}, -1, block_table.options().dtype(at::kInt));
  at::Tensor num_freed = at::empty({B}, block_table.options().dtype(at::kInt));
  if (rc64) {
    release(btp, nlp, olp, B, P, page_size, refcount.mutable_data_ptr<int64_t>(), rc_stride,
            freed.mutable_data_ptr<int32_t>(), num_freed.mutable_data_ptr<int32_t>());
  } else {
    release(btp, nlp, olp, B, P, page_size, refcount.mutable_data_ptr<int32_t>(), rc_stride,
            freed.mutable_data_ptr<int32_t>(), num_freed.mutable_data_ptr<int32_t>());
  }
  return {freed, num_freed};
}

}  // namespace dspark
