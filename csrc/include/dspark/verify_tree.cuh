// verify_tree on CUDA: device code (docs/verification.md, "verify_tree"). Launched by
// csrc/cuda/verify_tree.cu; the decision rules are the shared __host__ __device__
// functions of dspark/tree.h and dspark/sampling.h, so the CPU tests exercise them.
//
// One block per request (kThreads threads) walks the request's tree from the root, every
// thread holding the same scalar state (each decision comes from a block reduction, so
// control flow is uniform):
//   * greedy rows: block argmax of the current node's target row (lowest index on ties),
//     then the first child with that id;
//   * sampling rows: the (threshold, lse) of the current node's target row (top-k /
//     top-p thresholds by a 4-bit radix search over the order-preserving key of fp32,
//     no sort; top-p masses and lse from the int64 fixed-point row mass, sampling.h
//     lse_from_mass), then the children in increasing local index with the accept coin
//     at offset + depth, index = rank. After a rejection the residual
//     w = log max(p' - q_c, 0) is written to the request's fp32 workspace row (three
//     sweeps: max, int64 fixed-point mass, store), and p'(v) = w(v) - lse(w) from then on.
//     The emitted token is one Gumbel race (resample stream) over the last residual,
//     or over p'.
// Every sum over the vocabulary is an int64 fixed-point mass (docs/verification.md,
// "Order-independent sums"), so its bits do not depend on the reduction order.
// A kernel never trusts the data: cu is clamped into [0, N], the walk never goes deeper
// than max_depth, and nothing is read or written out of bounds.
// No torch header.
#pragma once

#include "philox.h"
#include "launch.h"  // block sizes and launch plans
#include "sampling.h"
#include "tree.h"

namespace dspark {
namespace vt {


enum DraftKind : int32_t { kPointMass = 0, kDraftLogits = 1, kDraftProbs = 2 };

// Element types read as fp32 without the CUDA half headers (exact conversions).
struct F32 {
  typedef float storage;
};
struct F16 {
  typedef unsigned short storage;
};
struct BF16 {
  typedef unsigned short storage;
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
struct DevRow {
  const typename Tag::storage* data;
  int64_t stride;
  __device__ __forceinline__ float operator[](int64_t v) const { return to_float(Tag(), data[v * stride]); }
};

// An int32 or int64 array (per-request tensors are passed as given).
struct IntArray {
  const void* ptr;
  int32_t is_int64;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is_int64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<const int32_t*>(ptr)[i];
  }
};

struct Params {
  const void* target;
  int64_t target_stride0, target_stride1;
  const void* draft;
  int64_t draft_stride0, draft_stride1;
  int32_t draft_kind;
  IntArray draft_tokens, parents, cu, top_k, seed, offset;
  const float* temperature;  // null: every row greedy
  const float* top_p;
  const float* min_p;    // [B] or null (sampling.h min_p_log: <= 0 is off)
  IntArray draft_index;  // [N] or {null}: q of node j is row draft_index[j] of draft
  int64_t draft_rows;    // rows of draft (N without draft_index); indices are clamped into it
  int64_t B, N, V, max_depth;
  float* workspace;  // [B, V] fp32 (sampling only)
  int32_t* accept_path;
  int32_t* num_accepted;
  int32_t* output_tokens;
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// ---------------------------------------------------------------------------- block reductions

struct Smem {
  float f[kThreads];
  ArgMax a[kThreads];
  int64_t i[kThreads];
};

struct MaxF {
  __device__ float operator()(float a, float b) const { return b > a ? b : a; }
};
struct SumI {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};
struct MergeA {
  __device__ ArgMax operator()(ArgMax a, ArgMax b) const { return argmax_merge(a, b); }
};

template <class T, class Op>
__device__ T block_reduce(T v, T* buf, Op op) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] = op(buf[threadIdx.x], buf[threadIdx.x + s]);
    __syncthreads();
  }
  const T r = buf[0];
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------- filters

// Order-preserving key of fp32 (-0.0 as +0.0; NaN never counts: key -1).
__device__ __forceinline__ int64_t float_key(float s) {
  if (s != s) return -1;
  const int32_t bits = __float_as_int(s == 0.f ? 0.f : s);
  return static_cast<int64_t>(bits >= 0 ? bits : bits ^ 0x7fffffff) + 2147483648LL;
}
__device__ __forceinline__ float key_float(int64_t key) {
  const int32_t k = static_cast<int32_t>(key - 2147483648LL);
  return __int_as_float(k >= 0 ? k : k ^ 0x7fffffff);
}

constexpr int kRadixBits = 4;
constexpr int kRadix = 1 << kRadixBits;

// The k-th largest scaled logit: the largest key with count(key >= it) >= k.
template <class Tag>
__device__ float top_k_threshold(DevRow<Tag> row, int64_t V, float t, int64_t k, Smem& sm) {
  int64_t prefix = 0;
  for (int pass = 0; pass < 32 / kRadixBits; ++pass) {
    const int shift = 32 - (pass + 1) * kRadixBits;
    int64_t cnt[kRadix];
    for (int j = 0; j < kRadix; ++j) cnt[j] = 0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const int64_t key = float_key(scale_logit(row[v], t));
      for (int j = 0; j < kRadix; ++j) cnt[j] += key >= prefix + (static_cast<int64_t>(j) << shift);
    }
    int64_t best = 0;
    for (int j = 0; j < kRadix; ++j)
      if (block_reduce(cnt[j], sm.i, SumI()) >= k) best = j;
    prefix += best << shift;
  }
  return key_float(prefix);
}

