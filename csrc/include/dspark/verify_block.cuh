// verify_block on the GPU: the device code (docs/verification.md). The launcher is
// csrc/cuda/verify_block.cu; the decision rules are the shared __host__ __device__
// functions of philox.h / sampling.h, so the CPU kernel (csrc/cpu/verify_block.cpp,
// tested against the reference in CI) runs the same rules the GPU runs.
//
// No torch header here: the kernels also compile under NVRTC.
//
// Pipeline (one stream, no host sync; every size comes from shapes only):
//
//  1. stats_kernel     grid (row, vocab split of kStatsSplit). Per split of every
//                      target row (and draft row, for draft_logits): the largest scaled
//                      logit s = logit / T (sampling rows) or the argmax of the raw
//                      logits (greedy rows). The split size depends on nothing but V,
//                      so a row's statistics are bitwise the same whatever batch it
//                      comes in.
//  1b. mass_kernel     grid (row, vocab split), sampling rows without filters: merges
//                      the row's split maxima into its max m (a few values) and writes
//                      the split's fixed-point mass sum E_v, E_v = trunc(expf(s - m) 2^K)
//                      as int64 (sampling.h fixed_mass; docs/verification.md,
//                      "Order-independent sums"). The fixed-point sum needs m before
//                      the first term, hence the second pass; integer addition then
//                      makes the row's mass, and its lse, independent of the split
//                      and of the reduction order.
//  2. filter_kernel    one CTA per row of a request with min-p / top-k / top-p active:
//                      the filter threshold and the log-sum-exp over the kept set
//                      (bisection over int64 masses, see filtered_row_stats). Launched
//                      only when min_p, top_k or top_p is given. One CTA per row (not
//                      per request) so that a small batch still spreads over many SMs;
//                      rows past the first rejection are computed for nothing, which is
//                      the price of that.
//  3. walk_kernel      one CTA per request: merges the partials of steps 1 and 1b
//                      (max and int64 mass: exact in any order), decides every
//                      position in parallel (each decision needs only its own row's
//                      statistics), takes the first rejection,
//                      writes the accepted tokens and num_accepted, and for the row to
//                      sample (first rejection or bonus) either emits the greedy
//                      argmax or writes a RaceDesc for step 4.
//  4. race_kernel      grid (request, vocab split of kRaceSplit): the Gumbel race of
//                      the sampled row over its split. The residual race and the
//                      fallback race over p share one noise stream, so both are run in
//                      the same pass. Entries that provably cannot win draw no noise
//                      (exact pruning, as the CPU kernel), so most of a peaked row costs
//                      one load and one division.
//  5. finish_kernel    one warp per request: merges the race partials (lowest index
//                      wins ties, so the order cannot change the winner) and writes the
//                      emitted token.
//
// Determinism: every reduction is a fixed tree (warp butterflies whose merges are
// commutative bit for bit, then warps in index order), so results are identical run
// to run and do not depend on the batch; the row masses (lse, top-p) are int64 sums,
// exact in any order. Math is fp32 with the full-precision logf / expf / log1pf and
// IEEE division (do not build with fast-math).
#pragma once

#include "philox.h"
#include "launch.h"  // block sizes and launch plans
#include "sampling.h"

