// schedule_verify_lens on the CPU: DSpark's Algorithm 1 as written, with the
// arithmetic of dspark/schedule.h. Survivals, one sort of the R * gamma candidates
// by their 64-bit key, then a sequential scan of the admissions. Small (R * gamma is
// a few thousand), so one thread.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "drafting.h"
#include "dspark/schedule.h"

namespace dspark {

std::tuple<at::Tensor, at::Tensor> schedule_verify_lens_cpu(const at::Tensor& confidence, const at::Tensor& sps,
                                                            bool early_stop) {
  check_schedule_verify_lens_args(confidence, sps);
  const int64_t R = confidence.size(0);
  const int64_t gamma = confidence.size(1);
  const int64_t bmax = sps.size(0) - 1;
  const at::Tensor conf = confidence.to(at::kFloat);  // any strides: read through accessor
  const at::Tensor table = sps.to(at::kDouble).contiguous();
  const auto c = conf.accessor<float, 2>();
  const double* sp = table.const_data_ptr<double>();

  // Survivals and sort keys.
  const int64_t n = R * gamma;
  std::vector<uint64_t> keys(static_cast<size_t>(n));
  std::vector<float> surv(static_cast<size_t>(n));
  for (int64_t r = 0; r < R; ++r) {
    float a = 1.f;
    for (int64_t j = 0; j < gamma; ++j) {
      a = a * schedule_clamp(c[r][j]);
      const int64_t e = r * gamma + j;
      surv[e] = a;
      keys[e] = schedule_key(a, e);
    }
  }
  std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());

  // Admit in order; keep the best Theta (strictly better only, so ties keep the smaller k).
  const int64_t max_admit = schedule_max_admit(R, gamma, bmax);
  int64_t tau = R * static_cast<int64_t>(kScheduleScale);
  double best_theta = schedule_theta(tau, sp[R]);
  int64_t best_k = 0;
  for (int64_t k = 1; k <= max_admit; ++k) {
    const int64_t e = static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(keys[k - 1]));
    tau += schedule_quantize(surv[e]);
    const double theta = schedule_theta(tau, sp[R + k]);
    if (theta > best_theta) {
      best_theta = theta;
      best_k = k;
    } else if (early_stop) {
      break;
    }
  }

  at::Tensor verify_lens = at::zeros({R}, confidence.options().dtype(at::kInt));
  at::Tensor cu_verify = at::empty({R + 1}, confidence.options().dtype(at::kInt));
  int32_t* lens = verify_lens.mutable_data_ptr<int32_t>();
  for (int64_t k = 0; k < best_k; ++k) {
    const int64_t e = static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(keys[k]));
    lens[e / gamma] += 1;
  }
  int32_t* cu = cu_verify.mutable_data_ptr<int32_t>();
  cu[0] = 0;
  for (int64_t r = 0; r < R; ++r) cu[r + 1] = cu[r] + lens[r];
  return {verify_lens, cu_verify};
}

}  // namespace dspark
