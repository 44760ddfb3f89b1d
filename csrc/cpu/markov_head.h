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
// a chunk of the rank (each load of w2 serves both). w2 is read from memory once per
// step for all B requests (the old kernel read it once per group of four requests),
// in long sequential runs (logits_streamed, or packed in logits); panels of columns
// are split between threads.
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
// acc[b * acc_stride + j] += sum_{i < rows} h[b * h_stride + i] * w[i * w_stride + j] for j < kStrip, b < B,
// adding the products in order of i (the running sums stay in registers across the rows).
#ifdef DSPARK_MARKOV_SIMD
// Two requests x 32 columns per pass (8 accumulators): each load of w serves both.
// Loads / stores by value (unaligned), so the accumulators stay in registers. (Internal
// functions: the AVX calling-convention note -Wpsabi warns about does not apply.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
__attribute__((always_inline)) static inline v8f load8(const float* p) {
  v8f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
__attribute__((always_inline)) static inline void store8(float* p, v8f x) { std::memcpy(p, &x, sizeof(x)); }
#pragma GCC diagnostic pop

template <int kRows>
__attribute__((always_inline)) static inline void half_strip(const float* h, int64_t h_stride, int64_t rows,
                                                             const float* w, int64_t w_stride, float* acc,
                                                             int64_t acc_stride) {
  v8f a0 = load8(acc), a1 = load8(acc + 8), a2 = load8(acc + 16), a3 = load8(acc + 24);
  v8f b0 = a0, b1 = a1, b2 = a2, b3 = a3;
  if (kRows == 2) {
    const float* acc1 = acc + acc_stride;
    b0 = load8(acc1), b1 = load8(acc1 + 8), b2 = load8(acc1 + 16), b3 = load8(acc1 + 24);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* wi = w + i * w_stride;
    const v8f x0 = load8(wi), x1 = load8(wi + 8), x2 = load8(wi + 16), x3 = load8(wi + 24);
    const float s = h[i];  // scalar * vector: one broadcast
    const v8f p0 = s * x0, p1 = s * x1, p2 = s * x2, p3 = s * x3;
    a0 = a0 + p0, a1 = a1 + p1, a2 = a2 + p2, a3 = a3 + p3;
    if (kRows == 2) {
      const float t = h[h_stride + i];
      const v8f q0 = t * x0, q1 = t * x1, q2 = t * x2, q3 = t * x3;
      b0 = b0 + q0, b1 = b1 + q1, b2 = b2 + q2, b3 = b3 + q3;
    }
  }
  store8(acc, a0), store8(acc + 8, a1), store8(acc + 16, a2), store8(acc + 24, a3);
  if (kRows == 2) {
    float* acc1 = acc + acc_stride;
    store8(acc1, b0), store8(acc1 + 8, b1), store8(acc1 + 16, b2), store8(acc1 + 24, b3);
  }
}

DSPARK_MARKOV_CLONES
static void strip_sums(const float* h, int64_t h_stride, int64_t B, int64_t rows, const float* w, int64_t w_stride,
                       float* acc, int64_t acc_stride) {
  for (int64_t c = 0; c < kStrip; c += kStrip / 2) {
    int64_t b = 0;
    for (; b + 2 <= B; b += 2)
      half_strip<2>(h + b * h_stride, h_stride, rows, w + c, w_stride, acc + b * acc_stride + c, acc_stride);
    if (b < B) half_strip<1>(h + b * h_stride, h_stride, rows, w + c, w_stride, acc + b * acc_stride + c, acc_stride);
  }
}
#else
static void strip_sums(const float* h, int64_t h_stride, int64_t B, int64_t rows, const float* w, int64_t w_stride,
                       float* acc, int64_t acc_stride) {
  for (int64_t b = 0; b < B; ++b) {
    float* ab = acc + b * acc_stride;
    for (int64_t i = 0; i < rows; ++i) {
      const float s = h[b * h_stride + i];
      const float* wi = w + i * w_stride;
      for (int64_t j = 0; j < kStrip; ++j) {
        const float p = s * wi[j];
        ab[j] = ab[j] + p;
      }
    }
  }
}
#endif

// out[b, v] = base[b, v] + the requests' sums, epilogue of both variants below.
template <typename BT>
void add_base(int64_t B, int64_t n, const BT* base, int64_t base_s0, int64_t base_s1, const float* acc,
              int64_t acc_stride, float* out, int64_t out_stride) {
  for (int64_t b = 0; b < B; ++b) {
    const BT* brow = base + b * base_s0;
    const float* ab = acc + b * acc_stride;
    float* o = out + b * out_stride;
    if (base_s1 == 1) {
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(brow[j]) + ab[j];
    } else {
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(brow[j * base_s1]) + ab[j];
    }
  }
}

// fp32 w2 with unit column stride, read in place: each task owns a panel of P columns
// (16384 for one request, 4096 for 16: every request's sums, 256 KB in all, stay in
// L2) and walks the rank eight rows at a time, reading each row's piece of w2 front to
// back (eight sequential streams the prefetchers follow, no copy); each strip's sums
// are loaded into registers once per eight rows. A partial last strip is copied
// zero-padded (reading past it could leave w2).
template <typename BT>
void logits_streamed(int64_t B, int64_t V, int64_t rank, const float* h, const float* w2, int64_t w2_s0,
                     const BT* base, int64_t base_s0, int64_t base_s1, float* out, int64_t out_stride) {
  constexpr int64_t kRows = 8;
  const int64_t P = std::clamp<int64_t>((int64_t{1} << 16) / B / kStrip, 8, 256) * kStrip;
  const int64_t num_panels = (V + P - 1) / P;
  at::parallel_for(0, num_panels, 1, [&](int64_t pb, int64_t pe) {
    const int64_t ps = P + 16;
    std::vector<float> acc(static_cast<size_t>(B * ps));
    float tail[kRows * kStrip];
    for (int64_t panel = pb; panel < pe; ++panel) {
      const int64_t v0 = panel * P;
      const int64_t n = std::min<int64_t>(P, V - v0);
      const int64_t full = n / kStrip * kStrip;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i0 = 0; i0 < rank; i0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, rank - i0);
        const float* w = w2 + i0 * w2_s0 + v0;
        for (int64_t c0 = 0; c0 < full; c0 += kStrip)
          strip_sums(h + i0, rank, B, rows, w + c0, w2_s0, acc.data() + c0, ps);
        if (full < n) {
          std::fill(tail, tail + kRows * kStrip, 0.f);
          for (int64_t i = 0; i < rows; ++i)
            std::memcpy(tail + i * kStrip, w + i * w2_s0 + full, static_cast<size_t>(n - full) * sizeof(float));
          strip_sums(h + i0, rank, B, rows, tail, kStrip, acc.data() + full, ps);
        }
      }
      add_base(B, n, base + v0 * base_s1, base_s0, base_s1, acc.data(), ps, out + v0, out_stride);
    }
  });
}

