// Per-row teacher-side math of the sampled-target KL, shared by the CPU (sampled_kl_cpu.cpp) and
// CUDA (sampled_kl_cuda.cu) forwards; the student side (online max / sum-exp, shifts, CE) is
// sparse_kl_math.h's. Formula and proof: kdengine/losses/sampled_reference.py.
#pragma once

#include "sparse_kl_math.h"

namespace kdengine {

struct SampledRow {
  double kd;  // sum_k w_k (log p^T_k - log q^T_k), before the T^2 factor
  double s;   // S = sum_k w_k
};

// Over the slots first, first + stride, ... (all lanes get the combined values): the importance
// weights w_k = c_k / M * exp(target_k - proposal_k), the KD estimate, S, and this thread's share of
// sample_grad[k] = S q_k - w_k. m and ln_sum_t: the student's row max and ln sum_j exp((x_j - m) / T).
template <typename acc_t, typename scalar_t, typename Combine>
KD_HD SampledRow sampled_kd_row(const scalar_t* x, const int32_t* idx, const acc_t* count, const acc_t* target,
                                const acc_t* proposal, acc_t* sample_grad, int64_t k, int64_t vocab,
                                double temperature, double m, double ln_sum_t, int64_t first, int64_t stride,
                                const Combine& all) {
  const double inv_t = 1.0 / temperature;
  double draws = 0.0;
  for (int64_t i = first; i < k; i += stride) {
    const double c = static_cast<double>(count[i]);
    if (c > 0.0 && idx[i] >= 0 && idx[i] < vocab) draws += c;
  }
  draws = all.sum(draws);
  double kd = 0.0, s = 0.0;
  for (int64_t i = first; i < k; i += stride) {
    const int32_t id = idx[i];
    const double c = static_cast<double>(count[i]);
    if (!(c > 0.0 && id >= 0 && id < vocab)) continue;
    const double t = static_cast<double>(target[i]);
    const double w = c / draws * (proposal ? exp(t - static_cast<double>(proposal[i])) : 1.0);
    const double log_q = (to_acc<double>(to_acc<acc_t>(x[id])) - m) * inv_t - ln_sum_t;
    kd += w * (t - log_q);
    s += w;
  }
  kd = all.sum(kd);
  s = all.sum(s);
  for (int64_t i = first; i < k; i += stride) {
    const int32_t id = idx[i];
    const double c = static_cast<double>(count[i]);
    if (!(c > 0.0 && id >= 0 && id < vocab)) {
      sample_grad[i] = acc_t(0);
      continue;
    }
    const double w = c / draws * (proposal ? exp(static_cast<double>(target[i]) - static_cast<double>(proposal[i])) : 1.0);
    const double log_q = (to_acc<double>(to_acc<acc_t>(x[id])) - m) * inv_t - ln_sum_t;
    sample_grad[i] = static_cast<acc_t>(s * exp(log_q) - w);
  }
  return {kd, s};
}

}  // namespace kdengine
