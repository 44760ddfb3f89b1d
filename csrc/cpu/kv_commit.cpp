// kv_commit on the CPU (docs/kv.md): move the accepted path of each request's
// verify window into place, in every cache, byte for byte.
//
// 1. Plan (serial, cheap): per request, the real moves (source and destination
//    physical slots; identity moves and padding dropped). Every data-dependent
//    check runs here, before any byte is written, and names the argument:
//    num_accept in [0, W], committed_len >= 0 with committed_len + num_accept
//    inside int32 (new_len is int32), path entries >= 0, positions inside the
//    block table (computed without overflow), page ids in [0, num_pages), and no
//    slot written by two requests, nor written by one request while another reads
//    it or keeps it (an identity move: the token already in place is the other
//    request's accepted token). Another request's cache never changes.
//    (The CUDA kernel cannot raise: it skips a write into a slot that another
//    request keeps or reads, see dspark/kv.cuh.)
// 2. Copy: at::parallel_for over (cache, request); each task reads all of its
//    sources into a staging buffer, then writes the destinations, so any path
//    (a tree's [0, 2, 3], reversed, sparse) is safe.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "dspark/kv_rules.h"
#include "kv.h"

namespace dspark {
namespace {

constexpr const char* kOp = "kv_commit";

struct Move {
  int64_t src_page, src_slot, dst_page, dst_slot;
};

struct Kept {  // request b keeps its token at (page, slot): accept_path[b, j] == j
  int64_t b, j, page, slot;
};

at::Tensor as_long(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

}  // namespace

at::Tensor kv_commit_cpu(at::TensorList caches, const at::Tensor& block_table, int64_t page_size,
                         const at::Tensor& committed_len, const at::Tensor& accept_path,
                         const at::Tensor& num_accept) {
  check_kv_commit_args(caches, block_table, page_size, committed_len, accept_path, num_accept);
  DSPARK_CHECK(block_table.device().is_cpu(), kOp, "the CPU kernel needs CPU tensors, got ", block_table.device());
  const int64_t B = committed_len.size(0);
  const int64_t P = block_table.size(1);
  const int64_t W = accept_path.size(1);
  const int64_t num_pages = caches.empty() ? 0 : caches[0].size(0);

  const at::Tensor bt = as_long(block_table), L = as_long(committed_len), path = as_long(accept_path),
                   n = as_long(num_accept);
  const int64_t* btp = bt.const_data_ptr<int64_t>();
  const int64_t* Lp = L.const_data_ptr<int64_t>();
  const int64_t* pp = path.const_data_ptr<int64_t>();
  const int64_t* np = n.const_data_ptr<int64_t>();

  // ---- 1. plan and check
  std::vector<Move> moves;
  std::vector<Kept> kept;  // identity moves (B > 1 only: checked against other requests' writes)
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    start[b] = static_cast<int64_t>(moves.size());
    DSPARK_CHECK(np[b] >= 0 && np[b] <= W, kOp, "num_accept[", b, "] = ", np[b],
                 " is outside [0, W] with W = accept_path.size(1) = ", W);
    DSPARK_CHECK(Lp[b] >= 0, kOp, "committed_len[", b, "] = ", Lp[b], " is negative");
    // new_len is int32: committed_len + num_accept must fit (compared without overflow: L >= 0, n in [0, W]).
    DSPARK_CHECK(Lp[b] <= kv::kInt32Max - np[b], kOp, "committed_len[", b, "] = ", Lp[b], " + num_accept[", b,
                 "] = ", np[b], " does not fit the int32 new_len (at most 2^31 - 1)");
    for (int64_t j = 0; j < np[b]; ++j) {
      const int64_t s = pp[b * W + j];
      DSPARK_CHECK(s >= 0, kOp, "accept_path[", b, ", ", j, "] = ", s, " is negative but j < num_accept[", b,
                   "] = ", np[b], " (-1 padding is allowed only past num_accept)");
      int64_t page[2], slot[2];
      const int64_t offset[2] = {s, j};
      for (int k = 0; k < 2; ++k) {
        const int64_t col = kv::table_column_at(Lp[b], offset[k], page_size, P);
        DSPARK_CHECK(col >= 0, kOp, k == 0 ? "source" : "destination", " position committed_len[", b,
                     "] + ", k == 0 ? "accept_path[b, j]" : "j", " = ", Lp[b], " + ", offset[k], " (j = ", j,
                     ") is past the block_table's ", P, " pages of ", page_size, " slots");
        page[k] = btp[b * P + col];
        DSPARK_CHECK(caches.empty() || kv::page_in_range(page[k], num_pages), kOp, "block_table[", b, ", ", col,
                     "] = ", page[k], " (", k == 0 ? "source" : "destination", " of accept_path[", b, ", ", j,
                     "]) is outside [0, num_pages) with num_pages = ", num_pages);
        slot[k] = (Lp[b] + offset[k]) % page_size;  // no overflow: the column check passed
      }
      if (kv::is_real_move(j, s)) {
        moves.push_back({page[0], slot[0], page[1], slot[1]});
      } else if (B > 1) {
        kept.push_back({b, j, page[1], slot[1]});
      }
    }
  }
  start[B] = static_cast<int64_t>(moves.size());
  // Physical slot keys: page * page_size + slot (page < num_pages <= 2^31 - 1, page_size <= 2^31 - 1: no overflow).
  // Without caches nothing is written (and page ids are not checked): no slot can conflict.
  const bool writes = !caches.empty() && !moves.empty();
  if (writes && B > 1) {
    // No physical slot may be written twice, nor written by one request and read or kept by another.
    std::unordered_map<int64_t, int64_t> writer;  // physical slot -> request
    writer.reserve(moves.size() * 2);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t m = start[b]; m < start[b + 1]; ++m) {
        const int64_t key = moves[m].dst_page * page_size + moves[m].dst_slot;
        auto [it, fresh] = writer.emplace(key, b);
        DSPARK_CHECK(fresh, kOp, "block_table maps a destination of request ", b, " and one of request ",
                     it->second, " to the same physical slot (page ", moves[m].dst_page, ", slot ",
                     moves[m].dst_slot, "); destinations must be distinct");
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t m = start[b]; m < start[b + 1]; ++m) {
        auto it = writer.find(moves[m].src_page * page_size + moves[m].src_slot);
        DSPARK_CHECK(it == writer.end() || it->second == b, kOp, "request ", b, " reads page ", moves[m].src_page,
                     " slot ", moves[m].src_slot, ", which request ", it->second,
                     " overwrites: the block_table rows share a page that is being written");
      }
    }
    for (const Kept& k : kept) {
      auto it = writer.find(k.page * page_size + k.slot);
      DSPARK_CHECK(it == writer.end() || it->second == k.b, kOp, "request ", k.b, " keeps its token at page ",
                   k.page, " slot ", k.slot, " (accept_path[", k.b, ", ", k.j, "] = ", k.j,
                   ", an identity move), which request ", it->second,
                   " overwrites: the block_table rows share a page that is being written");
    }
  } else if (writes) {
    // One request: its destinations must still be distinct physical slots.
    std::unordered_map<int64_t, int64_t> seen;
    for (const Move& mv : moves) {
      auto [it, fresh] = seen.emplace(mv.dst_page * page_size + mv.dst_slot, 0);
      DSPARK_CHECK(fresh, kOp, "block_table maps two destinations of request 0 to the same physical slot (page ",
                   mv.dst_page, ", slot ", mv.dst_slot, "); destinations must be distinct");
    }
  }

  at::Tensor new_len = at::empty({B}, committed_len.options().dtype(at::kInt));
  int32_t* out = new_len.mutable_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) out[b] = kv::commit_new_len(Lp[b], np[b]);  // exact: checked above
  if (moves.empty() || caches.empty()) return new_len;

  // ---- 2. copy: tasks are (cache, request) pairs
  const int64_t C = static_cast<int64_t>(caches.size());
  std::vector<uint8_t*> base(C);
  std::vector<int64_t> page_stride(C), slot_stride(C), row(C);
  int64_t bytes_per_move = 0;
  for (int64_t c = 0; c < C; ++c) {
    const at::Tensor& t = caches[c];
    base[c] = static_cast<uint8_t*>(t.data_ptr());
    page_stride[c] = t.stride(0) * static_cast<int64_t>(t.element_size());
    slot_stride[c] = t.stride(1) * static_cast<int64_t>(t.element_size());
    row[c] = kvcheck::row_bytes(t, 2);
    bytes_per_move += row[c];
  }
  int64_t max_moves = 0;
  for (int64_t b = 0; b < B; ++b) max_moves = std::max(max_moves, start[b + 1] - start[b]);
  const int64_t total = static_cast<int64_t>(moves.size()) * bytes_per_move;
  // Small commits (the usual case: a few rows of a few KB) run inline; big ones
  // spread (cache, request) tasks over the threads.
  const int64_t grain = total < kvcheck::kParallelBytes ? C * B : 1;
  at::parallel_for(0, C * B, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> stage;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / B, b = task % B;
      const int64_t m0 = start[b], m1 = start[b + 1];
      const int64_t rb = row[c];
      if (m0 == m1 || rb == 0) continue;
      stage.resize(static_cast<size_t>(max_moves * rb));
      uint8_t* const cb = base[c];
      for (int64_t m = m0; m < m1; ++m)  // every source first ...
        std::memcpy(stage.data() + (m - m0) * rb,
                    cb + moves[m].src_page * page_stride[c] + moves[m].src_slot * slot_stride[c], rb);
      for (int64_t m = m0; m < m1; ++m)  // ... then every destination
        std::memcpy(cb + moves[m].dst_page * page_stride[c] + moves[m].dst_slot * slot_stride[c],
                    stage.data() + (m - m0) * rb, rb);
    }
  });
  return new_len;
}

}  // namespace dspark