// Top-p over the tokens kept by thr: the largest key with mass(key >= it) >= p * total
// (compared in double), masses the int64 E_v = fixed_mass(expf(s - m)) with m the row's
// max, which the kept set holds (finite here: a +inf row keeps its +inf entries by the
// +inf rule); thr unchanged when nothing is kept.
template <class Tag>
__device__ float top_p_threshold(DevRow<Tag> row, int64_t V, float t, float thr, float m, float p, Smem& sm) {
  const float scale = mass_scale(mass_fraction_bits(V));
  int64_t prefix = 0;
  int64_t total = 0;
  double target = 0.0;
  for (int pass = 0; pass < 32 / kRadixBits; ++pass) {
    const int shift = 32 - (pass + 1) * kRadixBits;
    int64_t mass[kRadix];
    for (int j = 0; j < kRadix; ++j) mass[j] = 0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const float s = scale_logit(row[v], t);
      if (!(s >= thr && s > DSPARK_NEG_INF)) continue;
      const int64_t e = fixed_mass(expf(s - m), scale);
      const int64_t key = float_key(s);
      for (int j = 0; j < kRadix; ++j)
        if (key >= prefix + (static_cast<int64_t>(j) << shift)) mass[j] += e;
    }
    int64_t best = 0;
    for (int j = 0; j < kRadix; ++j) {
      const int64_t mj = block_reduce(mass[j], sm.i, SumI());
      if (pass == 0 && j == 0) {
        total = mj;
        target = static_cast<double>(p) * static_cast<double>(total);
      }
      if (static_cast<double>(mj) >= target) best = j;
    }
    prefix += best << shift;
  }
  return total > 0 ? key_float(prefix) : thr;
}

struct RowStat {
  float thr, lse;
};

