// Counter-based random numbers shared by every backend (docs/randomness.md).
//
// This header is the single definition of the bit layout; the PyTorch reference
// (dspark_kernels/reference/philox.py) and the Triton version
// (dspark_kernels/triton/philox.py) reproduce it word for word, and a test
// checks all three against each other.
//
//   key     = (seed & 0xffffffff, seed >> 32)                  seed: per request, int64
//   counter = (index >> 2, position & 0xffffffff, position >> 32, salt)
//   word    = Philox4x32-10(counter, key)[index & 3]
//
// `position` is the request's absolute token offset plus the row within the
// block, `salt` names the purpose (draft sampling, accept test, resample/bonus)
// and `index` is the vocabulary index for per-vocabulary noise (0 otherwise).
// Four consecutive vocabulary entries share one Philox call, so a kernel that
// walks the vocabulary four at a time pays one call per four words.
//
// No torch header here: the file also compiles under NVRTC.
#pragma once

#include "types.h"  // uint32_t ..., DSPARK_HD

namespace dspark {

// random_words: an index is a uint32 value, in [0, 2^32).
constexpr int64_t kRandomWordsIndexEnd = int64_t{1} << 32;

// Purpose salts: independent streams, so the noise that drew a draft is never
// reused to resample it (vLLM's shared-noise bias).
constexpr uint32_t kSaltDraft = 0x44524654u;     // "DRFT"
constexpr uint32_t kSaltAccept = 0x41434350u;    // "ACCP"
constexpr uint32_t kSaltResample = 0x52534d50u;  // "RSMP"

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxWords {
  uint32_t w[4];
};

DSPARK_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                    uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = (uint64_t)kPhiloxM0 * c0;
    const uint64_t p1 = (uint64_t)kPhiloxM1 * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  PhiloxWords out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// All four words of the call that holds vocabulary entries [4*(index>>2), +4).
DSPARK_HD PhiloxWords random_words4(uint64_t seed, uint64_t position, uint32_t salt,
                                    uint32_t index) {
  return philox4x32_10(index >> 2, (uint32_t)position, (uint32_t)(position >> 32), salt,
                       (uint32_t)seed, (uint32_t)(seed >> 32));
}

DSPARK_HD uint32_t random_word(uint64_t seed, uint64_t position, uint32_t salt,
                               uint32_t index) {
  return random_words4(seed, position, salt, index).w[index & 3u];
}

// Uniform strictly inside (0, 1): the top 23 bits plus one half, scaled by 2^-23.
// Every value is exact in fp32; the smallest is 2^-24 and the largest 1 - 2^-24,
// so log(u) and log(-log(u)) are always finite and a coin of 0 cannot accept a
// token of probability 0.
DSPARK_HD float uniform_from_word(uint32_t word) {
  return ((float)(word >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

}  // namespace dspark
