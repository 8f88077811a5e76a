// Per-element and per-row math of the sparse KL loss, shared by the CPU (sparse_kl_cpu.cpp) and the
// CUDA (sparse_kl_cuda.cu) kernels so that the CPU tests exercise the same formulas the GPU runs.
// No torch headers: nvcc compiles this on its own.
//
// Notation (see kdengine/losses/reference.py for the formula and the gradient derivation):
//   x_j    student logit, j < V;   T temperature;   I the row's K top-k ids.
//   Student sums are taken relative to the row max m, in base 2:
//     e_j = 2^((x_j - m) * log2(e) / T) = exp((x_j - m) / T),   S_T = sum_j e_j,
//     lse_T = m / T + ln S_T,  log q_j = (x_j - m) / T - ln S_T.
//   The student tail S_tail = sum_{j not in I} e_j is accumulated directly (never as S_T - sum_I e_j)
//   so that q_tail = S_tail / S_T keeps its relative precision when the student is confident.
//   Teacher-side per-row math (K entries) runs in double: it costs nothing next to the V-long pass.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline __attribute__((always_inline))
#endif

namespace kdengine {

// Tail masses (the teacher's 1 - sum_k exp(logp_k) and the student's q_tail) are clamped below at
// kTailMin before their log is taken. The teacher's can reach 0 or go slightly negative (K = V, or
// quantized log-probs that sum past 1); the student's underflows only when every non-top-k logit
// sits ~46 nats below the top. 1e-20 keeps p_tail / q_tail far from fp32 overflow, and at that
// level the fp32 student sum is still exact to ~1e-13 (terms below 2^-125 are flushed). A clamped
// student tail carries no gradient, exactly like torch.clamp_min in the reference.
constexpr double kTailMin = 1e-20;
constexpr double kLogTailMin = -46.051701859880914;  // ln(kTailMin)

// 2^y for y <= 0 (y = -inf gives 0, NaN stays NaN). On the GPU this is the MUFU ex2 unit (ftz); on the
// host a branch-free polynomial the compiler vectorizes: y = n + f with n = round(y), |f| <= 1/2,
// 2^f = e^r with r = f ln 2, |r| <= 0.347, by its Taylor series to r^7 (truncation < 1e-8
// relative, below half an fp32 ulp); 2^n is built from the exponent bits. Adding 1.5 * 2^23 rounds
// y to the integer n and leaves n in the low mantissa bits, so n never goes through a float-to-int
// conversion (nor through a NaN check: a NaN y makes p NaN whatever the bits). Results under
// 2^-125 flush to 0, like the GPU's ftz.
KD_HD float exp2_fast(float y) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#else
  const float lo = -125.0f, shifter = 12582912.0f;
  const float yc = y < lo ? lo : y;
  const float t = yc + shifter;
  const float r = (yc - (t - shifter)) * 0.69314718f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t t_bits, shifter_bits;
  std::memcpy(&t_bits, &t, sizeof(t));
  std::memcpy(&shifter_bits, &shifter, sizeof(shifter));
  const uint32_t scale_bits = static_cast<uint32_t>(t_bits - shifter_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return y < lo ? 0.0f : p * scale;
#endif
}

KD_HD double exp2_fast(double y) { return exp2(y); }

// log2(e) / T: multiplies a logit difference into a base-2 exponent at temperature T.
template <typename acc_t>
KD_HD acc_t exp_scale(double temperature) {
  return static_cast<acc_t>(1.4426950408889634 / temperature);
}

// Exponents are taken against a per-row shift sh = fl(m * scale2), scale2 = log2(e) / T (or log2(e)
// for the T = 1 sums), so every e_j = 2^(x_j * scale2 - sh) is one fma and one exp2. Partial sums are
// rescaled by 2^(sh_old - sh_new) between the same rounded shifts, so the rounding of m * scale2
// cancels between partial sums, and again in the backward, which divides by S with the same sh.
// A row (or partial row) with no finite max so far has m = -inf, shift 0 and an empty sum.
template <typename acc_t>
KD_HD acc_t shift_of(acc_t m, acc_t scale2) {
  return m == -INFINITY ? acc_t(0) : m * scale2;
}

template <typename acc_t>
KD_HD acc_t rescale(acc_t m_old, acc_t m_new, acc_t scale2) {
  return m_old == -INFINITY ? acc_t(0) : exp2_fast(shift_of(m_old, scale2) - shift_of(m_new, scale2));
}

// ln sum_j exp((x_j - m) / T) from S = sum_j 2^(x_j * scale2 - sh): S carries the factor
// 2^(m * scale2 - sh) of the shift's rounding, removed here in double.
template <typename acc_t>
KD_HD double log_sum(double s, acc_t m, acc_t scale2) {
  if (m == -INFINITY) return log(s);
  const acc_t sh = shift_of(m, scale2);
  return log(s) + (static_cast<double>(sh) - static_cast<double>(m) * static_cast<double>(scale2)) *
                      0.6931471805599453;
}

// Online softmax state of one thread (or one chunk): running max m of the raw logits and the sums
// s (all entries, or the non-top-k entries when the tail is on) and s1 (all entries at T = 1, kept
// only when cross-entropy is mixed in at T != 1), against the shifts of m.
template <typename acc_t>
struct OnlineSums {
  acc_t m;
  acc_t s;
  acc_t s1;
};

template <typename acc_t>
KD_HD OnlineSums<acc_t> merge_sums(OnlineSums<acc_t> a, OnlineSums<acc_t> b, acc_t scale2) {
  acc_t m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return a;  // both empty
  const acc_t l2e = exp_scale<acc_t>(1.0);
  return {m, a.s * rescale(a.m, m, scale2) + b.s * rescale(b.m, m, scale2),
          a.s1 * rescale(a.m, m, l2e) + b.s1 * rescale(b.m, m, l2e)};
}

// The teacher's tail bucket logit z_tail = ln(max(1 - sum_k exp(logp_k), kTailMin)) / T.
KD_HD double teacher_tail_logit(double teacher_mass, double inv_t) {
  double rest = 1.0 - teacher_mass;
  return log(rest > kTailMin ? rest : kTailMin) * inv_t;
}

// p * (log p - log q), with 0 for an empty bucket (p underflowed to 0) even where q is 0.
KD_HD double kl_term(double p, double log_p, double log_q) { return p > 0.0 ? p * (log_p - log_q) : 0.0; }

// Gradient coefficients of the KD term (before the T factor): d KD / d x_j = T * (c_top q_j - p_k)
// for j = i_k in the top-k, and T * c_rest * q_j for every other j. Without the tail both are 1.
// With it, c_top = 1 and c_rest = 1 - p_tail / q_tail; if q_tail was clamped the tail term is a
// constant and both become P = sum_k p_k = 1 - p_tail.
struct TailCoefs {
  double c_top;
  double c_rest;
  double log_q_tail;  // after the clamp
};

KD_HD TailCoefs tail_coefs(bool tail, double p_tail, double log_p_tail, double log_q_tail_raw) {
  if (!tail) return {1.0, 1.0, 0.0};
  if (!(log_q_tail_raw >= kLogTailMin)) return {1.0 - p_tail, 1.0 - p_tail, kLogTailMin};
  return {1.0, 1.0 - exp(log_p_tail - log_q_tail_raw), log_q_tail_raw};
}

// loss_row = alpha * T^2 * KD_row + (1 - alpha) * CE_row; a term whose weight is 0 is skipped so
// that an infinite KD (a top-k id whose student logit is -inf) cannot turn a pure-CE loss into NaN.
KD_HD double row_loss(double alpha, double temperature, double kd, double ce) {
  double loss = 0.0;
  if (alpha > 0.0) loss += alpha * temperature * temperature * kd;
  if (alpha < 1.0) loss += (1.0 - alpha) * ce;
  return loss;
}

template <typename acc_t, typename scalar_t>
KD_HD acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}
#if defined(__CUDACC__)
// torch builds .cu files with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__: convert explicitly.
template <typename acc_t>
KD_HD acc_t to_acc(__nv_bfloat16 v) {
  return static_cast<acc_t>(__bfloat162float(v));
}
template <typename acc_t>
KD_HD acc_t to_acc(__half v) {
  return static_cast<acc_t>(__half2float(v));
}
#endif