// out[b * out_stride + v] = base[b * base_s0 + v * base_s1] + sum_i h[b * rank + i] * w2[i * w2_s0 + v * w2_s1]
// for b < B, v < V (the formula at the top). h is fp32 [B, rank], contiguous.
//
// fp16 / bf16 or strided w2 (fp32 with unit stride goes to logits_streamed). Blocking:
// each task takes a panel of P columns (4096 for up to 16 requests: 16 KB row
// pieces) and keeps every request's P running sums in a buffer (L2). It walks the
// rank in chunks of kRankChunk rows: a chunk of the panel ([16, P] of w2) is first
// packed into a buffer, one row piece after the other, so memory is read in long
// sequential runs the hardware prefetchers follow (w2's rows lie V apart; summing a
// strip straight from w2 touches r distant short pieces and waits on memory); then
// every strip of the chunk is added to the sums from cache, rows in order. The pack
// also converts fp16 / bf16 and strided w2 to fp32 and zero-pads the last panel
// (padding columns are dropped).
template <typename BT, typename WT>
void logits(int64_t B, int64_t V, int64_t rank, const float* h, const WT* w2, int64_t w2_s0, int64_t w2_s1,
            const BT* base, int64_t base_s0, int64_t base_s1, float* out, int64_t out_stride) {
  if (B == 0 || V == 0) return;
  if (std::is_same<WT, float>::value && w2_s1 == 1) {
    logits_streamed(B, V, rank, h, reinterpret_cast<const float*>(w2), w2_s0, base, base_s0, base_s1, out,
                    out_stride);
    return;
  }
  constexpr int64_t kRankChunk = 16;
  // P columns of running sums per request: B * P floats stay within 256 KB (L2), as does the pack.
  const int64_t P = std::clamp<int64_t>((int64_t{1} << 16) / B / kStrip, 8, 64) * kStrip;
  const int64_t num_panels = (V + P - 1) / P;
  at::parallel_for(0, num_panels, 1, [&](int64_t pb, int64_t pe) {
    // Row strides padded by one cache line: rows 16 KB apart would all fall in the same
    // L1 sets (4 KB aliasing) and evict each other while a strip is summed.
    const int64_t ps = P + 16;
    std::vector<float> acc(static_cast<size_t>(B * ps));
    std::vector<float> pack(static_cast<size_t>(kRankChunk * ps));
    for (int64_t panel = pb; panel < pe; ++panel) {
      const int64_t v0 = panel * P;
      const int64_t n = std::min<int64_t>(P, V - v0);
      const int64_t width = (n + kStrip - 1) / kStrip * kStrip;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i0 = 0; i0 < rank; i0 += kRankChunk) {
        const int64_t rows = std::min<int64_t>(kRankChunk, rank - i0);
        for (int64_t i = 0; i < rows; ++i) {
          const WT* row = w2 + (i0 + i) * w2_s0 + v0 * w2_s1;
          if (i0 + i + 1 < rank) {  // start the next row piece's stream before this one is copied
            const char* next = reinterpret_cast<const char*>(row + w2_s0);
            for (int line = 0; line < 8; ++line) __builtin_prefetch(next + 64 * line, 0, 1);
          }
          float* dst = pack.data() + i * ps;
          if (std::is_same<WT, float>::value && w2_s1 == 1) {
            std::memcpy(dst, row, static_cast<size_t>(n) * sizeof(float));
          } else {
            for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(row[j * w2_s1]);
          }
          for (int64_t j = n; j < width; ++j) dst[j] = 0.f;
        }
        for (int64_t c0 = 0; c0 < width; c0 += kStrip)
          strip_sums(h + i0, rank, B, rows, pack.data() + c0, ps, acc.data() + c0, ps);
      }
      for (int64_t b = 0; b < B; ++b) {
        const BT* brow = base + b * base_s0 + v0 * base_s1;
        const float* ab = acc.data() + b * ps;
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
