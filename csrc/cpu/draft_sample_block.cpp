// draft_sample_block on the CPU (docs/drafting.md).
//
// Without the Markov head: at::parallel_for over the B * gamma rows; each row is
// copied to the fp32 output (when asked for) and sampled.
// With it, one step per position k, two parallel phases per step:
//   1. over vocabulary strips (cpu/markov_head.h): l[b, v] = base[b, k, v] + sum_i
//      w1[x_prev(b), i] * w2[i, v] for every request b, w2 read once per step. The sum
//      runs over i in order in fp32, then the base logit is added: the reference's
//      order, so the logits equal the reference's bit for bit (no FMA).
//   2. over requests: sample row b of l, which becomes x_prev for step k + 1.
// Sampling (sampling.h / cpu/row_ops.h): greedy rows take the argmax; sampling rows
// race s_v + G_v over the top-k / top-p set, s = l / T, G from the draft stream at
// position offset + k (pruned race: groups of four that cannot win draw no noise).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/markov_head.h"
#include "cpu/row_ops.h"
#include "drafting.h"
#include "dspark/philox.h"
#include "dspark/sampling.h"

namespace dspark {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowParams {
  float temperature;
  int64_t top_k;
  float top_p;
  float log_min_p;  // min_p_log(min_p), -inf when off
  uint64_t seed;
  uint64_t position;
};

// The +inf rule: a +inf weight always wins the race over s + G (inf + G = inf, the
// first one on ties), so `token` has weight +inf iff the row has +inf entries; they
// share the mass, so race again over them with weight 0 (score G), the others out.
template <typename F>
int64_t inf_race(int64_t V, const RowParams& rp, int64_t token, F weight) {
  if (token < 0 || !(weight(token) == -kNegInf)) return token;
  auto w_inf = [&](int64_t v) { return weight(v) == -kNegInf ? 0.f : kNegInf; };
  return gumbel_race_salted(V, rp.seed, rp.position, kSaltDraft, w_inf, w_inf);
}

// One draw from row (greedy argmax, or the race over s + G restricted to the filter).
template <typename T>
int64_t sample_row(Row<T> row, int64_t V, const RowParams& rp, std::vector<float>& scratch) {
  if (!(rp.temperature > 0.f)) return row_argmax(row, V);
  const float T_ = rp.temperature;
  int64_t token;
  if (top_k_active(rp.top_k, V) || top_p_active(rp.top_p) || rp.log_min_p > kNegInf) {
    scratch.resize(V);
    for (int64_t v = 0; v < V; ++v) scratch[v] = scale_logit(row[v], T_);
    const float thr = filter_threshold(scratch, rp.top_k, rp.top_p, rp.log_min_p);
    auto weight = [&](int64_t v) { return scratch[v] >= thr ? scratch[v] : kNegInf; };
    token = gumbel_race_salted(V, rp.seed, rp.position, kSaltDraft, weight, weight);
    token = inf_race(V, rp, token, weight);
  } else {
    auto weight = [&](int64_t v) { return scale_logit(row[v], T_); };  // NaN is -inf: never races
    token = gumbel_race_salted(V, rp.seed, rp.position, kSaltDraft, weight, weight);
    token = inf_race(V, rp, token, weight);
  }
  return token < 0 ? 0 : token;
}

struct Common {
  int64_t B, G, V;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* min_p;
  const int64_t* seed;
  const int64_t* offset;
  int32_t* tokens;  // [B, G]

  RowParams params(int64_t b, int64_t k) const {
    RowParams rp;
    rp.temperature = temperature ? temperature[b] : 0.f;
    rp.top_k = top_k ? top_k[b] : 0;
    rp.top_p = top_p ? top_p[b] : 1.f;
    rp.log_min_p = log_min_p_at(min_p, b);
    rp.seed = static_cast<uint64_t>(seed[b]);
    rp.position = static_cast<uint64_t>(offset[b]) + static_cast<uint64_t>(k);
    return rp;
  }
};

// All B * G rows at once (no Markov head).
template <typename BT>
void sample_independent(const Common& c, const at::Tensor& base, float* out_logits) {
  const BT* bp = base.const_data_ptr<BT>();
  const int64_t s0 = base.stride(0), s1 = base.stride(1), s2 = base.stride(2);
  const int64_t V = c.V, G = c.G;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, c.B * G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / G, k = row % G;
      const Row<BT> in{bp + b * s0 + k * s1, s2};
      const RowParams rp = c.params(b, k);
      int64_t token;
      if (out_logits) {
        float* o = out_logits + row * V;
        for (int64_t v = 0; v < V; ++v) o[v] = in[v];
        token = sample_row(Row<float>{o, 1}, V, rp, scratch);
      } else {
        token = sample_row(in, V, rp, scratch);
      }
      c.tokens[row] = static_cast<int32_t>(token);
    }
  });
}