// The per-row epilogue below runs over the K top-k entries either serially (CPU: first = 0,
// stride = 1, SerialCombine) or spread over the lanes of a warp (CUDA: first = lane, stride = 32,
// a combiner whose sum / max reduce across the warp); every lane gets the combined value.
struct SerialCombine {
  template <typename V>
  KD_HD V sum(V v) const { return v; }
  template <typename V>
  KD_HD V max(V v) const { return v; }
};

// sum_k 2^(x_{i_k} scale2 - sh): the top-k part of S_T, which the tail pass skipped.
template <typename acc_t, typename scalar_t, typename Combine>
KD_HD acc_t topk_exp_sum(const scalar_t* x, const int32_t* idx, int64_t k, int64_t vocab, acc_t scale2, acc_t sh,
                         int64_t first, int64_t stride, const Combine& all) {
  acc_t s = 0;
  for (int64_t i = first; i < k; i += stride) {
    const int32_t id = idx[i];
    if (id >= 0 && id < vocab) s += exp2_fast(to_acc<acc_t>(x[id]) * scale2 - sh);
  }
  return all.sum(s);
}

struct KDRow {
  double kd;      // D, the divergence over the buckets, before the T^2 factor
  double c_rest;  // the coefficient of T q_j in d KD / d x_j off the top-k ids (see TailCoefs)
};

