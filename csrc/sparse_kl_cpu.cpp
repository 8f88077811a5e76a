// CPU sparse KL: rows in parallel with OpenMP (torch's runtime and thread count), handed out in small
// chunks on demand so that cheap ignored rows (padding clusters at the end of a batch) or a busy core
// do not leave threads idle; each row is streamed once in L1-sized chunks with an online max /
// sum-exp. The inner loops are plain loops the compiler vectorizes, compiled for AVX-512, AVX2 and
// baseline x86-64 with runtime selection (target_clones); the AVX2 and SSE clones vectorize only
// with -fno-trapping-math (setup.py; tests/test_kernel_vectorized.py checks the built library).
// Math shared with CUDA: sparse_kl_math.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KD_F16C 1
#endif

#include <ATen/Parallel.h>
#include <omp.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "sparse_kl.h"
#include "sparse_kl_math.h"

namespace kdengine {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define KD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_CLONES
#endif
#define KD_INLINE inline __attribute__((always_inline))

// Elements per chunk of the online pass: 8 KiB of fp32, so the max pass and the exp pass over a
// chunk share L1.
constexpr int64_t kChunk = 2048;
// Rows per unit of work handed to a thread.
constexpr int64_t kRowsPerTask = 4;

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Conversions between float and bf16 / fp16 in a form the loop vectorizer takes: c10's scalar ones
// branch (NaN checks, denormal paths) and kept the bf16 / fp16 dense backward scalar (3.6x and 4.5x
// the fp32 forward+backward time on one thread) and the fp16 forward at 2x. Narrowing rounds to
// nearest even, as c10 does, with selects only.
KD_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

KD_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16: the top 16 bits, rounded; a NaN stays a quiet NaN.
KD_INLINE uint16_t bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(((u & 0x7FFFFFFFu) > 0x7F800000u ? (u | 0x00400000u) : rounded) >> 16);
}

// fp16 (F. Giesen's float_to_half_fast3_rtne): overflow to inf, NaN to a quiet NaN, subnormals
// rounded by a float add against a magic constant, normals by adding the rounding bias to the bits.
KD_INLINE uint16_t f16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u, a = u ^ sign;
  const uint32_t denorm_magic = ((127 - 15) + (23 - 10) + 1) << 23;
  const uint32_t inf_nan = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  const uint32_t denorm = float_bits(bits_float(a) + bits_float(denorm_magic)) - denorm_magic;
  const uint32_t normal = (a + (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= 0x47800000u ? inf_nan : a < 0x38800000u ? denorm : normal;
  return static_cast<uint16_t>(h | (sign >> 16));
}

template <typename scalar_t>
struct Store {
  static KD_INLINE void at(scalar_t* dx, int64_t j, float v) { dx[j] = static_cast<scalar_t>(v); }
};
template <>
struct Store<double> {
  static KD_INLINE void at(double* dx, int64_t j, double v) { dx[j] = v; }
};
template <>
struct Store<c10::BFloat16> {
  static KD_INLINE void at(c10::BFloat16* dx, int64_t j, float v) { reinterpret_cast<uint16_t*>(dx)[j] = bf16_bits(v); }
};

// fp16 -> float (the FP16 library's fp16_ieee_to_fp32_value, as selects).
KD_INLINE float f16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u, two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * bits_float(0x7800000u);  // * 2^-112
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_float(sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized)));
}

template <typename acc_t, typename scalar_t>
struct Load {
  static KD_INLINE acc_t at(const scalar_t* x, int64_t j) { return static_cast<acc_t>(x[j]); }
};
template <typename acc_t>
struct Load<acc_t, c10::BFloat16> {
  static KD_INLINE acc_t at(const c10::BFloat16* x, int64_t j) {
    return bits_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(x)[j]) << 16);
  }
};
template <typename acc_t>
struct Load<acc_t, c10::Half> {
  static KD_INLINE acc_t at(const c10::Half* x, int64_t j) { return f16_to_float(reinterpret_cast<const uint16_t*>(x)[j]); }
};

// fp16 rows are converted a chunk at a time into a float buffer that the passes then read: one
// conversion per element instead of one per pass, and in hardware (F16C: vcvtph2ps / vcvtps2ph, round
// to nearest even like f16_bits) where the CPU has it. Element by element, the bit-level conversions
// cost fp16 ~1.45x the fp32 forward+backward time on one thread.
using HalfToFloat = void (*)(const uint16_t*, float*, int64_t);
using FloatToHalf = void (*)(const float*, uint16_t*, int64_t);

KD_CLONES void half_to_float_bits(const uint16_t* h, float* f, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) f[i] = f16_to_float(h[i]);
}
KD_CLONES void float_to_half_bits(const float* f, uint16_t* h, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = f16_bits(f[i]);
}