namespace dspark {
namespace vb {

// Block sizes and splits: launch.h (kStatsThreads, kStatsSplit, ...).

enum DraftKind : int32_t { kPointMass = 0, kDraftLogits = 1, kDraftProbs = 2 };
enum RaceMode : int32_t { kRaceNone = 0, kRaceResidual = 1, kRaceTarget = 2 };

// ----------------------------------------------------------------------------
// Element types: fp32 / fp16 / bf16 read as fp32 without the CUDA half headers
// (conversions are exact either way).
// ----------------------------------------------------------------------------

struct F32 {
  typedef float storage;
  static constexpr int kVec = 4;  // elements per 16-byte load
};
struct F16 {
  typedef unsigned short storage;
  static constexpr int kVec = 8;
};
struct BF16 {
  typedef unsigned short storage;
  static constexpr int kVec = 8;
};

__device__ __forceinline__ float to_float(F32, float x) { return x; }
__device__ __forceinline__ float to_float(F16, unsigned short x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}
__device__ __forceinline__ float to_float(BF16, unsigned short x) {
  return __uint_as_float(static_cast<unsigned int>(x) << 16);
}

template <class Tag>
__device__ __forceinline__ float load_float(const typename Tag::storage* row, int64_t v) {
  return to_float(Tag(), __ldg(row + v));
}

__device__ __forceinline__ void unpack(F32, const uint4& u, float (&x)[4]) {
  x[0] = __uint_as_float(u.x);
  x[1] = __uint_as_float(u.y);
  x[2] = __uint_as_float(u.z);
  x[3] = __uint_as_float(u.w);
}
template <class Tag>
__device__ __forceinline__ void unpack_halves(Tag tag, const uint4& u, float (&x)[8]) {
  const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: element 2i is the low half
    x[2 * i] = to_float(tag, static_cast<unsigned short>(w[i] & 0xffffu));
    x[2 * i + 1] = to_float(tag, static_cast<unsigned short>(w[i] >> 16));
  }
}
__device__ __forceinline__ void unpack(F16 tag, const uint4& u, float (&x)[8]) { unpack_halves(tag, u, x); }
__device__ __forceinline__ void unpack(BF16 tag, const uint4& u, float (&x)[8]) { unpack_halves(tag, u, x); }

// An int32 or int64 array (per-request tensors are passed as given, no conversion).
struct IntArray {
  const void* ptr;
  int32_t is_int64;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is_int64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<const int32_t*>(ptr)[i];
  }
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// ----------------------------------------------------------------------------
// Workspace records and parameters
// ----------------------------------------------------------------------------

struct StatPartial {  // one (row, split) of steps 1 and 1b
  float max;      // largest scaled logit of the split (sampling rows; stats_kernel)
  int64_t mass;   // fixed-point mass of the split against the row's max (mass_kernel)
  ArgMax argmax;  // argmax of the raw logits (greedy rows; stats_kernel)
};

struct RowFilter {  // a row's kept set s >= threshold, its log-sum-exp and max s
  float threshold;
  float lse;
  float max;  // the largest s, which every filter keeps
};

struct RaceDesc {  // the row request b samples, written by walk_kernel
  int64_t target_row;
  int64_t draft_row;
  int64_t draft_token;
  uint64_t seed;
  uint64_t position;
  float temperature;
  float p_threshold, p_lse;
  float p_floor;  // a lower bound of the winning score of the race over p (or -inf)
  float q_threshold, q_lse;
  int32_t mode;      // RaceMode
  int32_t accepted;  // column of output_tokens that receives the emitted token
  float log_rho;     // the residual is max(rho p - q, 0): 0 for method="token" (block: verify_block_method.cuh)
};

struct RacePartial {  // one (request, split) of step 4
  ArgMax residual;    // argmax of log max(p - q, 0) + G
  ArgMax target;      // argmax of log p + G (the fallback, and the padding/bonus race)
};

struct Params {
  const void* target;  // [T, V], element stride 1, row stride target_stride
  int64_t target_stride;
  int32_t target_vec;  // rows 16-byte aligned: step 1 may use vector loads
  const void* draft;   // draft_logits or draft_probs [N, V], or null
  int64_t draft_stride;
  int32_t draft_vec;
  int32_t draft_kind;  // DraftKind
  IntArray draft_tokens, cu, top_k, seed, offset;
  const float* temperature;  // [B] or null (all greedy)
  const float* top_p;        // [B] or null
  const float* min_p;        // [B] or null (sampling.h min_p_log: <= 0 is off)
  IntArray draft_index;      // [N] or {null}: q of draft j is row draft_index[j] of draft
  int64_t draft_rows;        // rows of draft (N without draft_index); indices are clamped into it
  int64_t B, N, T, V, max_num_draft;
  int64_t num_splits;       // ceil(V / kStatsSplit)
  int64_t num_race_splits;  // ceil(V / kRaceSplit)
  StatPartial* partials;    // [stat rows, num_splits]; stat rows = T target rows, then N draft rows
  RowFilter* row_filter;    // [stat rows] (filtered requests only) or null
  RaceDesc* desc;           // [B]
  RacePartial* race_partials;  // [B, num_race_splits]
  int32_t* output_tokens;   // [B, max_num_draft + 1], pre-filled with -1
  int32_t* num_accepted;    // [B]
};

// A request's parameters with its ragged range clamped so that no garbage offset can
// address a row outside the tensors: start, start + n in [0, N], n <= max_num_draft.
struct Request {
  int64_t start, n;
  float temperature;
  int64_t top_k;
  float top_p;
  float log_min_p;  // min_p_log(min_p), -inf when off
  bool greedy, filtered;
  uint64_t seed, offset;
};

__device__ __forceinline__ int64_t clamped_cu(const Params& p, int64_t b) { return clamp64(p.cu[b], 0, p.N); }

__device__ __forceinline__ Request load_request(const Params& p, int64_t b) {
  Request r;
  r.start = clamped_cu(p, b);
  const int64_t end = clamped_cu(p, b + 1);
  r.n = clamp64(end - r.start, 0, p.max_num_draft);
  r.temperature = p.temperature ? p.temperature[b] : 0.f;
  r.top_k = p.top_k.ptr ? p.top_k[b] : 0;
  r.top_p = p.top_p ? p.top_p[b] : 1.f;
  r.log_min_p = p.min_p ? min_p_log(p.min_p[b]) : DSPARK_NEG_INF;
  r.greedy = !(r.temperature > 0.f);
  r.filtered = !r.greedy && (top_k_active(r.top_k, p.V) || top_p_active(r.top_p) || r.log_min_p > DSPARK_NEG_INF);
  r.seed = static_cast<uint64_t>(p.seed[b]);
  r.offset = static_cast<uint64_t>(p.offset[b]);
  return r;
}

// The row of p.draft that is q of draft j: draft_index[j] (clamped into range, so a bad
// index never reads out of bounds; the range is a data check) or j itself.
__device__ __forceinline__ int64_t q_data_row(const Params& p, int64_t j) {
  return p.draft_index.ptr ? clamp64(p.draft_index[j], 0, p.draft_rows - 1) : j;
}

// The request that owns statistics row r (target rows [0, T), then draft rows):
// the largest b whose first row is <= r. Any cu gives some b in [0, B).
__device__ __forceinline__ int64_t row_owner(const Params& p, int64_t r) {
  const bool is_draft = r >= p.T;
  const int64_t row = is_draft ? r - p.T : r;
  int64_t lo = 0, hi = p.B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    const int64_t first = clamped_cu(p, mid) + (is_draft ? 0 : mid);
    if (first <= row) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// ----------------------------------------------------------------------------
// Deterministic reductions. A warp butterfly gives every lane the same bits when the
// merge is commutative bit for bit (all merges below are); warps are then merged in
// index order by every thread, so the whole block holds one identical result.
// ----------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ double shfl_xor(double v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ uint32_t shfl_xor(uint32_t v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ int64_t shfl_xor(int64_t v, int m) {
  return static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(v), m));
}
__device__ __forceinline__ ArgMax shfl_xor(ArgMax v, int m) {
  v.value = shfl_xor(v.value, m);
  v.index = shfl_xor(v.index, m);
  return v;
}