// The divergence D over the buckets (reference.py has the definitions and the gradient derivation).
enum class Divergence : int32_t { kFKL = 0, kRKL = 1, kJSD = 2 };

// One bucket's term d of D and g_over_q = (dD / d log q_b) / q_b, for rkl and jsd:
//   rkl  d = q (log q - log p),                                   g / q = log q - log p + 1
//   jsd  d = beta p log(p / m) + (1 - beta) q log(q / m),          g / q = (1 - beta) log(q / m)
// with m = beta p + (1 - beta) q taken in log space; an empty bucket (q = 0) adds nothing.
struct BucketTerm {
  double d;
  double g_over_q;
};

KD_HD double log_add_exp(double a, double b) {
  const double hi = a > b ? a : b, lo = a > b ? b : a;
  return hi == -INFINITY ? -INFINITY : hi + log1p(exp(lo - hi));
}

KD_HD BucketTerm bucket_term(Divergence div, double beta, double log_p, double log_q) {
  const double q = exp(log_q);
  if (div == Divergence::kRKL) {
    if (!(q > 0.0)) return {0.0, 0.0};
    const double r = log_q - log_p;
    return {q * r, r + 1.0};
  }
  const double p = exp(log_p);
  const double log_m = log_add_exp(log_p + log(beta), log_q + log1p(-beta));
  const double kl_q = q > 0.0 ? q * (log_q - log_m) : 0.0;
  return {beta * kl_term(p, log_p, log_m) + (1.0 - beta) * kl_q, q > 0.0 ? (1.0 - beta) * (log_q - log_m) : 0.0};
}

// The teacher buckets of a row: z_k = logp_k / T - shift, normalised in double. Without c_T
// (lse NaN) shift = 0 and z_tail = ln(1 - sum_k exp(logp_k)) / T (the tail taken as one token);
// with it (the exact tempered teacher) shift = c_T and z_tail = ln(1 - sum_k exp(z_k)).
struct TeacherRow {
  double shift, z_max, log_z, log_p_tail, p_tail;
};

