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
// two requests' sums over 32 columns live in eight 8-wide registers while i runs over
// the rank (each load of w2 serves both), and the strip of w2 ([r, 64], 64 KB at
// r = 256) stays in cache for the whole batch.
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
// Two requests x 32 columns per pass (8 accumulators): each load of w serves two rows.
template <int kRows>
__attribute__((always_inline)) static inline void half_strip(const float* h, int64_t rank, const float* w,
                                                             int64_t w_stride, float* acc) {
  constexpr int kV = kVecs / 2;
  v8f a[kRows][kV];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kV; ++j) a[r][j] = v8f{};
  for (int64_t i = 0; i < rank; ++i) {
    v8f sv[kRows] = {};
    for (int r = 0; r < kRows; ++r) {
      const float s = h[r * rank + i];
      sv[r] = v8f{s, s, s, s, s, s, s, s};
    }
    const float* wi = w + i * w_stride;
    for (int j = 0; j < kV; ++j) {
      v8f x;
      std::memcpy(&x, wi + j * kVec, sizeof(x));  // unaligned load
      for (int r = 0; r < kRows; ++r) {
        const v8f p = sv[r] * x;
        a[r][j] = a[r][j] + p;
      }
    }
  }
  for (int r = 0; r < kRows; ++r) std::memcpy(acc + r * kStrip, a[r], sizeof(a[r]));
}

DSPARK_MARKOV_CLONES
static void strip_sums(const float* h, int64_t B, int64_t rank, const float* w, int64_t w_stride, float* acc) {
  for (int64_t c = 0; c < kStrip; c += kStrip / 2) {
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) half_strip<2>(h + b * rank, rank, w + c, w_stride, acc + b * kStrip + c);
    if (b < B) half_strip<1>(h + b * rank, rank, w + c, w_stride, acc + b * kStrip + c);
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
//
// Each task packs a panel of kPanel columns of w2 ([r, 512] fp32, 512 KB at r = 256)
// into its own buffer, one 2 KB row piece after the other: a sequential read the
// hardware prefetchers follow (w2's rows lie V apart, so summing a strip straight
// from w2 touches r distant 256-byte pieces and waits on memory). The panel's strips
// are then summed from cache for every request. The pack also converts fp16 / bf16
// and strided w2 to fp32, and zero-pads the last panel (padding columns are dropped).
template <typename BT, typename WT>
void logits(int64_t B, int64_t V, int64_t rank, const float* h, const WT* w2, int64_t w2_s0, int64_t w2_s1,
            const BT* base, int64_t base_s0, int64_t base_s1, float* out, int64_t out_stride) {
  if (B == 0 || V == 0) return;
  constexpr int64_t kPanel = 8 * kStrip;
  const int64_t num_panels = (V + kPanel - 1) / kPanel;
  at::parallel_for(0, num_panels, 1, [&](int64_t pb, int64_t pe) {
    std::vector<float> acc(static_cast<size_t>(B * kStrip));
    std::vector<float> pack(static_cast<size_t>(rank * kPanel));
    for (int64_t panel = pb; panel < pe; ++panel) {
      const int64_t v0 = panel * kPanel;
      const int64_t n = std::min<int64_t>(kPanel, V - v0);
      const int64_t width = (n + kStrip - 1) / kStrip * kStrip;
      for (int64_t i = 0; i < rank; ++i) {
        const WT* row = w2 + i * w2_s0 + v0 * w2_s1;
        float* dst = pack.data() + i * width;
        if (std::is_same<WT, float>::value && w2_s1 == 1) {
          std::memcpy(dst, row, static_cast<size_t>(n) * sizeof(float));
        } else {
          for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(row[j * w2_s1]);
        }
        for (int64_t j = n; j < width; ++j) dst[j] = 0.f;
      }
      for (int64_t c0 = 0; c0 < n; c0 += kStrip) {
        const int64_t m = std::min<int64_t>(kStrip, n - c0);
        strip_sums(h, B, rank, pack.data() + c0, width, acc.data());
        for (int64_t b = 0; b < B; ++b) {
          const BT* brow = base + b * base_s0 + (v0 + c0) * base_s1;
          const float* ab = acc.data() + b * kStrip;
          float* o = out + b * out_stride + v0 + c0;
          if (base_s1 == 1) {
            for (int64_t j = 0; j < m; ++j) o[j] = static_cast<float>(brow[j]) + ab[j];
          } else {
            for (int64_t j = 0; j < m; ++j) o[j] = static_cast<float>(brow[j * base_s1]) + ab[j];
          }
        }
      }
    }
  });
}

}  // namespace markov_head
}  // namespace dspark