// Left to right with the Markov head.
template <typename BT, typename WT>
void sample_markov(const Common& c, const at::Tensor& base, const at::Tensor& w1, const at::Tensor& w2,
                   const int64_t* anchor, float* out_logits) {
  const BT* bp = base.const_data_ptr<BT>();
  const int64_t bs0 = base.stride(0), bs1 = base.stride(1), bs2 = base.stride(2);
  const WT* w1p = w1.const_data_ptr<WT>();
  const WT* w2p = w2.const_data_ptr<WT>();
  const int64_t w1s0 = w1.stride(0), w1s1 = w1.stride(1), w2s0 = w2.stride(0), w2s1 = w2.stride(1);
  const int64_t B = c.B, G = c.G, V = c.V, rank = w1.size(1);

  // The step's logits: row b of step k at buf + b * buf_stride (the output when it is
  // returned, else a [B, V] workspace reused by every step).
  std::vector<float> work;
  float* buf_base;
  int64_t buf_stride, buf_step;
  if (out_logits) {
    buf_base = out_logits;
    buf_stride = G * V;
    buf_step = V;
  } else {
    work.resize(static_cast<size_t>(B * V));
    buf_base = work.data();
    buf_stride = V;
    buf_step = 0;
  }
  std::vector<int64_t> prev(anchor, anchor + B);
  std::vector<float> h(static_cast<size_t>(B * rank));

  for (int64_t k = 0; k < G; ++k) {
    float* buf = buf_base + k * buf_step;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < rank; ++i) h[b * rank + i] = static_cast<float>(w1p[prev[b] * w1s0 + i * w1s1]);

    // Phase 1: the corrected logits of every request (markov_head.h: w2 read once per step).
    markov_head::logits(B, V, rank, h.data(), w2p, w2s0, w2s1, bp + k * bs1, bs0, bs2, buf, buf_stride);

    // Phase 2: sample every request's row.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
    at::parallel_for(0, B, grain, [&](int64_t b_begin, int64_t b_end) {
      std::vector<float> scratch;
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t token = sample_row(Row<float>{buf + b * buf_stride, 1}, V, c.params(b, k), scratch);
        c.tokens[b * G + k] = static_cast<int32_t>(token);
        prev[b] = token;
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> draft_sample_block_cpu(
    const at::Tensor& base_logits, const at::Tensor& anchor, const std::optional<at::Tensor>& markov_w1,
    const std::optional<at::Tensor>& markov_w2, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& offset, bool return_logits, const std::optional<at::Tensor>& min_p) {
  check_draft_sample_block_args(base_logits, anchor, markov_w1, markov_w2, temperature, top_k, top_p, seed,
                                offset);
  check_min_p_arg("draft_sample_block", base_logits, base_logits.size(0), min_p);
  const at::Tensor min_p_c = min_p_contiguous(min_p);
  constexpr const char* op = "draft_sample_block";
  const int64_t B = base_logits.size(0), G = base_logits.size(1), V = base_logits.size(2);
  const bool markov = markov_w1.has_value();

  const at::Tensor anchor_c = anchor.to(at::kLong).contiguous();
  const SamplingTensors sp(temperature, top_k, top_p, seed, offset);
  const int64_t* anchor_p = anchor_c.const_data_ptr<int64_t>();
  if (markov) {  // data-dependent check: always on the CPU (docs/drafting.md)
    for (int64_t b = 0; b < B; ++b)
      DSPARK_CHECK(anchor_p[b] >= 0 && anchor_p[b] < V, op, "anchor[", b, "] = ", anchor_p[b],
                   " is outside [0, V) with V = ", V);
  }

  at::Tensor tokens = at::empty({B, G}, base_logits.options().dtype(at::kInt));
  at::Tensor logits = return_logits ? at::empty({B, G, V}, base_logits.options().dtype(at::kFloat))
                                    : at::empty({0}, base_logits.options().dtype(at::kFloat));
  if (B == 0 || G == 0) return {tokens, logits};

  Common c;
  c.B = B;
  c.G = G;
  c.V = V;
  c.temperature = sp.temperature_ptr();
  c.top_k = sp.top_k_ptr();
  c.top_p = sp.top_p_ptr();
  c.min_p = min_p_ptr(min_p_c);
  c.seed = sp.seed.const_data_ptr<int64_t>();
  c.offset = sp.offset.const_data_ptr<int64_t>();
  c.tokens = tokens.mutable_data_ptr<int32_t>();
  float* out = return_logits ? logits.mutable_data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base_logits.scalar_type(), "draft_sample_block_base", [&] {
    using BT = scalar_t;
    if (!markov) {
      sample_independent<BT>(c, base_logits, out);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, markov_w1->scalar_type(), "draft_sample_block_w", [&] {
      sample_markov<BT, scalar_t>(c, base_logits, *markov_w1, *markov_w2, anchor_p, out);
    });
  });
  return {tokens, logits};
}

}  // namespace dspark