template <typename acc_t, typename Combine>
KD_HD TeacherRow teacher_row(const acc_t* logp, int64_t k, bool tail, double inv_t, double lse, int64_t first,
                             int64_t stride, const Combine& all) {
  const bool exact = tail && lse == lse;
  const double shift = exact ? lse : 0.0;
  double z_max = -INFINITY, mass = 0.0;
  for (int64_t i = first; i < k; i += stride) {
    const double lp = static_cast<double>(logp[i]);
    const double z = lp * inv_t - shift;
    z_max = z > z_max ? z : z_max;
    mass += exact ? exp(z) : exp(lp);
  }
  z_max = all.max(z_max);
  mass = all.sum(mass);
  double z_tail = -INFINITY;
  if (tail) {
    const double rest = 1.0 - mass;
    z_tail = exact ? log(rest > kTailMin ? rest : kTailMin) : teacher_tail_logit(mass, inv_t);
  }
  z_max = z_tail > z_max ? z_tail : z_max;
  double z_sum = 0.0;
  for (int64_t i = first; i < k; i += stride) z_sum += exp(static_cast<double>(logp[i]) * inv_t - shift - z_max);
  z_sum = all.sum(z_sum) + (tail ? exp(z_tail - z_max) : 0.0);
  const double log_z = log(z_sum);
  const double log_p_tail = z_tail - z_max - log_z;
  return {shift, z_max, log_z, log_p_tail, tail ? exp(log_p_tail) : 0.0};
}

// The KD part of a row from the student's max m and ln S_T (and, with the tail, ln q_tail before
// the clamp): D and this thread's share of topk_grad[k] = (d KD / d x_{i_k}) / T, that is
// c_top q_k - p_k for fkl and g_k - q_k G for rkl and jsd (reference.py).
template <typename acc_t, typename scalar_t, typename Combine>
KD_HD KDRow kd_row(const scalar_t* x, const int32_t* idx, const acc_t* logp, acc_t* topk_grad, int64_t k, int64_t vocab,
                   bool tail, double temperature, Divergence div, double beta, double lse, double m, double ln_sum_t,
                   double log_q_tail_raw, int64_t first, int64_t stride, const Combine& all) {
  const double inv_t = 1.0 / temperature;
  const TeacherRow t = teacher_row(logp, k, tail, inv_t, lse, first, stride, all);
  auto log_q_at = [&](int64_t i) {
    const int32_t id = idx[i];
    // An id outside [0, V) (-1: a padding entry of an adaptive-K row) is no bucket: q = 0.
    return (id >= 0 && id < vocab) ? (to_acc<double>(to_acc<acc_t>(x[id])) - m) * inv_t - ln_sum_t : -INFINITY;
  };
  auto log_p_at = [&](int64_t i) { return static_cast<double>(logp[i]) * inv_t - t.shift - t.z_max - t.log_z; };
  if (div == Divergence::kFKL) {
    const TailCoefs coefs = tail_coefs(tail, t.p_tail, t.log_p_tail, log_q_tail_raw);
    double kd = 0.0;
    for (int64_t i = first; i < k; i += stride) {
      const double log_q = log_q_at(i);
      const double log_p = log_p_at(i);
      const double p_k = exp(log_p);
      kd += kl_term(p_k, log_p, log_q);
      topk_grad[i] = static_cast<acc_t>(coefs.c_top * exp(log_q) - p_k);
    }
    kd = all.sum(kd);
    if (tail) kd += kl_term(t.p_tail, t.log_p_tail, coefs.log_q_tail);
    return {kd, coefs.c_rest};
  }
  // rkl / jsd: D and G = sum_b g_b first, then g_k - q_k G. A clamped student tail is a constant (g_tail = 0).
  double d = 0.0, g_sum = 0.0;
  for (int64_t i = first; i < k; i += stride) {
    const double log_q = log_q_at(i);
    const BucketTerm b = bucket_term(div, beta, log_p_at(i), log_q);
    d += b.d;
    g_sum += exp(log_q) * b.g_over_q;
  }
  d = all.sum(d);
  g_sum = all.sum(g_sum);
  double g_tail_over_q = 0.0;
  if (tail) {
    const bool clamped = !(log_q_tail_raw >= kLogTailMin);
    const double log_q_tail = clamped ? kLogTailMin : log_q_tail_raw;
    const BucketTerm b = bucket_term(div, beta, t.log_p_tail, log_q_tail);
    d += b.d;
    if (!clamped) {
      g_tail_over_q = b.g_over_q;
      g_sum += exp(log_q_tail) * b.g_over_q;
    }
  }
  for (int64_t i = first; i < k; i += stride) {
    const double log_q = log_q_at(i);
    const BucketTerm b = bucket_term(div, beta, log_p_at(i), log_q);
    topk_grad[i] = static_cast<acc_t>(exp(log_q) * (b.g_over_q - g_sum));
  }
  return {d, g_tail_over_q - g_sum};
}

