// Row helpers shared by the CPU kernels (verify_block, verify_tree, token_logprobs,
// draft_sample_block): strided fp32 reads of a logits row, the top-k / top-p threshold,
// the fixed-point row mass, the vectorised row max / argmax and the pruned Gumbel race.
// The rules themselves are the __host__ __device__ functions of dspark/sampling.h; this
// header only adds host-side loops over a row.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "dspark/philox.h"
#include "dspark/sampling.h"

namespace dspark {

// One strided row of logits or probabilities, read as fp32.
template <typename T>
struct Row {
  const T* data;
  int64_t stride;
  float operator[](int64_t v) const { return static_cast<float>(data[v * stride]); }
};

// One term of the fixed-point row mass (sampling.h, mass_fraction_bits) for x = s - m,
// m the row's largest kept value: fixed_mass(expf(x)). Below -(bits + 1) log 2 the term
// is exactly 0 (expf(x) is about 2^-(bits+1), half a unit), so the exp is skipped: most
// of a wide vocabulary, and every dropped (-inf) entry of a filtered row.
struct FixedMassTerm {
  float scale, cut;
  explicit FixedMassTerm(int bits)
      : scale(mass_scale(bits)), cut(-static_cast<float>(bits + 1) * 0.6931472f) {}
  int64_t operator()(float x) const { return x >= cut ? fixed_mass(std::exp(x), scale) : 0; }
};

// Threshold of min-p, top-k then top-p on scaled logits (sampling.h states the rules;
// log_min_p = min_p_log(min_p), -inf when min-p is off).
inline float filter_threshold(std::vector<float>& s, int64_t top_k, float top_p, float log_min_p) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t V = static_cast<int64_t>(s.size());
  float threshold = kNegInf;
  if (log_min_p > kNegInf) {
    float m = kNegInf;
    for (float x : s) m = x > m ? x : m;
    threshold = min_p_threshold(m, log_min_p);
  }
  if (top_k_active(top_k, V)) {
    std::vector<float> tmp(s);
    std::nth_element(tmp.begin(), tmp.begin() + (top_k - 1), tmp.end(), std::greater<float>());
    threshold = std::max(threshold, tmp[top_k - 1]);
  }
  if (top_p_active(top_p)) {
    std::vector<float> kept;
    kept.reserve(s.size());
    for (float x : s)
      if (x >= threshold && x > kNegInf) kept.push_back(x);
    if (!kept.empty()) {
      std::sort(kept.begin(), kept.end(), std::greater<float>());
      const float m = kept[0];
      if (m == -kNegInf) return -kNegInf;  // +inf entries hold all the mass: keep just them
      // Fixed-point masses (sampling.h, mass_fraction_bits): the cumulative sums are
      // exact integers, so ties at the cut and the order of equal values cannot matter.
      const FixedMassTerm term(mass_fraction_bits(V));
      std::vector<int64_t> mass(kept.size());
      int64_t total = 0;
      for (size_t i = 0; i < kept.size(); ++i) {
        mass[i] = term(kept[i] - m);
        total += mass[i];
      }
      const double target = static_cast<double>(top_p) * static_cast<double>(total);
      int64_t cum = 0;
      for (size_t i = 0; i < kept.size(); ++i) {
        cum += mass[i];
        if (static_cast<double>(cum) >= target) {
          threshold = std::max(threshold, kept[i]);
          break;
        }
      }
    }
  }
  return threshold;
}

// Largest raw value of a row, -inf if none is larger (NaN never wins). Unit-stride
// rows run over 16 independent lanes, which the compiler turns into vector max
// instructions (`a > b ? a : b` is exactly maxps); other strides go element-wise.
template <typename T>
float row_max(Row<T> row, int64_t V) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float best = kNegInf;
  int64_t v = 0;
  if (row.stride == 1) {
    constexpr int kLanes = 16;
    float lane[kLanes];
    for (int j = 0; j < kLanes; ++j) lane[j] = kNegInf;
    for (; v + kLanes <= V; v += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float x = static_cast<float>(row.data[v + j]);
        lane[j] = x > lane[j] ? x : lane[j];
      }
    for (int j = 0; j < kLanes; ++j) best = lane[j] > best ? lane[j] : best;
  }
  for (; v < V; ++v) best = row[v] > best ? row[v] : best;
  return best;
}