#if defined(KD_F16C)
__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const uint16_t* h, float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
  for (; i < n; ++i) f[i] = _cvtsh_ss(h[i]);
}
__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* f, uint16_t* h, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) h[i] = _cvtss_sh(f[i], _MM_FROUND_TO_NEAREST_INT);
}
bool cpu_has_f16c() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }
#endif

struct HalfConversions {
  HalfToFloat to_float = half_to_float_bits;
  FloatToHalf to_half = float_to_half_bits;
  HalfConversions() {
#if defined(KD_F16C)
    // KDENGINE_NO_F16C=1 keeps the bit-level conversions (what a CPU without F16C runs), for the tests.
    if (cpu_has_f16c() && std::getenv("KDENGINE_NO_F16C") == nullptr) {
      to_float = half_to_float_f16c;
      to_half = float_to_half_f16c;
    }
#endif
  }
};
const HalfConversions& half_conversions() {
  static const HalfConversions conversions;
  return conversions;
}

// The chunk x[0, n) as the passes read it: the logits themselves, or for fp16 and bf16 a float copy
// in buf (bf16: one widening per element, then the fp32 loops; read in place, the forward took ~1.4x
// its fp32 time on one thread).
template <typename scalar_t>
struct ChunkOf {
  using type = scalar_t;
  static KD_INLINE const scalar_t* view(const scalar_t* x, int64_t, float*) { return x; }
};
template <>
struct ChunkOf<c10::BFloat16> {
  using type = float;
  static KD_INLINE const float* view(const c10::BFloat16* x, int64_t n, float* buf) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = Load<float, c10::BFloat16>::at(x, i);
    return buf;
  }
};
template <>
struct ChunkOf<c10::Half> {
  using type = float;
  static KD_INLINE const float* view(const c10::Half* x, int64_t n, float* buf) {
    half_conversions().to_float(reinterpret_cast<const uint16_t*>(x), buf, n);
    return buf;
  }
};

template <typename acc_t, typename scalar_t>
KD_INLINE acc_t max_of(const scalar_t* x, int64_t n) {
  acc_t m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    acc_t v = Load<acc_t, scalar_t>::at(x, i);
    m = v > m ? v : m;
  }
  return m;
}

// sum_i 2^(x_i * scale2 - sh); n <= 0 gives 0.
template <typename acc_t, typename scalar_t>
KD_INLINE acc_t sum_exp2(const scalar_t* x, int64_t n, acc_t scale2, acc_t sh) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp2_fast(Load<acc_t, scalar_t>::at(x, i) * scale2 - sh);
  return s;
}

// Sorted, in-range top-k ids of a row (the tail sum skips them); returns how many.
int64_t sorted_ids(const int32_t* idx, int64_t k, int64_t vocab, int32_t* out) {
  int64_t n = 0;
  for (int64_t i = 0; i < k; ++i)
    if (idx[i] >= 0 && idx[i] < vocab) out[n++] = idx[i];
  std::sort(out, out + n);
  return n;
}