struct KeyRange {
  uint32_t lo, hi;
};
__device__ __forceinline__ KeyRange shfl_xor(KeyRange v, int m) {
  v.lo = shfl_xor(v.lo, m);
  v.hi = shfl_xor(v.hi, m);
  return v;
}

struct BisectAcc {  // one bisection probe t: mass of keys >= t, and the keys next to t
  int64_t mass;      // a count (top-k) or a fixed-point mass (top-p): exact in any order
  uint32_t next_ge;  // smallest key >= t
  uint32_t prev_lt;  // largest key < t
};
__device__ __forceinline__ BisectAcc shfl_xor(BisectAcc v, int m) {
  v.mass = shfl_xor(v.mass, m);
  v.next_ge = shfl_xor(v.next_ge, m);
  v.prev_lt = shfl_xor(v.prev_lt, m);
  return v;
}

struct ArgMaxMergeOp {
  __device__ __forceinline__ ArgMax operator()(ArgMax a, ArgMax b) const { return argmax_merge(a, b); }
};
struct MinI64Op {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct AddF64Op {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct AddI64Op {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};
struct MaxF32Op {  // scaled logits are never NaN (scale_logit)
  __device__ __forceinline__ float operator()(float a, float b) const { return b > a ? b : a; }
};
struct MinU32Op {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a < b ? a : b; }
};
struct KeyRangeOp {
  __device__ __forceinline__ KeyRange operator()(KeyRange a, KeyRange b) const {
    KeyRange r;
    r.lo = a.lo < b.lo ? a.lo : b.lo;
    r.hi = a.hi > b.hi ? a.hi : b.hi;
    return r;
  }
};
struct BisectOp {
  __device__ __forceinline__ BisectAcc operator()(BisectAcc a, BisectAcc b) const {
    BisectAcc r;
    r.mass = a.mass + b.mass;
    r.next_ge = a.next_ge < b.next_ge ? a.next_ge : b.next_ge;
    r.prev_lt = a.prev_lt > b.prev_lt ? a.prev_lt : b.prev_lt;
    return r;
  }
};

template <class T, class Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// Every thread of the block gets the result. Ends with a barrier, so calls may follow
// each other (the shared array of one instantiation is reused).
template <int kThreads, class T, class Op>
__device__ __forceinline__ T block_allreduce(T v, Op op) {
  static_assert(kThreads % 32 == 0, "whole warps only");
  constexpr int kWarps = kThreads / 32;
  v = warp_allreduce(v, op);
  if (kWarps == 1) return v;
  __shared__ T warp_values[kWarps];
  if ((threadIdx.x & 31) == 0) warp_values[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = warp_values[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, warp_values[w]);
  __syncthreads();
  return r;
}

// ----------------------------------------------------------------------------
// Step 1: split statistics
// ----------------------------------------------------------------------------

// A kept entry's share of its row's mass (docs/verification.md, "Order-independent
// sums"): E_v = fixed_mass(expf(s - m)) with m the row's largest kept s (s <= m, so
// expf is in [0, 1]); in a row whose max is +inf, 1 per +inf entry, which the +inf
// rule counts (row_filter_final); 0 for -inf.
__device__ __forceinline__ int64_t row_mass_term(float s, float m, float scale) {
  if (!(s > DSPARK_NEG_INF)) return 0;
  if (m == DSPARK_POS_INF) return s == DSPARK_POS_INF ? 1 : 0;
  return fixed_mass(expf(s - m), scale);
}

// Visits [begin, end) of one row, calling visit(x, v) with the raw element x of
// column v; each thread visits its indices in increasing order (argmax_update keeps
// the lowest index on ties, argmax_merge does the rest).
template <class Tag, class Visit>
__device__ __forceinline__ void scan_split(const typename Tag::storage* row, bool vec, int64_t begin,
                                           int64_t end, Visit& visit) {
  constexpr int kE = Tag::kVec;
  constexpr int kLoads = static_cast<int>(kStatsSplit / (kE * kStatsThreads));
  static_assert(kStatsSplit % (kE * kStatsThreads) == 0, "split must be whole vectors per thread");
  if (vec && end - begin == kStatsSplit) {
    // All loads first (kLoads independent 16-byte loads in flight per thread).
    const uint4* base = reinterpret_cast<const uint4*>(row + begin);
    uint4 buf[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) buf[j] = __ldg(base + threadIdx.x + j * kStatsThreads);
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      float x[kE];
      unpack(Tag(), buf[j], x);
      const int64_t v0 = begin + static_cast<int64_t>(threadIdx.x + j * kStatsThreads) * kE;
#pragma unroll
      for (int e = 0; e < kE; ++e) visit(x[e], v0 + e);
    }
  } else {
    for (int64_t v = begin + threadIdx.x; v < end; v += kStatsThreads) visit(load_float<Tag>(row, v), v);
  }
}

struct ArgMaxVisit {  // greedy rows: argmax of the raw logits
  ArgMax best;
  __device__ __forceinline__ void operator()(float x, int64_t v) { argmax_update(best, x, v); }
};
struct MaxVisit {  // sampling rows, step 1: the largest scaled logit
  float temperature, max;
  __device__ __forceinline__ void operator()(float x, int64_t) {
    const float s = scale_logit(x, temperature);
    if (s > max) max = s;
  }
};
struct MassVisit {  // sampling rows, step 1b: the fixed-point mass against the row's max
  float temperature, max, scale;
  int64_t mass;
  __device__ __forceinline__ void operator()(float x, int64_t) {
    mass += row_mass_term(scale_logit(x, temperature), max, scale);
  }
};

// The [begin, end) of this block's split (blockIdx.y) of a row.
__device__ __forceinline__ int64_t split_begin() { return static_cast<int64_t>(blockIdx.y) * kStatsSplit; }
__device__ __forceinline__ int64_t split_end(int64_t V) {
  const int64_t end = split_begin() + kStatsSplit;
  return end < V ? end : V;
}

template <class Tag>
__device__ __forceinline__ void split_partial(const Params& p, const typename Tag::storage* row, bool vec,
                                              bool greedy, float temperature, int64_t r) {
  const int64_t begin = split_begin(), end = split_end(p.V);
  StatPartial out;
  out.max = DSPARK_NEG_INF;
  out.mass = 0;
  out.argmax = argmax_init();
  if (greedy) {
    ArgMaxVisit visit{argmax_init()};
    scan_split<Tag>(row, vec, begin, end, visit);
    out.argmax = block_allreduce<kStatsThreads>(visit.best, ArgMaxMergeOp());
  } else {
    MaxVisit visit{temperature, DSPARK_NEG_INF};
    scan_split<Tag>(row, vec, begin, end, visit);
    out.max = block_allreduce<kStatsThreads>(visit.max, MaxF32Op());
  }
  if (threadIdx.x == 0) p.partials[r * p.num_splits + blockIdx.y] = out;
}

// grid (stat rows, num_splits). Greedy rows: argmax of the raw logits; sampling rows
// without filters: the split max of s = logit / T (mass_kernel adds the mass);
// filtered rows: filter_kernel.
template <class TT, class DT>
__global__ void __launch_bounds__(kStatsThreads) stats_kernel(const Params p) {
  const int64_t r = blockIdx.x;
  const Request rq = load_request(p, row_owner(p, r));
  if (rq.filtered) return;
  if (r < p.T) {
    const typename TT::storage* row = static_cast<const typename TT::storage*>(p.target) + r * p.target_stride;
    split_partial<TT>(p, row, p.target_vec != 0, rq.greedy, rq.temperature, r);
  } else {  // draft row (draft_logits only): q's statistics, sampling rows only
    if (rq.greedy) return;
    const typename DT::storage* row =
        static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, r - p.T) * p.draft_stride;
    split_partial<DT>(p, row, p.draft_vec != 0, false, rq.temperature, r);
  }
}

