// KV rollback ops on the GPU (docs/kv.md): the device code of kv_commit,
// kv_release_pages, window_commit and state_select. The launchers are
// csrc/cuda/<op>.cu; the addressing and validity rules are the __host__ __device__
// functions of kv_rules.h, which the CPU kernels (tested against the reference
// in CI) run too.
//
// These kernels cannot raise: input the CPU kernels reject (a path entry or page
// id out of range, a negative position, an index past S) is skipped here, so that
// nothing outside the given tensors is ever read or written. No host sync, and
// every per-call value is a kernel parameter or a device tensor: the launches can
// be captured in a CUDA graph.
//
// No torch header here: the kernels also compile under NVRTC.
#pragma once

#include "kv_rules.h"
#include "launch.h"  // block sizes and launch plans

namespace dspark {
namespace kv {

// ----------------------------------------------------------------------------
// Vector copies: T is uint4 (16 B), uint2, uint32_t, uint16_t or uint8_t; the
// launcher picks the widest one that divides every address and byte count.
// ----------------------------------------------------------------------------

template <int kBytes>
struct VecType;
template <>
struct VecType<16> {
  using T = uint4;
};
template <>
struct VecType<8> {
  using T = uint2;
};
template <>
struct VecType<4> {
  using T = uint32_t;
};
template <>
struct VecType<2> {
  using T = uint16_t;
};
template <>
struct VecType<1> {
  using T = uint8_t;
};

// Copies n_vec vectors of kBytes from src to dst, one per thread in turn.
template <int kBytes, int kThreads>
__device__ __forceinline__ void copy_vectors(char* __restrict__ dst, const char* __restrict__ src, int64_t first,
                                             int64_t last) {
  using V = typename VecType<kBytes>::T;
  for (int64_t k = first + threadIdx.x; k < last; k += kThreads)
    reinterpret_cast<V*>(dst)[k] = reinterpret_cast<const V*>(src)[k];
}

// Bytes [begin, end) of a row (both multiples of vec) with the access width vec.
template <int kThreads>
__device__ __forceinline__ void copy_bytes(char* dst, const char* src, int64_t begin, int64_t end, int32_t vec) {
  switch (vec) {
    case 16: copy_vectors<16, kThreads>(dst, src, begin / 16, end / 16); break;
    case 8: copy_vectors<8, kThreads>(dst, src, begin / 8, end / 8); break;
    case 4: copy_vectors<4, kThreads>(dst, src, begin / 4, end / 4); break;
    case 2: copy_vectors<2, kThreads>(dst, src, begin / 2, end / 2); break;
    default: copy_vectors<1, kThreads>(dst, src, begin, end); break;
  }
}

// ----------------------------------------------------------------------------
// kv_commit
//
// grid (request b, byte tile, cache of this launch); one CTA moves the bytes
// [tile * tile_bytes, +tile_bytes) of every accepted row of request b in one
// cache:
//   1. warp 0 plans: for j < min(num_accept, W), the real moves (path entry >= 0,
//      not the identity, both positions inside the block table on pages in
//      [0, num_pages)), compacted in order into shared memory by ballots;
//   2. when B > 1, the whole CTA drops every planned move whose destination
//      another request owns: a slot that request b' writes, reads (a source) or
//      keeps (an identity move, its accepted token already in place), over every
//      b' != b and j' < min(num_accept[b'], W) (O(B * W) integer loads per CTA).
//      The CPU kernel (and DSPARK_DEBUG=1) reject such input; here the
//      conflicting write is skipped, so another request's cache never changes
//      (two requests writing one slot both skip it);
//   3. every source tile is read into shared memory, __syncthreads, every
//      destination tile is written — so any path (trees, reversed, sparse) is
//      safe within a request;
//   4. a chain plans zero moves and the CTA exits after reading a few integers.
// The CTAs of (b, tile 0, cache 0) of the first launch also write new_len[b]
// (commit_new_len: the int32 sum, saturated, never wrapped).
// Positions are committed_len + path entry / window index, located with
// table_column_at (no signed overflow for any committed_len).
// ----------------------------------------------------------------------------


struct CacheDesc {
  char* base;           // data_ptr of the cache
  int64_t page_stride;  // bytes between pages
  int64_t slot_stride;  // bytes between slots of a page
  int32_t row_bytes;    // bytes of one [*row] (dense)
  int32_t vec;          // access width in bytes (divides base, strides, row_bytes)
};

struct CommitParams {
  CacheDesc caches[kMaxCachesPerLaunch];
  IntArray block_table;  // [B, P], row stride bt_stride
  IntArray committed_len;
  IntArray accept_path;  // [B, W], row stride path_stride
  IntArray num_accept;
  int32_t* new_len;      // [B]; written when write_new_len
  int64_t bt_stride;
  int64_t path_stride;
  int64_t P;
  int64_t W;
  int64_t num_pages;
  int64_t page_size;
  int64_t B;             // requests (gridDim.x)
  int32_t num_caches;    // caches of this launch (0: only new_len)
  int32_t tile_bytes;    // multiple of 16
  int32_t write_new_len;
};

struct Move {
  int32_t src_page, src_slot, dst_page, dst_slot;
};

// Physical (page, slot) of logical position L + offset of request b, false when
// it is negative, outside the block table or on a page outside [0, num_pages).
__device__ __forceinline__ bool locate(const CommitParams& p, int64_t b, int64_t L, int64_t offset, int32_t* page,
                                       int32_t* slot) {
  const int64_t col = table_column_at(L, offset, p.page_size, p.P);
  if (col < 0) return false;
  const int64_t pg = load_int(p.block_table, b * p.bt_stride + col);
  if (!page_in_range(pg, p.num_pages)) return false;
  *page = static_cast<int32_t>(pg);
  *slot = static_cast<int32_t>((L + offset) % p.page_size);  // no overflow: table_column_at passed
  return true;
}

// Marks (dst_page = -1) every planned move of request b whose destination is the
// physical slot (page, slot) that another request owns.
__device__ __forceinline__ void drop_conflicts(Move* moves, int m, int32_t page, int32_t slot) {
  for (int i = 0; i < m; ++i) {
    volatile Move* mv = moves + i;
    if (mv->dst_page == page && mv->dst_slot == slot) mv->dst_page = -1;
  }
}

// Reads the byte range [begin, begin + bytes) of every source row of `moves`
// into `stage`, waits for the whole CTA, then writes it to every destination.
template <int kBytes>
__device__ __forceinline__ void move_tiles(const CacheDesc& d, const Move* moves, int m, char* stage, int64_t begin,
                                           int32_t bytes, int32_t tile_bytes) {
  using V = typename VecType<kBytes>::T;
  const int chunks = bytes / kBytes;
  const int stage_stride = tile_bytes / kBytes;
  V* st = reinterpret_cast<V*>(stage);
  const int items = m * chunks;
  for (int it = threadIdx.x; it < items; it += kCommitThreads) {
    const int i = it / chunks, k = it - i * chunks;
    const Move mv = moves[i];
    const char* src = d.base + mv.src_page * d.page_stride + mv.src_slot * d.slot_stride + begin;
    st[i * stage_stride + k] = reinterpret_cast<const V*>(src)[k];
  }
  __syncthreads();  // every source is read before any destination is written
  for (int it = threadIdx.x; it < items; it += kCommitThreads) {
    const int i = it / chunks, k = it - i * chunks;
    const Move mv = moves[i];
    if (mv.dst_page < 0) continue;  // another request owns this slot: skipped
    char* dst = d.base + mv.dst_page * d.page_stride + mv.dst_slot * d.slot_stride + begin;
    reinterpret_cast<V*>(dst)[k] = st[i * stage_stride + k];
  }
}

// Dynamic shared memory: [W] Move, then [W][tile_bytes] staging (16-byte aligned).
static __global__ void __launch_bounds__(kCommitThreads) commit_kernel(const __grid_constant__ CommitParams p) {
  extern __shared__ uint4 kv_smem[];
  __shared__ int num_moves;
  const int64_t b = blockIdx.x;
  const int tile = blockIdx.y;
  const int c = blockIdx.z;
  const int64_t L = load_int(p.committed_len, b);
  const int64_t n_given = load_int(p.num_accept, b);
  if (p.write_new_len && c == 0 && tile == 0 && threadIdx.x == 0) p.new_len[b] = commit_new_len(L, n_given);
  if (c >= p.num_caches) return;
  const CacheDesc d = p.caches[c];
  const int64_t begin = static_cast<int64_t>(tile) * p.tile_bytes;
  if (begin >= d.row_bytes) return;  // uniform over the CTA
  const int32_t bytes = static_cast<int32_t>(min(static_cast<int64_t>(p.tile_bytes), d.row_bytes - begin));

  Move* moves = reinterpret_cast<Move*>(kv_smem);
  char* stage = reinterpret_cast<char*>(kv_smem) + ((p.W * static_cast<int64_t>(sizeof(Move)) + 15) & ~int64_t(15));

  // ---- 1. plan (warp 0)
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int64_t n = commit_count(n_given, p.W);
    int count = 0;
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const int64_t j = j0 + lane;
      Move mv;
      bool real = false;
      if (j < n) {
        const int64_t s = load_int(p.accept_path, b * p.path_stride + j);
        real = is_real_move(j, s) && locate(p, b, L, s, &mv.src_page, &mv.src_slot) &&
               locate(p, b, L, j, &mv.dst_page, &mv.dst_slot);
      }
      const unsigned mask = __ballot_sync(0xffffffffu, real);
      if (real) moves[count + __popc(mask & ((1u << lane) - 1u))] = mv;
      count += __popc(mask);
    }
    if (lane == 0) num_moves = count;
  }
  __syncthreads();
  const int m = num_moves;
  if (m == 0) return;  // a chain: nothing to move