template <typename scalar_t>
KD_INLINE void forward_row(const ForwardParams& p, int64_t r, int32_t* ids_buf) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t V = p.vocab, K = p.k;
  acc_t* stats = static_cast<acc_t*>(p.row_stats) + r * kRowStats;
  acc_t* topk_grad = static_cast<acc_t*>(p.topk_grad) + r * K;
  acc_t* loss = static_cast<acc_t*>(p.loss_rows) + r;
  const int64_t label = p.labels ? p.labels[r] : -1;
  if (p.labels && label == p.ignore_index) {
    *loss = 0;
    std::fill(stats, stats + kRowStats, acc_t(0));
    std::fill(topk_grad, topk_grad + K, acc_t(0));
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + r * p.logits_row_stride;
  const int32_t* idx = p.topk_idx + r * K;
  const acc_t* logp = static_cast<const acc_t*>(p.topk_logp) + r * K;
  const acc_t scale2 = exp_scale<acc_t>(p.temperature), l2e = exp_scale<acc_t>(1.0);
  const bool ce_separate = p.with_ce && p.temperature != 1.0;

  // One streaming pass: per chunk its max, then the exps against the running shift. With the tail
  // on, s skips the top-k ids (segments between the sorted ids) so that q_tail = s / S_T is exact.
  const int64_t n_ids = p.tail ? sorted_ids(idx, K, V, ids_buf) : 0;
  int64_t next_id = 0;
  OnlineSums<acc_t> st{-INFINITY, 0, 0};
  alignas(64) float chunk_buf[std::is_same<typename ChunkOf<scalar_t>::type, scalar_t>::value ? 1 : kChunk];
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, V);
    const auto* xc = ChunkOf<scalar_t>::view(x + c0, c1 - c0, chunk_buf);  // xc[j - c0] is x_j
    const acc_t cm = max_of<acc_t>(xc, c1 - c0);
    if (cm > st.m) {
      st.s *= rescale(st.m, cm, scale2);
      st.s1 *= rescale(st.m, cm, l2e);
      st.m = cm;
    }
    const acc_t sh = shift_of(st.m, scale2);
    if (p.tail) {
      int64_t pos = c0;
      for (; next_id < n_ids && ids_buf[next_id] < c1; ++next_id) {
        st.s += sum_exp2(xc + (pos - c0), ids_buf[next_id] - pos, scale2, sh);
        pos = std::max<int64_t>(pos, ids_buf[next_id] + 1);
      }
      st.s += sum_exp2(xc + (pos - c0), c1 - pos, scale2, sh);
    } else {
      st.s += sum_exp2(xc, c1 - c0, scale2, sh);
    }
    if (ce_separate) st.s1 += sum_exp2(xc, c1 - c0, l2e, shift_of(st.m, l2e));
  }

  const SerialCombine all;
  const acc_t sum_t = p.tail ? st.s + topk_exp_sum(x, idx, K, V, scale2, shift_of(st.m, scale2), 0, 1, all) : st.s;
  const acc_t sum_1 = ce_separate ? st.s1 : sum_t;
  KDRow kd{0.0, 1.0};
  if (p.with_kd) {
    const double log_q_tail = p.tail ? std::log(static_cast<double>(st.s)) - std::log(static_cast<double>(sum_t)) : 0.0;
    const double lse = p.tempered_lse ? static_cast<double>(static_cast<const acc_t*>(p.tempered_lse)[r]) : NAN;
    kd = kd_row(x, idx, logp, topk_grad, K, V, p.tail, p.temperature, static_cast<Divergence>(p.divergence), p.beta,
                lse, st.m, log_sum(sum_t, st.m, scale2), log_q_tail, 0, 1, all);
  } else {
    std::fill(topk_grad, topk_grad + K, acc_t(0));
  }
  double ce = 0.0;
  if (p.with_ce) ce = row_ce(st.m, (label >= 0 && label < V) ? static_cast<double>(x[label]) : NAN, sum_1);
  *loss = static_cast<acc_t>(row_loss(p.alpha, p.temperature, kd.kd, ce));
  stats[kStatMax] = st.m;
  stats[kStatSumT] = sum_t;
  stats[kStatSum1] = sum_1;
  stats[kStatCRest] = static_cast<acc_t>(kd.c_rest);
  stats[kStatKD] = static_cast<acc_t>(p.temperature * p.temperature * kd.kd);
  stats[kStatCE] = static_cast<acc_t>(ce);
}

template <bool kCeSep, typename scalar_t, typename acc_t>
KD_INLINE void dense_row(const scalar_t* x, scalar_t* dx, int64_t n, const DenseCoefs<acc_t>& c, acc_t scale2) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) Store<scalar_t>::at(dx, j, dense_grad<kCeSep>(Load<acc_t, scalar_t>::at(x, j), c, scale2));
}

template <bool kCeSep, typename acc_t>
KD_INLINE void dense_row(const c10::Half* x, c10::Half* dx, int64_t n, const DenseCoefs<acc_t>& c, acc_t scale2) {
  const HalfConversions& convert = half_conversions();
  alignas(64) float buf[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = std::min(kChunk, n - c0);
    convert.to_float(reinterpret_cast<const uint16_t*>(x + c0), buf, m);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) buf[j] = dense_grad<kCeSep>(buf[j], c, scale2);
    convert.to_half(buf, reinterpret_cast<uint16_t*>(dx + c0), m);
  }
}

template <typename scalar_t>
KD_INLINE void backward_row(const BackwardParams& p, int64_t r) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t V = p.vocab, K = p.k;
  scalar_t* dx = static_cast<scalar_t*>(p.grad_logits) + r * V;
  const int64_t label = p.labels ? p.labels[r] : -1;
  const double w = static_cast<const acc_t*>(p.grad_rows)[r];
  if ((p.labels && label == p.ignore_index) || w == 0.0) {
    std::fill(dx, dx + V, scalar_t(0));
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + r * p.logits_row_stride;
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats) + r * kRowStats;
  const acc_t scale2 = exp_scale<acc_t>(p.temperature);
  const DenseCoefs<acc_t> c = dense_coefs(stats, w, p.alpha, p.temperature, p.with_ce, scale2);
  if (c.ce_separate)
    dense_row<true>(x, dx, V, c, scale2);
  else
    dense_row<false>(x, dx, V, c, scale2);

  // The top-k ids and the label get their full value, computed once in the accumulation type.
  const int32_t* idx = p.topk_idx + r * K;
  const acc_t* topk_grad = static_cast<const acc_t*>(p.topk_grad) + r * K;
  bool label_in_topk = false;
  for (int64_t i = 0; i < K; ++i) {
    const int32_t id = idx[i];
    if (id < 0 || id >= V) continue;
    const bool is_label = p.with_ce && id == label;
    label_in_topk |= is_label;
    dx[id] = static_cast<scalar_t>(sparse_grad(static_cast<acc_t>(x[id]), w, p.alpha, p.temperature, p.with_ce,
                                               topk_grad[i], is_label, stats));
  }
  if (p.with_ce && !label_in_topk && label >= 0 && label < V) {
    const acc_t xl = static_cast<acc_t>(x[label]);
    const acc_t dense = c.ce_separate ? dense_grad<true>(xl, c, scale2) : dense_grad<false>(xl, c, scale2);
    dx[label] = static_cast<scalar_t>(dense - static_cast<acc_t>(w * (1.0 - p.alpha)));
  }
}

