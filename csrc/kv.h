// KV rollback ops (docs/kv.md): kv_commit, kv_release_pages, window_commit,
// state_select. Declarations of the CPU and CUDA implementations and their
// shape / dtype / device checks (no data reads, so no host sync on CUDA). The
// op schemas live in csrc/ops.cpp; the addressing rules in dspark/kv_rules.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "torch_checks.h"

namespace dspark {

at::Tensor kv_commit_cpu(at::TensorList caches, const at::Tensor& block_table, int64_t page_size,
                         const at::Tensor& committed_len, const at::Tensor& accept_path, const at::Tensor& num_accept);
at::Tensor kv_commit_cuda(at::TensorList caches, const at::Tensor& block_table, int64_t page_size,
                          const at::Tensor& committed_len, const at::Tensor& accept_path, const at::Tensor& num_accept);

std::tuple<at::Tensor, at::Tensor> kv_release_pages_cpu(const at::Tensor& block_table, const at::Tensor& new_len,
                                                        const at::Tensor& old_len, int64_t page_size,
                                                        const at::Tensor& refcount);
std::tuple<at::Tensor, at::Tensor> kv_release_pages_cuda(const at::Tensor& block_table, const at::Tensor& new_len,
                                                         const at::Tensor& old_len, int64_t page_size,
                                                         const at::Tensor& refcount);

void window_commit_cpu(const at::Tensor& window, const at::Tensor& rows, const at::Tensor& cu,
                       const at::Tensor& positions, const at::Tensor& keep);
void window_commit_cuda(const at::Tensor& window, const at::Tensor& rows, const at::Tensor& cu,
                        const at::Tensor& positions, const at::Tensor& keep);

void state_select_cpu(const at::Tensor& states, const at::Tensor& index, const at::Tensor& out);
void state_select_cuda(const at::Tensor& states, const at::Tensor& index, const at::Tensor& out);

namespace kvcheck {

// CPU kernels copy inline (one thread) below this many bytes: a parallel region
// costs more than it saves for the usual commit of a few rows.
constexpr int64_t kParallelBytes = int64_t(4) << 20;

// Dims [first_dim, dim) are laid out densely (row-major, size-1 dims ignored), so
// one "row" t[i0, ..., i_{first_dim-1}] is a contiguous run of row_bytes bytes.
inline bool dense_from(const at::Tensor& t, int64_t first_dim) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= first_dim; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

inline int64_t row_bytes(const at::Tensor& t, int64_t first_dim) {
  int64_t n = static_cast<int64_t>(t.element_size());
  for (int64_t d = first_dim; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

inline void check_index_vector(const char* op, const at::Tensor& t, const char* name, int64_t n,
                               const at::Tensor& ref) {
  DSPARK_CHECK(t.dim() == 1 && t.size(0) == n, op, name, " must have shape [", n, "], got ", t.sizes());
  DSPARK_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, name,
               " must be int32 or int64, got ", t.scalar_type());
  DSPARK_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ", t.device());
}

inline void check_index_matrix(const char* op, const at::Tensor& t, const char* name, int64_t rows,
                               const at::Tensor& ref) {
  DSPARK_CHECK(t.dim() == 2 && t.size(0) == rows, op, name, " must have shape [", rows, ", *], got ", t.sizes());
  DSPARK_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, name,
               " must be int32 or int64, got ", t.scalar_type());
  DSPARK_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ", t.device());
}

}  // namespace kvcheck

// caches: each [num_pages, page_size, *row] with a dense row (any dtype, any page
// and slot strides), all on block_table's device with the same num_pages.
inline void check_kv_commit_args(at::TensorList caches, const at::Tensor& block_table, int64_t page_size,
                                 const at::Tensor& committed_len, const at::Tensor& accept_path,
                                 const at::Tensor& num_accept) {
  constexpr const char* op = "kv_commit";
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  DSPARK_CHECK(page_size >= 1 && page_size <= kMax32, op, "page_size must be in [1, 2^31), got ", page_size);
  // B comes from block_table (as in the Python checks), so a wrong-length vector is the one named.
  DSPARK_CHECK(block_table.dim() == 2, op, "block_table must be a 2-D tensor [B, P], got shape ",
               block_table.sizes());
  const int64_t B = block_table.size(0);
  kvcheck::check_index_matrix(op, block_table, "block_table", B, block_table);
  kvcheck::check_index_vector(op, committed_len, "committed_len", B, block_table);
  kvcheck::check_index_matrix(op, accept_path, "accept_path", B, block_table);
  kvcheck::check_index_vector(op, num_accept, "num_accept", B, block_table);
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    DSPARK_CHECK(c.defined(), op, "caches[", i, "] is undefined");
    DSPARK_CHECK(c.dim() >= 2, op, "caches[", i, "] must be [num_pages, page_size, *row] (at least 2-D), got shape ",
                 c.sizes());
    DSPARK_CHECK(c.device() == block_table.device(), op, "caches[", i, "] must be on ", block_table.device(),
                 " (like block_table), got ", c.device());
    DSPARK_CHECK(c.size(1) == page_size, op, "caches[", i, "].size(1) must equal page_size = ", page_size,
                 ", got shape ", c.sizes());
    DSPARK_CHECK(c.size(0) == caches[0].size(0), op, "caches[", i, "] must have the same num_pages as caches[0] (",
                 caches[0].size(0), "), got shape ", c.sizes());
    DSPARK_CHECK(c.size(0) <= kMax32, op, "caches[", i, "] has ", c.size(0), " pages, at most 2^31 - 1 supported");
    DSPARK_CHECK(kvcheck::dense_from(c, 2), op, "caches[", i,
                 "] must have a dense row (dims 2.. contiguous; page and slot strides are free), got strides ",
                 c.strides(), " for shape ", c.sizes());
  }
  std::vector<std::pair<const void*, size_t>> bases;  // each cache once (a move applied twice corrupts it)
  bases.reserve(caches.size());
  for (size_t i = 0; i < caches.size(); ++i)
    if (caches[i].numel() > 0) bases.emplace_back(caches[i].const_data_ptr(), i);
  std::sort(bases.begin(), bases.end());
  for (size_t k = 1; k < bases.size(); ++k) {
    DSPARK_CHECK(bases[k].first != bases[k - 1].first, op, "caches[", std::min(bases[k - 1].second, bases[k].second),
                 "] and caches[", std::max(bases[k - 1].second, bases[k].second),
                 "] are the same memory: each cache may appear once (a move applied twice corrupts it)");
  }
}