  // ---- 2. drop the writes into slots another request owns (whole CTA, every (b', j'))
  if (p.B > 1) {
    const int64_t entries = p.B * p.W;
    for (int64_t e = threadIdx.x; e < entries; e += kCommitThreads) {
      const int64_t ob = e / p.W, j = e - ob * p.W;
      if (ob == b || j >= commit_count(load_int(p.num_accept, ob), p.W)) continue;
      const int64_t oL = load_int(p.committed_len, ob);
      const int64_t s = load_int(p.accept_path, ob * p.path_stride + j);
      if (s < 0) continue;  // padding: owns nothing
      int32_t pg, sl;
      if (locate(p, ob, oL, j, &pg, &sl)) drop_conflicts(moves, m, pg, sl);  // written or kept by ob
      if (s != j && locate(p, ob, oL, s, &pg, &sl)) drop_conflicts(moves, m, pg, sl);  // read by ob
    }
    __syncthreads();
  }

  // ---- 3. gather every source tile, barrier, scatter every destination tile
  switch (d.vec) {
    case 16: move_tiles<16>(d, moves, m, stage, begin, bytes, p.tile_bytes); break;
    case 8: move_tiles<8>(d, moves, m, stage, begin, bytes, p.tile_bytes); break;
    case 4: move_tiles<4>(d, moves, m, stage, begin, bytes, p.tile_bytes); break;
    case 2: move_tiles<2>(d, moves, m, stage, begin, bytes, p.tile_bytes); break;
    default: move_tiles<1>(d, moves, m, stage, begin, bytes, p.tile_bytes); break;
  }
}