template <typename scalar_t>
KD_INLINE void forward_rows(const ForwardParams& p, int64_t begin, int64_t end, int32_t* ids_buf) {
  for (int64_t r = begin; r < end; ++r) forward_row<scalar_t>(p, r, ids_buf);
}

template <typename scalar_t>
KD_INLINE void backward_rows(const BackwardParams& p, int64_t begin, int64_t end, int32_t*) {
  for (int64_t r = begin; r < end; ++r) backward_row<scalar_t>(p, r);
}

// One cloned (per-ISA) entry per dtype; the templates above are inlined into each clone.
KD_CLONES void forward_rows_f32(const ForwardParams& p, int64_t b, int64_t e, int32_t* buf) {
  forward_rows<float>(p, b, e, buf);
}
KD_CLONES void forward_rows_bf16(const ForwardParams& p, int64_t b, int64_t e, int32_t* buf) {
  forward_rows<c10::BFloat16>(p, b, e, buf);
}
KD_CLONES void forward_rows_f16(const ForwardParams& p, int64_t b, int64_t e, int32_t* buf) {
  forward_rows<c10::Half>(p, b, e, buf);
}
void forward_rows_f64(const ForwardParams& p, int64_t b, int64_t e, int32_t* buf) { forward_rows<double>(p, b, e, buf); }
KD_CLONES void backward_rows_f32(const BackwardParams& p, int64_t b, int64_t e, int32_t* buf) {
  backward_rows<float>(p, b, e, buf);
}
KD_CLONES void backward_rows_bf16(const BackwardParams& p, int64_t b, int64_t e, int32_t* buf) {
  backward_rows<c10::BFloat16>(p, b, e, buf);
}
KD_CLONES void backward_rows_f16(const BackwardParams& p, int64_t b, int64_t e, int32_t* buf) {
  backward_rows<c10::Half>(p, b, e, buf);
}
void backward_rows_f64(const BackwardParams& p, int64_t b, int64_t e, int32_t* buf) {
  backward_rows<double>(p, b, e, buf);
}

// Rows in tasks of kRowsPerTask, dynamically scheduled; each thread owns a K-long id buffer.
template <typename Params, typename RowsFn>
void run_rows(const Params& p, int64_t buf_len, RowsFn rows) {
  const int64_t n_tasks = (p.n_rows + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = at::in_parallel_region() ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_tasks));
#pragma omp parallel num_threads(threads)
  {
    std::vector<int32_t> buf(buf_len);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tasks; ++t)
      rows(p, t * kRowsPerTask, std::min(p.n_rows, (t + 1) * kRowsPerTask), buf.data());
  }
}

// The backward writes a fresh [N, V] gradient, and first-touch page faults on it cost more than the
// math (4 KiB pages: ~200k faults for 800 MB). Where transparent huge pages are opt-in (madvise mode),
// ask for them on the 2 MiB-aligned middle of the buffer, so it faults once per 2 MiB.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
}

int64_t element_size(Dtype dtype) {
  return dtype == Dtype::kFloat32 ? 4 : dtype == Dtype::kFloat64 ? 8 : 2;
}

}  // namespace

void sparse_kl_forward_cpu(const ForwardParams& p, Dtype dtype) {
  auto rows = dtype == Dtype::kFloat32    ? forward_rows_f32
              : dtype == Dtype::kBFloat16 ? forward_rows_bf16
              : dtype == Dtype::kFloat16  ? forward_rows_f16
                                          : forward_rows_f64;
  run_rows(p, p.tail ? p.k : 0, rows);
}

void sparse_kl_backward_cpu(const BackwardParams& p, Dtype dtype) {
  auto rows = dtype == Dtype::kFloat32    ? backward_rows_f32
              : dtype == Dtype::kBFloat16 ? backward_rows_bf16
              : dtype == Dtype::kFloat16  ? backward_rows_f16
                                          : backward_rows_f64;
  advise_huge_pages(p.grad_logits, p.n_rows * p.vocab * element_size(dtype));
  run_rows(p, 0, rows);
}

}  // namespace kdengine