inline void check_kv_release_pages_args(const at::Tensor& block_table, const at::Tensor& new_len,
                                        const at::Tensor& old_len, int64_t page_size, const at::Tensor& refcount) {
  constexpr const char* op = "kv_release_pages";
  DSPARK_CHECK(page_size >= 1, op, "page_size must be >= 1, got ", page_size);
  DSPARK_CHECK(block_table.dim() == 2, op, "block_table must be a 2-D tensor [B, P], got shape ",
               block_table.sizes());
  const int64_t B = block_table.size(0);
  kvcheck::check_index_matrix(op, block_table, "block_table", B, block_table);
  kvcheck::check_index_vector(op, new_len, "new_len", B, block_table);
  kvcheck::check_index_vector(op, old_len, "old_len", B, block_table);
  DSPARK_CHECK(refcount.dim() == 1, op, "refcount must be a 1-D tensor [num_pages], got shape ", refcount.sizes());
  DSPARK_CHECK(refcount.scalar_type() == at::kInt || refcount.scalar_type() == at::kLong, op,
               "refcount must be int32 or int64, got ", refcount.scalar_type());
  DSPARK_CHECK(refcount.device() == block_table.device(), op, "refcount must be on ", block_table.device(),
               " (like block_table), got ", refcount.device());
  // Freed page ids are returned as int32: every page id in [0, num_pages) must fit.
  DSPARK_CHECK(refcount.size(0) <= std::numeric_limits<int32_t>::max(), op, "refcount has ", refcount.size(0),
               " pages, at most 2^31 - 1 supported (freed page ids are int32)");
}