// ----------------------------------------------------------------------------
// kv_release_pages: one warp per request walks its released columns 32 at a
// time; each lane drops one reference with a compare-and-swap that never goes
// below zero, and the lanes whose decrement reached zero write their page ids
// in column order (ballot + prefix count). A page shared by two requests is
// returned by whichever decrement reaches zero (exactly once).
// ----------------------------------------------------------------------------


struct ReleaseParams {
  IntArray block_table;  // [B, P], row stride bt_stride
  IntArray new_len;
  IntArray old_len;
  void* refcount;        // int32 or int64, stride rc_stride
  int32_t* freed;        // [B, P] contiguous
  int32_t* num_freed;    // [B]
  int64_t bt_stride;
  int64_t rc_stride;
  int64_t B;
  int64_t P;
  int64_t num_pages;
  int64_t page_size;
  int32_t rc_is_int64;
};

// Drops one reference unless it is already <= 0; true when it reached zero.
__device__ __forceinline__ bool drop_reference(const ReleaseParams& p, int64_t page) {
  if (p.rc_is_int64) {
    unsigned long long* r =
        reinterpret_cast<unsigned long long*>(static_cast<int64_t*>(p.refcount) + page * p.rc_stride);
    long long old = static_cast<long long>(*reinterpret_cast<volatile unsigned long long*>(r));
    while (old > 0) {
      const long long prev = static_cast<long long>(
          atomicCAS(r, static_cast<unsigned long long>(old), static_cast<unsigned long long>(old - 1)));
      if (prev == old) return old == 1;
      old = prev;
    }
    return false;
  }
  int* r = static_cast<int*>(p.refcount) + page * p.rc_stride;
  int old = *reinterpret_cast<volatile int*>(r);
  while (old > 0) {
    const int prev = atomicCAS(r, old, old - 1);
    if (prev == old) return old == 1;
    old = prev;
  }
  return false;
}

