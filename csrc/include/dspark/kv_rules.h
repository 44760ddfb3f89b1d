// The addressing and validity rules of the KV rollback ops (docs/kv.md:
// kv_commit, kv_release_pages, window_commit, state_select), shared by the CPU
// kernels (csrc/cpu/*.cpp) and the CUDA kernels (dspark/kv.cuh) as
// __host__ __device__ functions, so the CPU tests exercise the rules the GPU runs.
// The PyTorch reference (dspark_kernels/reference/kv.py) states the same rules
// as a per-token loop.
//
// Every rule says what a kernel does with input that is out of range: the CPU
// kernels reject such input with an error before touching anything; the CUDA
// kernels (which cannot raise without a host sync) skip the move / page / row,
// so that nothing outside the given tensors is ever read or written.
//
// Every rule is overflow-free for any int64 input (lengths, positions, path
// entries, page sizes come from user tensors): no signed sum or product here can
// overflow, so the CUDA kernels need no host-side range check to stay in bounds.
//
// No torch header: also compiles under NVRTC.
#pragma once

#include "types.h"  // uint32_t ..., DSPARK_HD

namespace dspark {
namespace kv {

// A read-only int32 or int64 array (index tensors come in either dtype).
struct IntArray {
  const void* ptr;
  int32_t is_int64;
};

DSPARK_HD int64_t load_int(IntArray a, int64_t i) {
  return a.is_int64 ? static_cast<const int64_t*>(a.ptr)[i]
                    : static_cast<int64_t>(static_cast<const int32_t*>(a.ptr)[i]);
}

// A read-only flag array (keep masks): bool / uint8 / int32 / int64, nonzero = set.
struct FlagArray {
  const void* ptr;
  int32_t elem_bytes;  // 1, 4 or 8
};

DSPARK_HD bool load_flag(FlagArray a, int64_t i) {
  switch (a.elem_bytes) {
    case 8: return static_cast<const int64_t*>(a.ptr)[i] != 0;
    case 4: return static_cast<const int32_t*>(a.ptr)[i] != 0;
    default: return static_cast<const uint8_t*>(a.ptr)[i] != 0;
  }
}

constexpr int64_t kInt64Max = 0x7fffffffffffffffLL;
constexpr int64_t kInt64Min = -kInt64Max - 1;
constexpr int64_t kInt32Max = 0x7fffffffLL;
constexpr int64_t kInt32Min = -kInt32Max - 1;

// a + b, saturated to [INT64_MIN, INT64_MAX] (no signed overflow).
DSPARK_HD int64_t saturating_add(int64_t a, int64_t b) {
  if (b > 0 && a > kInt64Max - b) return kInt64Max;
  if (b < 0 && a < kInt64Min - b) return kInt64Min;
  return a + b;
}

// ceil(n / d) for n >= 0, d >= 1, without forming n + d - 1.
DSPARK_HD int64_t ceil_div_nonneg(int64_t n, int64_t d) { return n / d + (n % d != 0 ? 1 : 0); }

// The number of logical positions the P columns of a block table hold,
// P * page_size saturated at INT64_MAX (P >= 0, page_size >= 1).
DSPARK_HD int64_t table_capacity(int64_t P, int64_t page_size) {
  if (P <= 0 || page_size <= 0) return 0;
  return P > kInt64Max / page_size ? kInt64Max : P * page_size;
}

// ---------------------------------------------------------------------------
// kv_commit
// ---------------------------------------------------------------------------

// The number of path entries kv_commit looks at: num_accept clamped to [0, W].
DSPARK_HD int64_t commit_count(int64_t num_accept, int64_t W) {
  return num_accept < 0 ? 0 : (num_accept > W ? W : num_accept);
}

// Block-table column of logical position `pos`, or -1 when `pos` is negative or
// past the table's P columns.
DSPARK_HD int64_t table_column(int64_t pos, int64_t page_size, int64_t P) {
  if (pos < 0) return -1;
  const int64_t col = pos / page_size;
  return col < P ? col : -1;
}

// Block-table column of logical position base + offset (committed_len + a path
// entry or a window index), or -1 when either is negative, when the sum does not
// fit in int64 (it is then past any table), or when it is past the P columns.
DSPARK_HD int64_t table_column_at(int64_t base, int64_t offset, int64_t page_size, int64_t P) {
  if (base < 0 || offset < 0 || base > kInt64Max - offset) return -1;
  return table_column(base + offset, page_size, P);
}

DSPARK_HD bool page_in_range(int64_t page, int64_t num_pages) { return page >= 0 && page < num_pages; }

// new_len = committed_len + num_accept as the int32 output holds it: the exact
// sum when it fits in int32 (the CPU kernel rejects any other), else saturated to
// [INT32_MIN, INT32_MAX] (the CUDA kernel and the reference; never a wrapped value).
DSPARK_HD int32_t commit_new_len(int64_t committed_len, int64_t num_accept) {
  const int64_t s = saturating_add(committed_len, num_accept);
  return static_cast<int32_t>(s > kInt32Max ? kInt32Max : (s < kInt32Min ? kInt32Min : s));
}

// Path entry j of a request moves window index `src_index` (logical position
// L + src_index) to logical position L + j. Only a real move copies bytes:
// padding (-1 or any negative entry) and identity moves (src_index == j) do not.
DSPARK_HD bool is_real_move(int64_t j, int64_t src_index) { return src_index >= 0 && src_index != j; }

// ---------------------------------------------------------------------------
// kv_release_pages
// ---------------------------------------------------------------------------

// Block-table columns [first, last) whose pages lose a reference: column p is
// released iff p * page_size >= new_len and p * page_size < old_len; columns
// past P do not exist. (Integer identities: p * ps >= n <=> p >= ceil(n / ps) for
// n > 0; p * ps < o <=> p < ceil(o / ps) for o > 0.) Overflow-free for any
// lengths (page_size >= 1): first and last are clamped to [0, P], so the columns
// a caller walks always exist, whatever new_len / old_len hold.
DSPARK_HD void release_columns(int64_t new_len, int64_t old_len, int64_t page_size, int64_t P, int64_t* first,
                               int64_t* last) {
  if (P < 0) P = 0;
  int64_t f = new_len > 0 ? ceil_div_nonneg(new_len, page_size) : 0;
  int64_t l = old_len > 0 ? ceil_div_nonneg(old_len, page_size) : 0;
  if (f > P) f = P;
  if (l > P) l = P;
  *first = f;
  *last = l > f ? l : f;
}

// ---------------------------------------------------------------------------
// window_commit / state_select
// ---------------------------------------------------------------------------

// Slot of the circular window for absolute position `pos`: pos mod W, or -1
// (row skipped) for a negative position.
DSPARK_HD int64_t window_slot(int64_t pos, int64_t W) { return pos < 0 ? -1 : pos % W; }

// state_select: index -1 is padding (out[b] left untouched); any other index
// outside [0, S) is invalid (an error on the CPU, skipped on CUDA).
DSPARK_HD bool state_index_valid(int64_t index, int64_t S) { return index >= 0 && index < S; }

// ---------------------------------------------------------------------------
// Copies
// ---------------------------------------------------------------------------

// The widest power-of-two access (16, 8, 4, 2 or 1 bytes) that divides every
// address and byte count given (OR them together).
DSPARK_HD int32_t vector_bytes(uint64_t address_bits) {
  if ((address_bits & 15u) == 0) return 16;
  if ((address_bits & 7u) == 0) return 8;
  if ((address_bits & 3u) == 0) return 4;
  if ((address_bits & 1u) == 0) return 2;
  return 1;
}

}  // namespace kv
}  // namespace dspark