// Step 1b for one split: the row's max from stats_kernel's split maxima (every split of
// the row merges the same values to the same m), then the split's int64 mass.
template <class Tag>
__device__ __forceinline__ void split_mass(const Params& p, const typename Tag::storage* row, bool vec,
                                           float temperature, int64_t r) {
  StatPartial* part = p.partials + r * p.num_splits;
  float m = DSPARK_NEG_INF;
  for (int64_t j = threadIdx.x; j < p.num_splits; j += kStatsThreads) m = MaxF32Op()(m, part[j].max);
  m = block_allreduce<kStatsThreads>(m, MaxF32Op());
  MassVisit visit{temperature, m, mass_scale(mass_fraction_bits(p.V)), 0};
  scan_split<Tag>(row, vec, split_begin(), split_end(p.V), visit);
  const int64_t mass = block_allreduce<kStatsThreads>(visit.mass, AddI64Op());
  if (threadIdx.x == 0) part[blockIdx.y].mass = mass;  // only this field: other splits read .max
}

// grid (stat rows, num_splits), after stats_kernel: the rows stats_kernel gave a split
// max (sampling rows without filters); the others return at once. The minimum of blocks
// per SM caps the registers at 64: without it ptxas for sm_90a chose 40 and spilled in
// the mixed half-precision instantiations (F16 target, BF16 draft and back).
constexpr int kMassMinBlocks = 8;
template <class TT, class DT>
__global__ void __launch_bounds__(kStatsThreads, kMassMinBlocks) mass_kernel(const Params p) {
  const int64_t r = blockIdx.x;
  const Request rq = load_request(p, row_owner(p, r));
  if (rq.filtered || rq.greedy) return;
  if (r < p.T) {
    const typename TT::storage* row = static_cast<const typename TT::storage*>(p.target) + r * p.target_stride;
    split_mass<TT>(p, row, p.target_vec != 0, rq.temperature, r);
  } else {
    const typename DT::storage* row =
        static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, r - p.T) * p.draft_stride;
    split_mass<DT>(p, row, p.draft_vec != 0, rq.temperature, r);
  }
}