static __global__ void __launch_bounds__(kReleaseWarps * 32) release_kernel(const __grid_constant__ ReleaseParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kReleaseWarps + (threadIdx.x >> 5);
  if (b >= p.B) return;  // uniform per warp
  int64_t first, last;
  release_columns(load_int(p.new_len, b), load_int(p.old_len, b), p.page_size, p.P, &first, &last);
  int32_t* row = p.freed + b * p.P;
  int count = 0;
  for (int64_t c0 = first; c0 < last; c0 += 32) {
    const int64_t col = c0 + lane;
    int64_t page = -1;
    bool zero = false;
    if (col < last) {
      page = load_int(p.block_table, b * p.bt_stride + col);
      zero = page_in_range(page, p.num_pages) && drop_reference(p, page);
    }
    const unsigned mask = __ballot_sync(0xffffffffu, zero);
    if (zero) row[count + __popc(mask & ((1u << lane) - 1u))] = static_cast<int32_t>(page);
    count += __popc(mask);
  }
  for (int64_t col = count + lane; col < p.P; col += 32) row[col] = -1;
  if (lane == 0) p.num_freed[b] = count;
}

// ----------------------------------------------------------------------------
// window_commit: one CTA per row t. A kept row finds its request by binary
// search over cu, and is written to window[b, positions[t] mod W] unless a later
// kept row of the same request maps to the same slot (the later row wins: the
// CTA scans the request's later rows cooperatively, so the result does not
// depend on which CTA runs first). Rows with a negative position, or outside a
// consistent cu, are skipped.
// ----------------------------------------------------------------------------


struct WindowParams {
  char* window;          // [B, W, *row]
  const char* rows;      // [T, *row]
  IntArray cu;           // [B + 1]
  IntArray positions;    // [T]
  FlagArray keep;        // [T]
  int64_t window_stride0;  // bytes
  int64_t window_stride1;  // bytes
  int64_t rows_stride0;    // bytes
  int64_t B;
  int64_t W;
  int64_t T;
  int32_t row_bytes;
  int32_t vec;
};

static __global__ void __launch_bounds__(kWindowThreads, 1) window_commit_kernel(const __grid_constant__ WindowParams p) {
  const int64_t t = blockIdx.x;
  if (p.B == 0 || t >= p.T || !load_flag(p.keep, t)) return;
  const int64_t slot = window_slot(load_int(p.positions, t), p.W);
  if (slot < 0) return;
  // request b: the last b with cu[b] <= t (cu[0..B])
  int64_t lo = 0, hi = p.B;  // answer in [0, B)
  while (lo + 1 < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (load_int(p.cu, mid) <= t) lo = mid; else hi = mid;
  }
  const int64_t b = lo;
  const int64_t row_begin = load_int(p.cu, b);
  int64_t row_end = load_int(p.cu, b + 1);
  if (!(row_begin <= t && t < row_end)) return;  // inconsistent cu
  if (row_end > p.T) row_end = p.T;
  bool superseded = false;
  for (int64_t u = t + 1 + threadIdx.x; u < row_end && !superseded; u += kWindowThreads)
    superseded = load_flag(p.keep, u) && window_slot(load_int(p.positions, u), p.W) == slot;
  if (__syncthreads_or(superseded)) return;
  const char* src = p.rows + t * p.rows_stride0;
  char* dst = p.window + b * p.window_stride0 + slot * p.window_stride1;
  copy_bytes<kWindowThreads>(dst, src, 0, p.row_bytes, p.vec);
}

// ----------------------------------------------------------------------------
// state_select: grid (request, byte tile of kStateTile); index -1 (padding) and
// indices outside [0, S) leave out[b] untouched.
// ----------------------------------------------------------------------------


struct StateParams {
  const char* states;     // [B, S, *state]
  char* out;              // [B, *state]
  IntArray index;         // [B]
  int64_t states_stride0;  // bytes
  int64_t states_stride1;  // bytes
  int64_t out_stride0;     // bytes
  int64_t S;
  int64_t row_bytes;
  int32_t vec;
};

// At least 6 CTAs per SM (a register budget of 42): ptxas for sm_100a otherwise chose 32
// registers and spilled; sm_90a takes 40 either way.
static __global__ void __launch_bounds__(kStateThreads, 6) state_select_kernel(const __grid_constant__ StateParams p) {
  const int64_t b = blockIdx.x;
  const int64_t i = load_int(p.index, b);
  if (!state_index_valid(i, p.S)) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kStateTile;
  const int64_t end = min(begin + kStateTile, p.row_bytes);
  const char* src = p.states + b * p.states_stride0 + i * p.states_stride1;
  char* dst = p.out + b * p.out_stride0;
  copy_bytes<kStateThreads>(dst, src, begin, end, p.vec);
}

}  // namespace kv
}  // namespace dspark
