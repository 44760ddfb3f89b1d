// The DSpark Markov head's logits on the CPU (draft_sample_block, docs/drafting.md):
//
//   l[b, v] = base[b, v] + sum_{i < r} h[b, i] * w2[i, v],   h[b] = w1[x_prev(b)]
//
// bit for bit as the reference computes it: for each element the sum starts at 0 and
// adds the products h[b, i] * w2[i, v] for i = 0, 1, ..., r - 1, each product and each
// sum rounded to fp32 (no fused multiply-add), then the base logit is added.
//
// The order over the rank is fixed per element, so the work vectorises across the
// vocabulary instead: the columns are cut into strips of kStrip = 64; for one strip,
// every request's 64 sums live in eight 8-wide registers while i runs over the rank,
// and the strip of w2 ([r, 64], 64 KB at r = 256) stays in cache for the whole batch.
// w2 is read from memory once per step for all B requests (the old kernel read it
// once per group of four requests). Strips are split between threads.
//
// SIMD: GCC / Clang vector extensions (8 x fp32). On x86-64 the strip kernel is built
// twice (target_clones: AVX2 and the baseline SSE2), chosen at load time by the CPU;
// AVX2 without FMA, so each lane rounds the product and the sum separately, exactly
// as the scalar reference does. Lanes are independent, so the width does not change
// any result.
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace dspark {
namespace markov_head {

constexpr int64_t kStrip = 64;  // vocabulary columns per strip: 8 vectors of 8 fp32
constexpr int kVec = 8;
constexpr int kVecs = static_cast<int>(kStrip / kVec);

#if defined(__GNUC__) || defined(__clang__)
#define DSPARK_MARKOV_SIMD 1
typedef float v8f __attribute__((vector_size(32)));
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(__APPLE__)
#define DSPARK_MARKOV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DSPARK_MARKOV_CLONES
#endif
#endif

// acc[b * kStrip + j] = sum_{i < rank} h[b * rank + i] * w[i * w_stride + j] for j < 64, in
// order of i; w holds fp32 with unit column stride (a strip of w2, or a converted copy).
#ifdef DSPARK_MARKOV_SIMD
DSPARK_MARKOV_CLONES
static void strip_sums(const float* h, int64_t B, int64_t rank, const float* w, int64_t w_stride, float* acc) {
  for (int64_t b = 0; b < B; ++b) {
    const float* hb = h + b * rank;
    v8f a[kVecs];
    for (int j = 0; j < kVecs; ++j) a[j] = v8f{};
    for (int64_t i = 0; i < rank; ++i) {
      const float s = hb[i];
      const v8f sv = {s, s, s, s, s, s, s, s};
      const float* wi = w + i * w_stride;
      for (int j = 0; j < kVecs; ++j) {
        v8f x;
        std::memcpy(&x, wi + j * kVec, sizeof(x));  // unaligned load
        const v8f p = sv * x;
        a[j] = a[j] + p;
      }
    }
    std::memcpy(acc + b * kStrip, a, sizeof(a));
  }
}
#else
static void strip_sums(const float* h, int64_t B, int64_t rank, const float* w, int64_t w_stride, float* acc) {
  for (int64_t b = 0; b < B; ++b) {
    float* ab = acc + b * kStrip;
    for (int64_t j = 0; j < kStrip; ++j) ab[j] = 0.f;
    for (int64_t i = 0; i < rank; ++i) {
      const float s = h[b * rank + i];
      const float* wi = w + i * w_stride;
      for (int64_t j = 0; j < kStrip; ++j) {
        const float p = s * wi[j];
        ab[j] = ab[j] + p;
      }
    }
  }
}
#endif

// out[b * out_stride + v] = base[b * base_s0 + v * base_s1] + sum_i h[b * rank + i] * w2[i * w2_s0 + v * w2_s1]
// for b < B, v < V (the formula at the top). h is fp32 [B, rank], contiguous.
template <typename BT, typename WT>
void logits(int64_t B, int64_t V, int64_t rank, const float* h, const WT* w2, int64_t w2_s0, int64_t w2_s1,
            const BT* base, int64_t base_s0, int64_t base_s1, float* out, int64_t out_stride) {
  if (B == 0 || V == 0) return;
  const int64_t num_strips = (V + kStrip - 1) / kStrip;
  // A task of 16 strips is 1024 columns x r x B products; fewer for big batches.
  const int64_t grain = std::max<int64_t>(1, 16 / std::max<int64_t>(1, B / 4));
  // fp32 w2 with unit column stride is read in place; anything else (fp16 / bf16,
  // strided) is converted strip by strip into a per-task copy.
  const bool direct = std::is_same<WT, float>::value && w2_s1 == 1;
  at::parallel_for(0, num_strips, grain, [&](int64_t sb, int64_t se) {
    std::vector<float> acc(static_cast<size_t>(B * kStrip));
    std::vector<float> copy;
    for (int64_t strip = sb; strip < se; ++strip) {
      const int64_t v0 = strip * kStrip;
      const int64_t n = std::min<int64_t>(kStrip, V - v0);
      const float* w;
      int64_t w_stride;
      if (direct && n == kStrip) {
        w = reinterpret_cast<const float*>(w2) + v0;
        w_stride = w2_s0;
      } else {
        // Converted (or a partial last strip, zero-padded: padding columns are dropped).
        copy.assign(static_cast<size_t>(rank * kStrip), 0.f);
        for (int64_t i = 0; i < rank; ++i)
          for (int64_t j = 0; j < n; ++j) copy[i * kStrip + j] = static_cast<float>(w2[i * w2_s0 + (v0 + j) * w2_s1]);
        w = copy.data();
        w_stride = kStrip;
      }
      strip_sums(h, B, rank, w, w_stride, acc.data());
      for (int64_t b = 0; b < B; ++b) {
        const BT* brow = base + b * base_s0 + v0 * base_s1;
        const float* ab = acc.data() + b * kStrip;
        float* o = out + b * out_stride + v0;
        if (base_s1 == 1) {
          for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(brow[j]) + ab[j];
        } else {
          for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(brow[j * base_s1]) + ab[j];
        }
      }
    }
  });
}

}  // namespace markov_head
}  // namespace dspark