// ----------------------------------------------------------------------------
// Step 2: top-k / top-p thresholds without sorting
// ----------------------------------------------------------------------------

// Order-preserving uint32 key of a float (-0 folded onto +0, so key order is the
// float order and s >= t on keys is s >= t on floats).
__device__ __forceinline__ uint32_t order_key(float s) {
  uint32_t bits = __float_as_uint(s);
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// top-k counts every entry once; top-p weighs a kept entry (s >= the min-p / top-k
// threshold, finite) by its fixed-point mass E_v against the row's max (int64, so a
// probe's mass is exact whatever the reduction order, as the CPU's).
struct TopKWeight {
  __device__ __forceinline__ bool operator()(float, int64_t& w) const {
    w = 1;
    return true;
  }
};
struct TopPWeight {
  float threshold, max, scale;
  __device__ __forceinline__ bool operator()(float s, int64_t& w) const {
    if (!(s >= threshold && s > DSPARK_NEG_INF)) return false;
    w = fixed_mass(expf(s - max), scale);
    return true;
  }
};

// The largest entry key t with F(t) = sum of weights of entries with key >= t that is
// >= target (compared as double(F(t)) >= target), F being non-increasing. Invariant:
// lo is an entry key with F(lo) >= target, the answer is < hi. Each probe moves lo up
// to the first entry key >= mid, or hi down to just past the last entry key < mid, so
// the search stops as soon as one entry key is left (at most 33 passes; fewer where
// entries are sparse, as at the top of the distribution where thresholds live).
template <class Tag, class Weight>
__device__ uint32_t bisect_largest_key(const typename Tag::storage* row, int64_t V, float temperature,
                                       uint64_t lo, uint64_t hi, double target, Weight weight) {
  while (lo + 1 < hi) {
    const uint32_t mid = static_cast<uint32_t>((lo + hi) >> 1);
    BisectAcc acc;
    acc.mass = 0;
    acc.next_ge = 0xffffffffu;
    acc.prev_lt = 0u;
    for (int64_t v = threadIdx.x; v < V; v += kFilterThreads) {
      const float s = scale_logit(load_float<Tag>(row, v), temperature);
      int64_t w;
      if (!weight(s, w)) continue;
      const uint32_t key = order_key(s);
      if (key >= mid) {
        acc.mass += w;
        if (key < acc.next_ge) acc.next_ge = key;
      } else if (key > acc.prev_lt) {
        acc.prev_lt = key;
      }
    }
    acc = block_allreduce<kFilterThreads>(acc, BisectOp());
    if (static_cast<double>(acc.mass) >= target) {
      lo = acc.next_ge > mid ? acc.next_ge : mid;
    } else {
      hi = (acc.prev_lt > lo ? acc.prev_lt : lo) + 1;
    }
  }
  return static_cast<uint32_t>(lo);
}

// (threshold, max) of a row -> its RowFilter: lse = lse_from_mass(max, mass) (sampling.h),
// with mass the int64 sum of row_mass_term over the kept entries; the +inf rule for a
// row whose max is +inf (mass then counts its +inf entries); -inf for a row of -inf.
__device__ __forceinline__ RowFilter row_filter_from_mass(float threshold, float max, int64_t mass, int64_t V) {
  RowFilter f;
  f.threshold = threshold;
  f.max = max;
  f.lse = max > DSPARK_NEG_INF && max < DSPARK_POS_INF ? lse_from_mass(max, mass, mass_fraction_bits(V))
                                                        : DSPARK_NEG_INF;
  row_filter_final(max, static_cast<float>(mass), f.threshold, f.lse);  // the +inf rule (sampling.h)
  return f;
}

// Threshold and log-sum-exp of one filtered row, exactly the CPU's filter_threshold:
//   min-p: max s + log(min_p);
//   top-k: the k-th largest s = the largest t with count(s >= t) >= k;
//   top-p: the largest kept t with mass(kept, s >= t) >= top_p * mass(kept), masses
//          the int64 E_v against the row's max (the largest kept s: every filter keeps it).
// Slow path: about 32 passes over the row per active filter (a radix select would do
// top-k in 4); acceptable while filtered rows are the exception.
template <class Tag>
__device__ RowFilter filtered_row_stats(const typename Tag::storage* row, int64_t V, float temperature,
                                        int64_t top_k, float top_p, float log_min_p) {
  float row_max = DSPARK_NEG_INF;
  for (int64_t v = threadIdx.x; v < V; v += kFilterThreads)
    row_max = MaxF32Op()(row_max, scale_logit(load_float<Tag>(row, v), temperature));
  row_max = block_allreduce<kFilterThreads>(row_max, MaxF32Op());
  float threshold = min_p_threshold(row_max, log_min_p);  // min-p first (vLLM's order); -inf when off
  if (top_k_active(top_k, V)) {
    KeyRange range;
    range.lo = 0xffffffffu;
    range.hi = 0u;
    for (int64_t v = threadIdx.x; v < V; v += kFilterThreads) {
      const uint32_t key = order_key(scale_logit(load_float<Tag>(row, v), temperature));
      if (key < range.lo) range.lo = key;
      if (key > range.hi) range.hi = key;
    }
    range = block_allreduce<kFilterThreads>(range, KeyRangeOp());
    const uint32_t key = bisect_largest_key<Tag>(row, V, temperature, range.lo,
                                                 static_cast<uint64_t>(range.hi) + 1,
                                                 static_cast<double>(top_k), TopKWeight());
    const float t = key_to_float(key);
    threshold = threshold < t ? t : threshold;  // std::max(threshold, t) as the CPU
  }
  const float scale = mass_scale(mass_fraction_bits(V));
  if (top_p_active(top_p)) {
    if (row_max == DSPARK_POS_INF) {  // +inf entries hold all the mass: keep just them
      threshold = DSPARK_POS_INF;
    } else if (row_max > DSPARK_NEG_INF) {  // else nothing is kept and the threshold stays
      // The kept set s >= threshold holds row_max (no filter cuts above the max): its
      // largest key is order_key(row_max), its smallest the bisection's lower end.
      TopPWeight weight;
      weight.threshold = threshold;
      weight.max = row_max;
      weight.scale = scale;
      uint32_t min_key = 0xffffffffu;
      int64_t total = 0;
      for (int64_t v = threadIdx.x; v < V; v += kFilterThreads) {
        const float s = scale_logit(load_float<Tag>(row, v), temperature);
        int64_t w;
        if (!weight(s, w)) continue;
        total += w;
        const uint32_t key = order_key(s);
        if (key < min_key) min_key = key;
      }
      min_key = block_allreduce<kFilterThreads>(min_key, MinU32Op());
      total = block_allreduce<kFilterThreads>(total, AddI64Op());
      const double target = static_cast<double>(top_p) * static_cast<double>(total);
      const uint32_t key = bisect_largest_key<Tag>(row, V, temperature, min_key,
                                                   static_cast<uint64_t>(order_key(row_max)) + 1, target, weight);
      const float t = key_to_float(key);
      threshold = threshold < t ? t : threshold;  // std::max(threshold, t) as the CPU
    }
  }
  int64_t mass = 0;
  for (int64_t v = threadIdx.x; v < V; v += kFilterThreads) {
    const float s = scale_logit(load_float<Tag>(row, v), temperature);
    if (s >= threshold) mass += row_mass_term(s, row_max, scale);
  }
  mass = block_allreduce<kFilterThreads>(mass, AddI64Op());
  return row_filter_from_mass(threshold, row_max, mass, V);
}

// grid (stat rows): rows of requests with an active filter; the others return at once.
template <class TT, class DT>
__global__ void __launch_bounds__(kFilterThreads) filter_kernel(const Params p) {
  const int64_t r = blockIdx.x;
  const Request rq = load_request(p, row_owner(p, r));
  if (!rq.filtered) return;
  RowFilter f;
  if (r < p.T) {
    const typename TT::storage* row = static_cast<const typename TT::storage*>(p.target) + r * p.target_stride;
    f = filtered_row_stats<TT>(row, p.V, rq.temperature, rq.top_k, rq.top_p, rq.log_min_p);
  } else {
    const typename DT::storage* row =
        static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, r - p.T) * p.draft_stride;
    f = filtered_row_stats<DT>(row, p.V, rq.temperature, rq.top_k, rq.top_p, rq.log_min_p);
  }
  if (threadIdx.x == 0) p.row_filter[r] = f;
}