// (threshold, lse) of a filtered, temperature-scaled row: log p(v) = s_v - lse for s_v >= thr.
template <class Tag>
__device__ RowStat row_stats(DevRow<Tag> row, int64_t V, float t, int64_t k, float p, float log_min_p, Smem& sm) {
  float m = DSPARK_NEG_INF;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) m = MaxF()(m, scale_logit(row[v], t));
  m = block_reduce(m, sm.f, MaxF());
  const bool finite = m > DSPARK_NEG_INF;
  const float safe_m = finite ? m : 0.f;
  RowStat st;
  st.thr = min_p_threshold(m, log_min_p);  // min-p first (vLLM's order), -inf when off
  if (top_k_active(k, V)) {
    const float tk = top_k_threshold(row, V, t, k, sm);
    st.thr = st.thr < tk ? tk : st.thr;  // std::max, as the CPU
  }
  // A row whose max is +inf (or l / T overflowing): its +inf entries share the mass
  // (sampling.h row_filter_final), so count them instead of summing exponentials; the
  // +inf rule also sets the threshold, so top-p is not needed there.
  const bool inf_row = m == DSPARK_POS_INF;
  if (top_p_active(p) && finite && !inf_row) st.thr = top_p_threshold(row, V, t, st.thr, m, p, sm);
  const int bits = mass_fraction_bits(V);
  const float scale = mass_scale(bits);
  int64_t mass = 0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float s = scale_logit(row[v], t);
    if (inf_row) {
      if (s == DSPARK_POS_INF) ++mass;
    } else if (s >= st.thr && s > DSPARK_NEG_INF) {
      mass += fixed_mass(expf(s - safe_m), scale);  // m: the largest kept s
    }
  }
  mass = block_reduce(mass, sm.i, SumI());
  if (inf_row) {
    row_filter_final(m, static_cast<float>(mass), st.thr, st.lse);
    return st;
  }
  st.lse = finite ? lse_from_mass(safe_m, mass, bits) : DSPARK_NEG_INF;
  return st;
}

// ---------------------------------------------------------------------------- the walk

