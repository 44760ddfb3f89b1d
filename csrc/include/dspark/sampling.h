// The acceptance rule and the categorical race, shared by the CPU and CUDA
// kernels (__host__ __device__) so that the CPU tests exercise the exact
// decision logic the GPU runs. The PyTorch reference
// (dspark_kernels/reference/verify_block.py) states the same rules in tensor
// form; the Triton kernels restate them in Triton's language.
//
// Everything is in log space over temperature-scaled logits s = logit / T:
//   log p(v) = s_v - lse_p   (or -inf when a top-k / top-p filter drops v)
//   accept x  iff  log u < log p(x) - log q(x)       (strict, p(x) > 0 required)
//   residual  r(v) = max(p(v) - q(v), 0), sampled as
//             argmax_v [ log p(v) + log1p(-exp(log q(v) - log p(v))) + G_v ]
//   with G_v = -log(-log u_v) Gumbel noise from the resample stream.
// No torch header: also compiles under NVRTC.
#pragma once

#include "philox.h"

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace dspark {

// Under nvcc the __host__ __device__ functions are also compiled for the host, where
// the __int_as_float intrinsic does not exist; INFINITY (__builtin_inff) works on both
// sides. NVRTC compiles device code only and has no <math.h>.
#if defined(__CUDACC_RTC__)
#define DSPARK_NEG_INF (-__int_as_float(0x7f800000))
#else
#define DSPARK_NEG_INF (-INFINITY)
#endif
#define DSPARK_POS_INF (-DSPARK_NEG_INF)

DSPARK_HD float gumbel_from_word(uint32_t word) {
  return -logf(-logf(uniform_from_word(word)));
}

// The largest Gumbel value any word can give (the largest uniform, 1 - 2^-24).
// A race entry whose log-weight plus this cannot reach the running best cannot
// win, so its noise need not be drawn: exact pruning that skips most of a
// vocabulary once a likely token has been seen. (fp addition is monotone, so
// w + g <= w + gumbel_upper_bound() for every word.)
DSPARK_HD float gumbel_upper_bound() { return gumbel_from_word(0xffffffffu); }

// Scaled logit: division (not multiplication by 1/T) so every backend rounds alike.
// Non-finite input (docs/verification.md, "Non-finite input"): a NaN logit is -inf;
// an infinite logit stays infinite (also at T = +inf, where inf / inf would be NaN);
// a finite l / T may overflow to +-inf and is then treated as such.
DSPARK_HD float scale_logit(float logit, float temperature) {
  if (logit != logit) return DSPARK_NEG_INF;
  if (logit == DSPARK_POS_INF || logit == DSPARK_NEG_INF) return logit;
  return logit / temperature;
}

// q(x) of the draft token is usable iff it is a finite positive number: log q is
// neither -inf (q = 0), +inf nor NaN (a negative or NaN draft_probs entry).
DSPARK_HD bool draft_prob_ok(float log_q) { return log_q > DSPARK_NEG_INF && log_q < DSPARK_POS_INF; }

// The strict log-space accept test. A token of probability zero is never accepted,
// and neither is one whose q(x) is not a finite positive number (the row is then
// sampled from p, as for padding).
DSPARK_HD bool accept_token(float log_u, float log_p, float log_q) {
  if (!(log_p > DSPARK_NEG_INF)) return false;
  if (!draft_prob_ok(log_q)) return false;
  return log_u < log_p - log_q;
}

// log p(v) of a filtered row from its scaled logit s: s - lse where s >= threshold
// (the top-k / top-p cut, -inf when no filter), -inf elsewhere. A row whose max is
// +inf has threshold = +inf and lse = log(number of +inf entries) (row_filter_final):
// its +inf entries share the mass, log p = -lse, every other entry has p = 0.
DSPARK_HD float filtered_log_prob(float s, float threshold, float lse) {
  if (!(s >= threshold)) return DSPARK_NEG_INF;
  return threshold == DSPARK_POS_INF ? -lse : s - lse;
}

// log max(p - q, 0) from log p and log q; -inf where q >= p.
DSPARK_HD float residual_log_weight(float log_p, float log_q) {
  if (!(log_q > DSPARK_NEG_INF)) return log_p;
  if (!(log_p > log_q)) return DSPARK_NEG_INF;
  return log_p + log1pf(-expf(log_q - log_p));
}

// Running argmax with the lowest index winning ties; -inf scores never win, so a
// race over an all -inf row leaves index -1 (the caller then falls back to p).
struct ArgMax {
  float value;
  int64_t index;
};

DSPARK_HD ArgMax argmax_init() {
  ArgMax a;
  a.value = DSPARK_NEG_INF;
  a.index = -1;
  return a;
}

// Callers visit indices in increasing order, so a strict > keeps the lowest.
DSPARK_HD void argmax_update(ArgMax& a, float value, int64_t index) {
  if (value > a.value) {
    a.value = value;
    a.index = index;
  }
}

DSPARK_HD ArgMax argmax_merge(ArgMax a, ArgMax b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

// Order-independent row mass (docs/verification.md, "Order-independent sums"): with m
// the largest kept scaled logit, kept entry v weighs E_v = trunc(expf(s_v - m) * 2^K)
// as an int64, K = mass_fraction_bits(V) = 62 - bit_length(V - 1), so V terms <= 1 sum
// below 2^62. Integer addition is associative: the row's mass Z = sum E_v has the same
// bits in any order (threads, blocks, CPU lanes, or vocabulary shards on several
// devices), and lse = m + float(log(double(Z) * 2^-K)) follows from (m, Z) alone.
DSPARK_HD int mass_fraction_bits(int64_t vocab) {
  uint64_t x = vocab > 2 ? static_cast<uint64_t>(vocab - 1) : 1u;
  int len = 0;
  while (x) {
    ++len;
    x >>= 1;
  }
  return 62 - len;
}

// 2^bits as a float (exact: a power of two); fixed_mass's scale.
DSPARK_HD float mass_scale(int bits) { return static_cast<float>(1ull << bits); }

// trunc(e * 2^bits) for e = expf(s - m) in [0, 1]; the product is exact in fp32.
DSPARK_HD int64_t fixed_mass(float e, float scale) { return static_cast<int64_t>(e * scale); }

// log-sum-exp of a row from its largest kept scaled logit m and fixed-point mass.
DSPARK_HD float lse_from_mass(float m, int64_t total, int bits) {
  const double unit = 1.0 / static_cast<double>(1ull << bits);
  return m + static_cast<float>(log(static_cast<double>(total) * unit));
}

// Online softmax statistics of one row of scaled logits: running max m and
// sum of exp(s - m), combined exactly as FlashAttention does.
struct SoftmaxStats {
  float max;
  float sum;
};

DSPARK_HD SoftmaxStats softmax_stats_init() {
  SoftmaxStats s;
  s.max = DSPARK_NEG_INF;
  s.sum = 0.f;
  return s;
}

// s == max adds exp(0) = 1 exactly, so +inf entries are counted (sum = number of +inf
// entries once max = +inf) instead of adding exp(inf - inf) = NaN.
DSPARK_HD void softmax_stats_update(SoftmaxStats& st, float s) {
  if (!(s > DSPARK_NEG_INF)) return;
  if (s > st.max) {
    st.sum = st.sum * expf(st.max - s) + 1.f;
    st.max = s;
  } else {
    st.sum += s == st.max ? 1.f : expf(s - st.max);
  }
}

DSPARK_HD SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b) {
  if (!(b.max > DSPARK_NEG_INF)) return a;
  if (!(a.max > DSPARK_NEG_INF)) return b;
  SoftmaxStats r;
  if (a.max >= b.max) {
    r.max = a.max;
    r.sum = a.sum + (b.max == a.max ? b.sum : b.sum * expf(b.max - a.max));
  } else {
    r.max = b.max;
    r.sum = b.sum + a.sum * expf(a.max - b.max);
  }
  return r;
}

// log-sum-exp of the row; -inf for a row with no finite entry.
DSPARK_HD float softmax_stats_lse(SoftmaxStats st) {
  if (!(st.max > DSPARK_NEG_INF)) return DSPARK_NEG_INF;
  return st.max + logf(st.sum);
}

// The +inf rule for a row's (threshold, lse) given its max s: a row whose max is +inf
// keeps only its +inf entries (threshold = +inf), which share the mass equally:
// lse = log(n_inf), read by filtered_log_prob as log p = -lse. Other rows unchanged.
DSPARK_HD void row_filter_final(float max, float n_inf, float& threshold, float& lse) {
  if (max == DSPARK_POS_INF) {
    threshold = DSPARK_POS_INF;
    lse = logf(n_inf);
  }
}

// Filters: top-k keeps every token whose scaled logit is >= the k-th largest
// (ties at the threshold are all kept); top-p then keeps every token v whose
// strictly-greater mass  sum_{w kept, s_w > s_v} p(w)  is below top_p. Both are
// thresholds on s, so a filtered row is "s >= threshold" and every backend only
// needs the threshold. Disabled values: top_k <= 0 or >= V, top_p <= 0 or >= 1.
DSPARK_HD bool top_k_active(int64_t top_k, int64_t vocab) { return top_k > 0 && top_k < vocab; }
DSPARK_HD bool top_p_active(float top_p) { return top_p > 0.f && top_p < 1.f; }

// min-p (vLLM's MinPLogitsProcessor), applied after temperature and before top-k:
// keep v iff p(v) >= min_p * max p, i.e. s_v >= max s + log(min_p). Off when
// min_p <= 0 (or NaN); min_p >= 1 keeps only the maximal entries. log(min_p) is taken
// in fp64 and rounded to fp32 (min_p_log) so every backend's log agrees bit for bit;
// the threshold is one fp32 addition. With top-k, the kept set is s >= max of the
// two thresholds (both keep a top segment of the sorted row); top-p then works on it.
DSPARK_HD bool min_p_active(float min_p) { return min_p > 0.f; }

DSPARK_HD float min_p_log(float min_p) {
  if (!min_p_active(min_p)) return DSPARK_NEG_INF;
  return static_cast<float>(log(static_cast<double>(min_p < 1.f ? min_p : 1.f)));
}

// The min-p cut on s from the row's max scaled logit and min_p_log(min_p): -inf when
// off (also for a row of -inf, and never inf + -inf = NaN); +inf for a +inf row (only
// its +inf entries are kept, as the +inf rule does anyway).
DSPARK_HD float min_p_threshold(float max_s, float log_min_p) {
  if (!(log_min_p > DSPARK_NEG_INF) || !(max_s > DSPARK_NEG_INF)) return DSPARK_NEG_INF;
  return max_s + log_min_p;
}

}  // namespace dspark