inline void check_window_commit_args(const at::Tensor& window, const at::Tensor& rows, const at::Tensor& cu,
                                     const at::Tensor& positions, const at::Tensor& keep) {
  constexpr const char* op = "window_commit";
  DSPARK_CHECK(window.dim() >= 2, op, "window must be [B, W, *row] (at least 2-D), got shape ", window.sizes());
  DSPARK_CHECK(window.size(1) >= 1, op, "window must have W >= 1 slots, got shape ", window.sizes());
  DSPARK_CHECK(rows.dim() == window.dim() - 1, op, "rows must be [T, *row] with row = window.shape[2:] = ",
               window.sizes().slice(2), ", got shape ", rows.sizes());
  DSPARK_CHECK(rows.sizes().slice(1) == window.sizes().slice(2), op,
               "rows must be [T, *row] with row = window.shape[2:] = ", window.sizes().slice(2), ", got shape ",
               rows.sizes());
  DSPARK_CHECK(rows.scalar_type() == window.scalar_type(), op, "rows must have window's dtype ",
               window.scalar_type(), ", got ", rows.scalar_type());
  DSPARK_CHECK(rows.device() == window.device(), op, "rows must be on ", window.device(), " (like window), got ",
               rows.device());
  DSPARK_CHECK(kvcheck::dense_from(window, 2), op, "window must have a dense row (dims 2.. contiguous), got strides ",
               window.strides(), " for shape ", window.sizes());
  DSPARK_CHECK(kvcheck::dense_from(rows, 1), op, "rows must have a dense row (dims 1.. contiguous), got strides ",
               rows.strides(), " for shape ", rows.sizes());
  const int64_t B = window.size(0);
  const int64_t T = rows.size(0);
  kvcheck::check_index_vector(op, cu, "cu", B + 1, window);
  kvcheck::check_index_vector(op, positions, "positions", T, window);
  DSPARK_CHECK(keep.dim() == 1 && keep.size(0) == T, op, "keep must have shape [", T, "], got ", keep.sizes());
  const auto kt = keep.scalar_type();
  DSPARK_CHECK(kt == at::kBool || kt == at::kByte || kt == at::kChar || kt == at::kInt || kt == at::kLong, op,
               "keep must be bool, uint8, int8, int32 or int64, got ", kt);
  DSPARK_CHECK(keep.device() == window.device(), op, "keep must be on ", window.device(), ", got ", keep.device());
}

inline void check_state_select_args(const at::Tensor& states, const at::Tensor& index, const at::Tensor& out) {
  constexpr const char* op = "state_select";
  DSPARK_CHECK(states.dim() >= 2, op, "states must be [B, S, *state] (at least 2-D), got shape ", states.sizes());
  const int64_t B = states.size(0);
  DSPARK_CHECK(out.dim() == states.dim() - 1 && out.size(0) == B && out.sizes().slice(1) == states.sizes().slice(2),
               op, "out must have shape [B, *state] = [", B, ", ", states.sizes().slice(2), "], got ", out.sizes());
  DSPARK_CHECK(out.scalar_type() == states.scalar_type(), op, "out must have states' dtype ", states.scalar_type(),
               ", got ", out.scalar_type());
  DSPARK_CHECK(out.device() == states.device(), op, "out must be on ", states.device(), " (like states), got ",
               out.device());
  kvcheck::check_index_vector(op, index, "index", B, states);
  DSPARK_CHECK(kvcheck::dense_from(states, 2), op, "states must have a dense state (dims 2.. contiguous), got strides ",
               states.strides(), " for shape ", states.sizes());
  DSPARK_CHECK(kvcheck::dense_from(out, 1), op, "out must have a dense state (dims 1.. contiguous), got strides ",
               out.strides(), " for shape ", out.sizes());
}

}  // namespace dspark