// ----------------------------------------------------------------------------
// Bounds of the Gumbel noise, for exact pruning of the race (as the CPU kernel).
// The extreme words give the extreme noise if logf is monotone; the slack keeps
// the bounds safe should CUDA's logf (1 ulp) not be monotone somewhere.
// ----------------------------------------------------------------------------

constexpr float kGumbelBoundSlack = 1e-3f;
__device__ __forceinline__ float gumbel_max_bound() { return gumbel_upper_bound() + kGumbelBoundSlack; }
__device__ __forceinline__ float gumbel_min_bound() { return gumbel_from_word(0u) - kGumbelBoundSlack; }

// ----------------------------------------------------------------------------
// Step 3: the walk over positions (one CTA per request)
// ----------------------------------------------------------------------------

// Warp-collective: a row's kept set and log-sum-exp (the split maxima and int64 split
// masses of steps 1 and 1b: exact in any merge order).
__device__ __forceinline__ RowFilter row_filter_at(const Params& p, int64_t r, bool filtered) {
  if (filtered) return p.row_filter[r];
  float m = DSPARK_NEG_INF;
  int64_t mass = 0;
  const StatPartial* part = p.partials + r * p.num_splits;
  for (int64_t j = threadIdx.x & 31; j < p.num_splits; j += 32) {
    m = MaxF32Op()(m, part[j].max);
    mass += part[j].mass;
  }
  m = warp_allreduce(m, MaxF32Op());
  mass = warp_allreduce(mass, AddI64Op());
  return row_filter_from_mass(DSPARK_NEG_INF, m, mass, p.V);
}

// Warp-collective: argmax of a raw target row; 0 for an all -inf (or NaN) row.
__device__ __forceinline__ int64_t row_argmax_at(const Params& p, int64_t r) {
  ArgMax am = argmax_init();
  const StatPartial* part = p.partials + r * p.num_splits;
  for (int64_t j = threadIdx.x & 31; j < p.num_splits; j += 32) am = argmax_merge(am, part[j].argmax);
  am = warp_allreduce(am, ArgMaxMergeOp());
  return am.index < 0 ? 0 : am.index;
}

__device__ __forceinline__ bool valid_token(int64_t x, int64_t V) { return x >= 0 && x < V; }

