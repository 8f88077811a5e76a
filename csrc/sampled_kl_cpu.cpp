// CPU sampled-target KL forward: rows in parallel with OpenMP (dynamic chunks, as in
// sparse_kl_cpu.cpp); each row is streamed once in L1-sized chunks with an online max / sum-exp,
// then the K drawn ids get the teacher-side epilogue of sampled_kl_math.h. The backward is
// sparse_kl_backward_cpu (same gradient shape).
#include <algorithm>
#include <cmath>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include "sampled_kl.h"
#include "sampled_kl_math.h"

namespace kdengine {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define KD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_CLONES
#endif
#define KD_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 2048;  // elements per chunk: the max pass and the exp pass share L1
constexpr int64_t kRowsPerTask = 4;

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename acc_t, typename scalar_t>
KD_INLINE acc_t chunk_max(const scalar_t* x, int64_t n) {
  acc_t m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    m = v > m ? v : m;
  }
  return m;
}

template <typename acc_t, typename scalar_t>
KD_INLINE acc_t chunk_sum_exp2(const scalar_t* x, int64_t n, acc_t scale2, acc_t sh) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp2_fast(static_cast<acc_t>(x[i]) * scale2 - sh);
  return s;
}

template <typename scalar_t>
KD_INLINE void forward_row(const SampledForwardParams& p, int64_t r) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t V = p.vocab, K = p.k;
  acc_t* stats = static_cast<acc_t*>(p.row_stats) + r * kRowStats;
  acc_t* grad = static_cast<acc_t*>(p.sample_grad) + r * K;
  acc_t* loss = static_cast<acc_t*>(p.loss_rows) + r;
  const int64_t label = p.labels ? p.labels[r] : -1;
  if (p.labels && label == p.ignore_index) {
    *loss = 0;
    std::fill(stats, stats + kRowStats, acc_t(0));
    std::fill(grad, grad + K, acc_t(0));
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + r * p.logits_row_stride;
  const acc_t scale2 = exp_scale<acc_t>(p.temperature), l2e = exp_scale<acc_t>(1.0);
  const bool ce_separate = p.with_ce && p.temperature != 1.0;
  OnlineSums<acc_t> st{-INFINITY, 0, 0};
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(c0 + kChunk, V) - c0;
    const acc_t cm = chunk_max<acc_t>(x + c0, n);
    if (cm > st.m) {
      st.s *= rescale(st.m, cm, scale2);
      st.s1 *= rescale(st.m, cm, l2e);
      st.m = cm;
    }
    st.s += chunk_sum_exp2(x + c0, n, scale2, shift_of(st.m, scale2));
    if (ce_separate) st.s1 += chunk_sum_exp2(x + c0, n, l2e, shift_of(st.m, l2e));
  }
  const acc_t sum_1 = ce_separate ? st.s1 : st.s;
  SampledRow kd{0.0, 1.0};
  if (p.alpha > 0.0) {
    const size_t off = static_cast<size_t>(r * K);
    const acc_t* proposal = p.proposal_logp ? static_cast<const acc_t*>(p.proposal_logp) + off : nullptr;
    kd = sampled_kd_row(x, p.sample_idx + off, static_cast<const acc_t*>(p.sample_count) + off,
                        static_cast<const acc_t*>(p.target_logp) + off, proposal, grad, K, V, p.temperature, st.m,
                        log_sum(st.s, st.m, scale2), 0, 1, SerialCombine{});
  } else {
    std::fill(grad, grad + K, acc_t(0));
  }
  double ce = 0.0;
  if (p.with_ce) ce = row_ce(st.m, (label >= 0 && label < V) ? static_cast<double>(x[label]) : NAN, sum_1);
  *loss = static_cast<acc_t>(row_loss(p.alpha, p.temperature, kd.kd, ce));
  stats[kStatMax] = st.m;
  stats[kStatSumT] = st.s;
  stats[kStatSum1] = sum_1;
  stats[kStatCRest] = static_cast<acc_t>(kd.s);
}

template <typename scalar_t>
KD_INLINE void forward_rows(const SampledForwardParams& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) forward_row<scalar_t>(p, r);
}

KD_CLONES void forward_rows_f32(const SampledForwardParams& p, int64_t b, int64_t e) { forward_rows<float>(p, b, e); }
KD_CLONES void forward_rows_bf16(const SampledForwardParams& p, int64_t b, int64_t e) {
  forward_rows<c10::BFloat16>(p, b, e);
}
KD_CLONES void forward_rows_f16(const SampledForwardParams& p, int64_t b, int64_t e) {
  forward_rows<c10::Half>(p, b, e);
}
void forward_rows_f64(const SampledForwardParams& p, int64_t b, int64_t e) { forward_rows<double>(p, b, e); }

}  // namespace

void sampled_kl_forward_cpu(const SampledForwardParams& p, Dtype dtype) {
  auto rows = dtype == Dtype::kFloat32    ? forward_rows_f32
              : dtype == Dtype::kBFloat16 ? forward_rows_bf16
              : dtype == Dtype::kFloat16  ? forward_rows_f16
                                          : forward_rows_f64;
  const int64_t n_tasks = (p.n_rows + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = at::in_parallel_region() ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_tasks));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t t = 0; t < n_tasks; ++t) rows(p, t * kRowsPerTask, std::min(p.n_rows, (t + 1) * kRowsPerTask));
}

}  // namespace kdengine