// CE_row = lse_1 - x_label = (m - x_label) + ln S_1.
template <typename acc_t>
KD_HD double row_ce(acc_t m, double x_label, acc_t sum_1) {
  return (static_cast<double>(m) - x_label) + log_sum(static_cast<double>(sum_1), m, exp_scale<acc_t>(1.0));
}

// Row stats written by the forward, per row: the max m of the raw logits, the sums S_T and S_1
// against the shifts of m (S_1 = S_T when T = 1), and c_rest (for the backward); then the row's KD
// part T^2 D and CE part (for logging: 0 where they were not computed, and for ignored rows).
constexpr int kRowStats = 6;
enum RowStat { kStatMax = 0, kStatSumT = 1, kStatSum1 = 2, kStatCRest = 3, kStatKD = 4, kStatCE = 5 };

// Coefficients of the dense part of dL/dx_j for a row with weight w (the upstream gradient of its
// loss): dL/dx_j = a 2^(x_j scale2 - sh) + b 2^(x_j log2e - sh1) off the top-k ids and the label,
// i.e. a = w alpha T c_rest / S_T and b = w (1 - alpha) / S_1. When T = 1 both exponents are the
// same and b is folded into a.
template <typename acc_t>
struct DenseCoefs {
  acc_t a, b, sh, sh1;
  bool ce_separate;
};

template <typename acc_t>
KD_HD DenseCoefs<acc_t> dense_coefs(const acc_t* stats, double w, double alpha, double temperature, bool with_ce,
                                    acc_t scale2) {
  const bool ce_separate = with_ce && temperature != 1.0;
  double a = alpha > 0.0 ? w * alpha * temperature * static_cast<double>(stats[kStatCRest]) /
                               static_cast<double>(stats[kStatSumT])
                         : 0.0;
  double b = with_ce ? w * (1.0 - alpha) / static_cast<double>(stats[kStatSum1]) : 0.0;
  if (!ce_separate) a += b;
  return {acc_t(a), acc_t(b), shift_of(stats[kStatMax], scale2), shift_of(stats[kStatMax], exp_scale<acc_t>(1.0)),
          ce_separate};
}

// kCeSep = c.ce_separate, as a template parameter so that the T = 1 loop carries no second exp.
template <bool kCeSep, typename acc_t>
KD_HD acc_t dense_grad(acc_t x, const DenseCoefs<acc_t>& c, acc_t scale2) {
  acc_t g = c.a * exp2_fast(x * scale2 - c.sh);
  if (kCeSep) g += c.b * exp2_fast(x * exp_scale<acc_t>(1.0) - c.sh1);
  return g;
}

// The full dL/dx_j at a top-k id or at the label, where the dense formula does not hold:
// w (alpha T kd_k + (1 - alpha) (q1_j - [j = label])), kd_k the forward's topk_grad entry (0 when j is
// not in the top-k), q1_j = softmax(x)_j at T = 1.
template <typename acc_t>
KD_HD acc_t sparse_grad(acc_t x, double w, double alpha, double temperature, bool with_ce, double kd_k,
                        bool is_label, const acc_t* stats) {
  double g = alpha > 0.0 ? alpha * temperature * kd_k : 0.0;
  if (with_ce) {
    // q1_j = 2^(x_j log2e - sh1) / S_1, against the forward's shift (exp_scale(1) == log2e exactly).
    const acc_t l2e = exp_scale<acc_t>(1.0);
    double q1 = static_cast<double>(exp2_fast(x * l2e - shift_of(stats[kStatMax], l2e))) /
                static_cast<double>(stats[kStatSum1]);
    g += (1.0 - alpha) * (q1 - (is_label ? 1.0 : 0.0));
  }
  return acc_t(w * g);
}

}  // namespace kdengine