// Greedy argmax (lowest index on ties; 0 for a row with no value above -inf).
// Unit-stride rows keep a (max, first index) pair per lane in one pass, which the
// compiler vectorises with compares and blends; lanes are merged lowest index first.
template <typename T>
int64_t row_argmax(Row<T> row, int64_t V) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float best = kNegInf;
  int64_t best_index = -1;
  int64_t v = 0;
  if (row.stride == 1) {
    constexpr int kLanes = 16;
    float lane[kLanes];
    int32_t lane_index[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      lane[j] = kNegInf;
      lane_index[j] = -1;
    }
    // int32 lane indices keep the vectors narrow; rows longer than 2^31 take the
    // element-wise loop below.
    const int64_t vec_end = V < (int64_t{1} << 31) - kLanes ? V - V % kLanes : 0;
    for (; v < vec_end; v += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float x = static_cast<float>(row.data[v + j]);
        const bool greater = x > lane[j];
        lane[j] = greater ? x : lane[j];
        lane_index[j] = greater ? static_cast<int32_t>(v + j) : lane_index[j];
      }
    for (int j = 0; j < kLanes; ++j)
      if (lane_index[j] >= 0 && (lane[j] > best || (lane[j] == best && lane_index[j] < best_index))) {
        best = lane[j];
        best_index = lane_index[j];
      }
  }
  for (; v < V; ++v) {
    const float x = row[v];
    if (x > best) {
      best = x;
      best_index = v;
    }
  }
  return best_index < 0 ? 0 : best_index;
}

// A cheap upper bound of gumbel_from_word(word), from integer ops only:
// G = -log(-log u) <= -log(1 - u) (as -log u >= 1 - u), and 1 - u = (m' + 1/2) 2^-23
// with m' = 2^23 - 1 - (word >> 9) is at least 2^(bitlen(m') - 24), so
// G <= (24 - bitlen(m')) log 2 (plus a margin for the rounding of logf). Most words
// give a bound near log 2 instead of gumbel_upper_bound()'s 16.6, so the race can skip
// the two logarithms of every entry that cannot win (an exact pruning).
inline float gumbel_word_bound(uint32_t word) {
  const uint32_t mc = 0x7fffffu - (word >> 9);
  const int bitlen = mc == 0 ? 0 : 32 - __builtin_clz(mc);
  return static_cast<float>(24 - bitlen) * 0.6931472f + 1e-3f;
}

// Gumbel race over the vocabulary on the stream `salt`: argmax_v weight(v) + G_v,
// lowest index on ties, -1 when no weight is finite. bound(v) >= weight(v) is a cheap
// upper bound; groups of four whose bound cannot reach the running best skip the
// Philox call (exact: w + G <= w + gumbel_upper_bound() for every word).
template <typename B, typename F>
int64_t gumbel_race_salted(int64_t V, uint64_t seed, uint64_t position, uint32_t salt, B bound, F weight) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const float gmax = gumbel_upper_bound();
  ArgMax a = argmax_init();
  for (int64_t base = 0; base < V; base += 4) {
    const int64_t end = std::min<int64_t>(base + 4, V);
    bool live = false;
    for (int64_t v = base; v < end; ++v) {
      const float b = bound(v);
      live |= b > kNegInf && b + gmax >= a.value;
    }
    if (!live) continue;
    const PhiloxWords words = random_words4(seed, position, salt, static_cast<uint32_t>(base));
    for (int64_t v = base; v < end; ++v) {
      const float w = weight(v);
      if (w > kNegInf && w + gumbel_word_bound(words.w[v & 3]) >= a.value)
        argmax_update(a, w + gumbel_from_word(words.w[v & 3]), v);
    }
  }
  return a.index;
}