// Warp-collective: log q(x) of draft row drow at the valid id x (0 for a point mass).
template <class DT>
__device__ float draft_log_q(const Params& p, const Request& rq, int64_t drow, int64_t x) {
  if (p.draft_kind == kDraftLogits) {
    const RowFilter qf = row_filter_at(p, p.T + drow, rq.filtered);
    const float d =
        load_float<DT>(static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, drow) * p.draft_stride, x);
    return filtered_log_prob(scale_logit(d, rq.temperature), qf.threshold, qf.lse);
  }
  if (p.draft_kind == kDraftProbs)
    return logf(
        load_float<DT>(static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, drow) * p.draft_stride, x));
  return 0.f;  // point mass at x
}

// Warp-collective (every lane computes the same decision): is draft i of request b
// accepted? Exactly the CPU kernel's per-position rule.
template <class TT, class DT>
__device__ bool accept_position(const Params& p, const Request& rq, int64_t b, int64_t i) {
  const int64_t x = p.draft_tokens[rq.start + i];
  const bool valid = valid_token(x, p.V);
  const int64_t trow = rq.start + b + i;
  if (rq.greedy) {
    const int64_t am = row_argmax_at(p, trow);
    return valid && x == am;
  }
  if (!valid) return false;  // padding / out-of-range ids are never accepted
  const RowFilter pf = row_filter_at(p, trow, rq.filtered);
  const float t = load_float<TT>(static_cast<const typename TT::storage*>(p.target) + trow * p.target_stride, x);
  const float log_p = filtered_log_prob(scale_logit(t, rq.temperature), pf.threshold, pf.lse);
  const float log_q = draft_log_q<DT>(p, rq, rq.start + i, x);
  const float log_u = logf(uniform_from_word(random_word(rq.seed, rq.offset + static_cast<uint64_t>(i), kSaltAccept, 0)));
  return accept_token(log_u, log_p, log_q);
}

// grid (B), kWalkThreads. Warp w decides positions w, w + 8, ... (stopping at its own
// first rejection); the block takes the smallest rejected position. Launch bounds with a
// minimum of 1 CTA per SM: one CTA per request, occupancy does not matter, and without
// it ptxas for sm_100a chose 40 registers and spilled.
template <class TT, class DT>
__global__ void __launch_bounds__(kWalkThreads, 1) walk_kernel(const Params p) {
  const int64_t b = blockIdx.x;
  const Request rq = load_request(p, b);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t width = p.max_num_draft + 1;
  int32_t* out_row = p.output_tokens + b * width;

  int64_t first_reject = rq.n;
  for (int64_t i = warp; i < rq.n; i += kWalkThreads / 32) {
    if (!accept_position<TT, DT>(p, rq, b, i)) {
      first_reject = i;
      break;
    }
  }
  const int64_t accepted = block_allreduce<kWalkThreads>(first_reject, MinI64Op());

  for (int64_t i = threadIdx.x; i < accepted; i += kWalkThreads)
    out_row[i] = static_cast<int32_t>(p.draft_tokens[rq.start + i]);  // valid ids, < V
  if (threadIdx.x == 0) p.num_accepted[b] = static_cast<int32_t>(accepted);
  if (warp != 0) return;

  // The row to sample: the first rejection, or the bonus row n.
  const int64_t i = accepted;
  const int64_t trow = rq.start + b + i;
  RaceDesc d;
  d.target_row = trow;
  d.draft_row = rq.start + i;
  d.draft_token = -1;
  d.seed = rq.seed;
  d.position = rq.offset + static_cast<uint64_t>(i);
  d.temperature = rq.temperature;
  d.p_threshold = DSPARK_NEG_INF;
  d.p_lse = DSPARK_NEG_INF;
  d.p_floor = DSPARK_NEG_INF;
  d.q_threshold = DSPARK_NEG_INF;
  d.q_lse = DSPARK_NEG_INF;
  d.mode = kRaceNone;
  d.accepted = static_cast<int32_t>(accepted);
  d.log_rho = 0.f;
  if (rq.greedy) {
    const int64_t am = row_argmax_at(p, trow);
    if (lane == 0) out_row[accepted] = static_cast<int32_t>(am);
  } else {
    const RowFilter pf = row_filter_at(p, trow, rq.filtered);
    d.p_threshold = pf.threshold;
    d.p_lse = pf.lse;
    // The race over p is won with a score >= log p(argmax) + (least noise): a floor
    // below which entries need no noise.
    const float log_p_max = filtered_log_prob(pf.max, pf.threshold, pf.lse);
    if (log_p_max > DSPARK_NEG_INF) d.p_floor = log_p_max + gumbel_min_bound();
    const int64_t x = i < rq.n ? p.draft_tokens[rq.start + i] : -1;
    // A rejected real draft samples the residual; padding and a draft whose q(x) is not
    // a finite positive number (never drawn from q) and the bonus row sample p itself.
    if (i < rq.n && valid_token(x, p.V) && draft_prob_ok(draft_log_q<DT>(p, rq, d.draft_row, x))) {
      d.mode = kRaceResidual;
      d.draft_token = x;
      if (p.draft_kind == kDraftLogits) {
        const RowFilter qf = row_filter_at(p, p.T + d.draft_row, rq.filtered);
        d.q_threshold = qf.threshold;
        d.q_lse = qf.lse;
      }
    } else {
      d.mode = kRaceTarget;
    }
  }
  if (lane == 0) p.desc[b] = d;
}