template <class TT, class DT>
__global__ void __launch_bounds__(kThreads, 1) tree_kernel(Params p) {
  __shared__ Smem sm;
  const int64_t b = blockIdx.x;
  const int64_t V = p.V;
  const int64_t W = p.max_depth + 1;
  const int64_t c0 = clamp64(p.cu[b], 0, p.N);
  const int64_t c1 = clamp64(p.cu[b + 1], c0, p.N);
  const int64_t start = c0, n = c1 - c0;
  const float T = p.temperature ? p.temperature[b] : 0.f;
  const int64_t k = p.top_k.ptr ? p.top_k[b] : 0;
  const float tp = p.top_p ? p.top_p[b] : 1.f;
  const float lmp = p.min_p ? min_p_log(p.min_p[b]) : DSPARK_NEG_INF;
  const uint64_t seed = static_cast<uint64_t>(p.seed[b]);
  const uint64_t offset = static_cast<uint64_t>(p.offset[b]);
  const bool greedy = !(T > 0.f);
  const int residual_bits = mass_fraction_bits(V);
  const float residual_scale = mass_scale(residual_bits);
  const typename TT::storage* tbase = static_cast<const typename TT::storage*>(p.target);
  const typename DT::storage* dbase = static_cast<const typename DT::storage*>(p.draft);
  float* ws = p.workspace ? p.workspace + b * V : nullptr;
  int32_t* path_row = p.accept_path + b * W;
  int32_t* out_row = p.output_tokens + b * W;
  for (int64_t j = threadIdx.x; j < W; j += kThreads) path_row[j] = out_row[j] = -1;
  __syncthreads();
  if (threadIdx.x == 0) path_row[0] = tree_window_index(-1);

  int64_t node = -1, d = 0, accepted = 0, emitted = -1;
  while (emitted < 0) {
    const DevRow<TT> trow{tbase + tree_target_row(start, b, node) * p.target_stride0, p.target_stride1};
    const bool may_descend = tree_may_descend(d, p.max_depth);
    int64_t next = -1;
    if (greedy) {
      ArgMax a = argmax_init();
      for (int64_t v = threadIdx.x; v < V; v += kThreads) argmax_update(a, trow[v], v);
      a = block_reduce(a, sm.a, MergeA());
      const int64_t am = a.index < 0 ? 0 : a.index;
      for (int64_t c = 0; c < n && may_descend && next < 0; ++c)
        if (p.parents[start + c] == node && p.draft_tokens[start + c] == am) next = c;
      if (next < 0) emitted = am;
    } else {
      const RowStat ps = row_stats(trow, V, T, k, tp, lmp, sm);
      const uint64_t position = tree_position(offset, d);
      bool taken = false;
      float lse_last = 0.f;
      auto log_p = [&](int64_t v) -> float {
        return taken ? tree_normalised(ws[v], lse_last) : filtered_log_prob(scale_logit(trow[v], T), ps.thr, ps.lse);
      };
      int64_t rank = 0;
      for (int64_t c = 0; c < n && may_descend && next < 0; ++c) {
        if (p.parents[start + c] != node) continue;
        const int64_t r = rank++;
        const int64_t x = p.draft_tokens[start + c];
        if (!tree_child_valid(x, V)) continue;
        // q of node c: its own row, or row draft_index[c] (clamped: never out of bounds).
        const int64_t qrow = p.draft_index.ptr ? clamp64(p.draft_index[start + c], 0, p.draft_rows - 1) : start + c;
        const DevRow<DT> drow{dbase ? dbase + qrow * p.draft_stride0 : nullptr, p.draft_stride1};
        RowStat qs;
        qs.thr = DSPARK_NEG_INF;
        qs.lse = 0.f;
        if (p.draft_kind == kDraftLogits) qs = row_stats(drow, V, T, k, tp, lmp, sm);
        auto log_q = [&](int64_t v) -> float {
          if (p.draft_kind == kDraftLogits) return filtered_log_prob(scale_logit(drow[v], T), qs.thr, qs.lse);
          if (p.draft_kind == kDraftProbs) return logf(drow[v]);
          return v == x ? 0.f : DSPARK_NEG_INF;
        };
        const float log_u = logf(uniform_from_word(random_word(seed, position, kSaltAccept, static_cast<uint32_t>(r))));
        if (!draft_prob_ok(log_q(x))) continue;  // not drawn from q: skipped like padding, p' unchanged
        if (accept_token(log_u, log_p(x), log_q(x))) {
          next = c;
          break;
        }
        // Rejected: w = log max(p' - q_c, 0); p' <- w - lse(w) unless w has no mass.
        float m = DSPARK_NEG_INF;
        for (int64_t v = threadIdx.x; v < V; v += kThreads) m = MaxF()(m, residual_log_weight(log_p(v), log_q(v)));
        m = block_reduce(m, sm.f, MaxF());
        if (!(m > DSPARK_NEG_INF)) continue;  // p' == q_c numerically: keep p'
        // lse(w) from the int64 fixed-point mass of expf(w - m) (docs/verification.md,
        // "Order-independent sums"), as a filtered row's lse.
        int64_t mass = 0;
        for (int64_t v = threadIdx.x; v < V; v += kThreads) {
          const float w = residual_log_weight(log_p(v), log_q(v));
          if (w > DSPARK_NEG_INF) mass += fixed_mass(expf(w - m), residual_scale);
        }
        mass = block_reduce(mass, sm.i, SumI());
        // Each thread rewrites only the entries it reads (v = threadIdx.x + i * kThreads).
        for (int64_t v = threadIdx.x; v < V; v += kThreads) ws[v] = residual_log_weight(log_p(v), log_q(v));
        __syncthreads();
        taken = true;
        lse_last = lse_from_mass(m, mass, residual_bits);
      }
      if (next < 0) {
        // Gumbel race over the last residual w (unnormalised), or p'; groups of four share a Philox call.
        ArgMax a = argmax_init();
        for (int64_t base = 4 * static_cast<int64_t>(threadIdx.x); base < V; base += 4 * kThreads) {
          const PhiloxWords words = random_words4(seed, position, kSaltResample, static_cast<uint32_t>(base));
          for (int64_t v = base; v < base + 4 && v < V; ++v) {
            const float w = taken ? ws[v] : log_p(v);
            if (w > DSPARK_NEG_INF) argmax_update(a, w + gumbel_from_word(words.w[v & 3]), v);
          }
        }
        a = block_reduce(a, sm.a, MergeA());
        emitted = a.index < 0 ? 0 : a.index;
      }
    }
    if (next >= 0) {
      if (threadIdx.x == 0) {
        out_row[accepted] = static_cast<int32_t>(p.draft_tokens[start + next]);
        path_row[accepted + 1] = tree_window_index(next);
      }
      ++accepted;
      node = next;
      d = tree_child_depth(d);
    }
  }
  if (threadIdx.x == 0) {
    out_row[accepted] = static_cast<int32_t>(emitted);
    p.num_accepted[b] = static_cast<int32_t>(accepted);
  }
}

}  // namespace vt
}  // namespace dspark