// One row's softmax statistics, shared by every CPU sampler that needs p or q of a
// row (verify_block, verify_tree, token_logprobs): one copy, so the +inf rule and the
// fixed-point mass agree.
constexpr float kRowNegInf = -std::numeric_limits<float>::infinity();

// The per-request min-p argument as the kernels read it: min_p_log of min_p[b].
inline float log_min_p_at(const float* min_p, int64_t b) { return min_p ? min_p_log(min_p[b]) : kRowNegInf; }

// Fixed-point mass Z = sum_v fixed_mass(expf(value(v) - m)) of a row (docs/verification.md,
// "Order-independent sums"), m the row's largest finite kept value; value(v) = -inf for
// an entry that is not kept (a zero term). An integer sum: any order, any split of the
// row gives the same bits.
template <typename F>
int64_t fixed_row_mass(int64_t V, float m, int bits, F value) {
  const FixedMassTerm term(bits);
  int64_t total = 0;
  for (int64_t v = 0; v < V; ++v) total += term(value(v) - m);
  return total;
}

// Statistics of one temperature-scaled, filtered row: keep s >= threshold,
// log p(v) = s_v - lse for kept v.
struct RowStats {
  float threshold;
  float lse;
  float log_prob(float s) const { return filtered_log_prob(s, threshold, lse); }
};

// Both paths, as the reference: m = max kept s, then lse = lse_from_mass(m, Z) with Z
// the fixed-point mass of the kept entries and K = mass_fraction_bits(V) of the whole row.
template <typename T>
RowStats row_stats(Row<T> row, int64_t V, float temperature, int64_t top_k, float top_p, float log_min_p,
                   std::vector<float>& scratch) {
  RowStats st{kRowNegInf, kRowNegInf};
  const int bits = mass_fraction_bits(V);
  if (top_k_active(top_k, V) || top_p_active(top_p) || log_min_p > kRowNegInf) {
    scratch.resize(V);
    for (int64_t v = 0; v < V; ++v) scratch[v] = scale_logit(row[v], temperature);
    st.threshold = filter_threshold(scratch, top_k, top_p, log_min_p);
    const float threshold = st.threshold;
    auto kept = [&](int64_t v) { return scratch[v] >= threshold ? scratch[v] : kRowNegInf; };
    // Every cut is at most max s (min-p adds log min_p <= 0, top-k and top-p cut at a
    // value of the row), so the largest kept value is the row's maximum.
    const float m = row_max(Row<float>{scratch.data(), 1}, V);
    if (!(m > kRowNegInf)) return st;
    if (m == -kRowNegInf) {  // +inf entries kept: they share the mass
      float n_inf = 0.f;
      for (int64_t v = 0; v < V; ++v) n_inf += kept(v) == m ? 1.f : 0.f;
      row_filter_final(m, n_inf, st.threshold, st.lse);
      return st;
    }
    st.lse = lse_from_mass(m, fixed_row_mass(V, m, bits, kept), bits);
    return st;
  }
  // m = max s (division by T > 0 is monotone, so it is the scaled raw maximum).
  const float m = scale_logit(row_max(row, V), temperature);
  if (!(m > kRowNegInf)) return st;
  if (m == -kRowNegInf) {  // +inf entries (or l / T overflowing): they share the mass
    float n_inf = 0.f;
    for (int64_t v = 0; v < V; ++v) n_inf += scale_logit(row[v], temperature) == m ? 1.f : 0.f;
    row_filter_final(m, n_inf, st.threshold, st.lse);
    return st;
  }
  st.lse = lse_from_mass(m, fixed_row_mass(V, m, bits, [&](int64_t v) { return scale_logit(row[v], temperature); }),
                         bits);
  return st;
}

}  // namespace dspark