// ----------------------------------------------------------------------------
// Steps 4 and 5: the Gumbel race of the sampled row
// ----------------------------------------------------------------------------

// grid (B, num_race_splits). Each thread takes 4 consecutive entries at a time (one
// Philox call) in increasing index order. Exact pruning: an entry whose log-weight
// plus the largest noise cannot reach the thread's running best (or, for the race
// over p, the floor d.p_floor) cannot win, so it draws no noise; a group of four with
// no live entry skips the Philox call. The residual weight is at most log p, so an
// entry dead for the residual by log p needs neither its draft value nor the residual.
template <class TT, class DT>
__global__ void __launch_bounds__(kRaceThreads) race_kernel(const Params p) {
  const int64_t b = blockIdx.x;
  const int64_t split = blockIdx.y;
  const RaceDesc d = p.desc[b];
  if (d.mode == kRaceNone) return;
  const bool residual = d.mode == kRaceResidual;
  const typename TT::storage* trow = static_cast<const typename TT::storage*>(p.target) + d.target_row * p.target_stride;
  const typename DT::storage* drow =
      residual && p.draft_kind != kPointMass
          ? static_cast<const typename DT::storage*>(p.draft) + q_data_row(p, d.draft_row) * p.draft_stride
          : nullptr;
  const int64_t begin = split * kRaceSplit;
  const int64_t end = begin + kRaceSplit < p.V ? begin + kRaceSplit : p.V;
  const float gmax = gumbel_max_bound();

  ArgMax best_residual = argmax_init();
  ArgMax best_target = argmax_init();
  for (int64_t base = begin + 4 * static_cast<int64_t>(threadIdx.x); base < end; base += 4 * kRaceThreads) {
    // Live log-weights of the four entries (-inf: excluded or cannot win).
    float log_p[4], log_r[4];
    bool live = false;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t v = base + e;
      log_p[e] = DSPARK_NEG_INF;
      log_r[e] = DSPARK_NEG_INF;
      if (v >= end) continue;
      const float lp = filtered_log_prob(scale_logit(load_float<TT>(trow, v), d.temperature), d.p_threshold, d.p_lse);
      if (!(lp > DSPARK_NEG_INF)) continue;  // also NaN
      const float reach = lp + gmax;
      if (residual && reach >= best_residual.value) {
        float log_q;
        if (p.draft_kind == kDraftLogits)
          log_q = filtered_log_prob(scale_logit(load_float<DT>(drow, v), d.temperature), d.q_threshold, d.q_lse);
        else if (p.draft_kind == kDraftProbs)
          log_q = logf(load_float<DT>(drow, v));
        else
          log_q = v == d.draft_token ? 0.f : DSPARK_NEG_INF;
        const float lr = residual_log_weight(lp + d.log_rho, log_q);  // <= lp: the pruning above holds
        if (lr > DSPARK_NEG_INF && lr + gmax >= best_residual.value) log_r[e] = lr;
      }
      if (reach >= best_target.value && reach >= d.p_floor) log_p[e] = lp;
      live = live || log_p[e] > DSPARK_NEG_INF || log_r[e] > DSPARK_NEG_INF;
    }
    if (!live) continue;
    const PhiloxWords words = random_words4(d.seed, d.position, kSaltResample, static_cast<uint32_t>(base));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool race_p = log_p[e] > DSPARK_NEG_INF;
      const bool race_r = log_r[e] > DSPARK_NEG_INF;
      if (!race_p && !race_r) continue;
      const float g = gumbel_from_word(words.w[e]);  // base is a multiple of 4
      if (race_p) argmax_update(best_target, log_p[e] + g, base + e);
      if (race_r) argmax_update(best_residual, log_r[e] + g, base + e);
    }
  }
  best_residual = block_allreduce<kRaceThreads>(best_residual, ArgMaxMergeOp());
  best_target = block_allreduce<kRaceThreads>(best_target, ArgMaxMergeOp());
  if (threadIdx.x == 0) {
    RacePartial out;
    out.residual = best_residual;
    out.target = best_target;
    p.race_partials[b * p.num_race_splits + split] = out;
  }
}

// grid (B), one warp: the residual winner; if the residual has no mass, the winner of
// the race over p; if p has none either, token 0 (as the CPU kernel).
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const Params p) {
  const int64_t b = blockIdx.x;
  const RaceDesc d = p.desc[b];
  if (d.mode == kRaceNone) return;
  ArgMax best_residual = argmax_init();
  ArgMax best_target = argmax_init();
  const RacePartial* part = p.race_partials + b * p.num_race_splits;
  for (int64_t j = threadIdx.x; j < p.num_race_splits; j += 32) {
    best_residual = argmax_merge(best_residual, part[j].residual);
    best_target = argmax_merge(best_target, part[j].target);
  }
  best_residual = warp_allreduce(best_residual, ArgMaxMergeOp());
  best_target = warp_allreduce(best_target, ArgMaxMergeOp());
  if (threadIdx.x == 0) {
    int64_t token = d.mode == kRaceResidual ? best_residual.index : -1;
    if (token < 0) token = best_target.index;
    if (token < 0) token = 0;
    p.output_tokens[b * (p.max_num_draft + 1) + d.accepted] = static_cast<int32_t>(token);
  }
}

}  // namespace vb
}  // namespace dspark
