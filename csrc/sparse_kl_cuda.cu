// CUDA sparse KL: one 256-thread block per row. No torch headers (plain nvcc compiles this file).
//
// Forward: the block streams its row once with 16-byte loads (4 fp32 / 8 bf16 or fp16 logits),
// keeping an online max and sum of exps per thread, merged by warp shuffles and shared memory. With
// the tail bucket the top-k ids are first set in a shared-memory bitmap (V bits) so that the sum
// over non-top-k entries is accumulated directly. Warp 0 then gathers the K student logits and does
// the teacher-side math (double) and writes the per-row loss and statistics.
// Backward: the block writes dX for its row in one pass (16-byte loads and stores), then overwrites
// the K top-k entries and the label with their exact values.
// Shared per-element/per-row math: sparse_kl_math.h (the same code the CPU kernel runs).
#ifndef KDENGINE_WITH_CUDA
#define KDENGINE_WITH_CUDA
#endif

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sparse_kl.h"
#include "sparse_kl_math.h"

namespace kdengine {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[Vec<T>::kN]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kN; ++i) out[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&in)[Vec<T>::kN]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kN; ++i) e[i] = from_float<T>(in[i]);
  return raw;
}

// Elements before the first 16-byte boundary of a row (rows need not be aligned: V is arbitrary).
template <typename T>
__device__ __forceinline__ int64_t head_elements(const T* row, int64_t vocab) {
  const int64_t head = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / sizeof(T);
  return head < vocab ? head : vocab;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Combines a per-lane value over the warp (sum_k / max_k in the shared per-row epilogue).
struct WarpCombine {
  template <typename V>
  __device__ __forceinline__ V sum(V v) const { return warp_sum(v); }
  __device__ __forceinline__ double max(double v) const { return warp_max(v); }
};

__device__ __forceinline__ OnlineSums<float> warp_merge(OnlineSums<float> st, float scale2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const OnlineSums<float> other{__shfl_xor_sync(kFullMask, st.m, off), __shfl_xor_sync(kFullMask, st.s, off),
                                  __shfl_xor_sync(kFullMask, st.s1, off)};
    st = merge_sums(st, other, scale2);
  }
  return st;
}

// Bits [j, j + n) of the top-k bitmap, n <= 8; the bitmap has two spare words at its end.
__device__ __forceinline__ uint32_t topk_bits_at(const uint32_t* bitmap, int64_t j, int n) {
  const uint64_t both = bitmap[j >> 5] | (static_cast<uint64_t>(bitmap[(j >> 5) + 1]) << 32);
  return static_cast<uint32_t>(both >> (j & 31)) & ((1u << n) - 1u);
}

// Per-thread online state over the elements it sees.
template <bool kTail, bool kCeSep>
struct RowScan {
  OnlineSums<float> st{-INFINITY, 0.f, 0.f};
  float sh = 0.f, sh1 = 0.f;  // shifts of st.m at T and at T = 1
  float scale2, l2e;

  __device__ __forceinline__ void raise_max(float new_max) {
    if (new_max > st.m) {
      st.s *= rescale(st.m, new_max, scale2);
      if (kCeSep) st.s1 *= rescale(st.m, new_max, l2e);
      st.m = new_max;
      sh = shift_of(new_max, scale2);
      sh1 = shift_of(new_max, l2e);
    }
  }

  // Adds n values (already covered by raise_max); bit i of `skip` set = a top-k id (tail sum skips it).
  __device__ __forceinline__ void add(const float* v, int n, uint32_t skip) {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const float e = exp2_fast(fmaf(v[i], scale2, -sh));
      st.s += (kTail && ((skip >> i) & 1u)) ? 0.f : e;
      if (kCeSep) st.s1 += exp2_fast(fmaf(v[i], l2e, -sh1));
    }
  }
};

template <typename T, bool kTail, bool kCeSep>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams p) {
  extern __shared__ uint32_t topk_bitmap[];  // kTail: (V + 31) / 32 + 2 words
  __shared__ OnlineSums<float> warp_sums[kWarps];
  constexpr int kN = Vec<T>::kN;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t V = p.vocab, K = p.k;
  float* stats = static_cast<float*>(p.row_stats) + r * kRowStats;
  float* topk_grad = static_cast<float*>(p.topk_grad) + r * K;
  const int64_t label = p.labels ? p.labels[r] : -1;
  if (p.labels && label == p.ignore_index) {
    if (tid == 0) {
      static_cast<float*>(p.loss_rows)[r] = 0.f;
      for (int i = 0; i < kRowStats; ++i) stats[i] = 0.f;
    }
    for (int64_t k = tid; k < K; k += kThreads) topk_grad[k] = 0.f;
    return;
  }
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const int32_t* idx = p.topk_idx + r * K;

  if (kTail) {
    const int64_t words = (V + 31) / 32 + 2;
    for (int64_t w = tid; w < words; w += kThreads) topk_bitmap[w] = 0u;
    __syncthreads();
    for (int64_t k = tid; k < K; k += kThreads) {
      const int32_t id = idx[k];
      if (id >= 0 && id < V) atomicOr(&topk_bitmap[id >> 5], 1u << (id & 31));
    }
    __syncthreads();
  }

  RowScan<kTail, kCeSep> scan;
  scan.scale2 = exp_scale<float>(p.temperature);
  scan.l2e = exp_scale<float>(1.0);
  // The unaligned head and the remainder, at most 2 (kN - 1) single elements, then the aligned body.
  const int64_t head = head_elements(x, V);
  const int64_t n_vec = (V - head) / kN;
  const int64_t body_end = head + n_vec * kN;
  if (tid < head + (V - body_end)) {
    const int64_t j = tid < head ? tid : body_end + (tid - head);
    const float v = to_float(x[j]);
    scan.raise_max(v);
    scan.add(&v, 1, kTail ? topk_bits_at(topk_bitmap, j, 1) : 0u);
  }
  const uint4* body = reinterpret_cast<const uint4*>(x + head);
  for (int64_t base = tid; base < n_vec; base += kThreads * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < n_vec) raw[u] = body[i];
    }
    float v[kUnroll][kN];
    float group_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kThreads < n_vec) {
        unpack<T>(raw[u], v[u]);
#pragma unroll
        for (int i = 0; i < kN; ++i) group_max = fmaxf(group_max, v[u][i]);
      }
    }
    scan.raise_max(group_max);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < n_vec) scan.add(v[u], kN, kTail ? topk_bits_at(topk_bitmap, head + i * kN, kN) : 0u);
    }
  }

  // Block merge: warps by shuffles, then warp 0 over the warps; every lane of warp 0 ends with the row's sums.
  OnlineSums<float> st = warp_merge(scan.st, scan.scale2);
  if (lane == 0) warp_sums[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  st = lane < kWarps ? warp_sums[lane] : OnlineSums<float>{-INFINITY, 0.f, 0.f};
  st = warp_merge(st, scan.scale2);

  const WarpCombine all;
  const float scale2 = scan.scale2;
  const float sum_t = kTail ? st.s + topk_exp_sum(x, idx, K, V, scale2, shift_of(st.m, scale2), lane, 32, all) : st.s;
  const float sum_1 = kCeSep ? st.s1 : sum_t;
  const float* logp = static_cast<const float*>(p.topk_logp) + r * K;
  KDRow kd{0.0, 1.0};
  if (p.with_kd) {
    const double log_q_tail = kTail ? log(static_cast<double>(st.s)) - log(static_cast<double>(sum_t)) : 0.0;
    const double lse = p.tempered_lse ? static_cast<double>(static_cast<const float*>(p.tempered_lse)[r]) : NAN;
    kd = kd_row(x, idx, logp, topk_grad, K, V, kTail, p.temperature, static_cast<Divergence>(p.divergence), p.beta, lse,
                st.m, log_sum(sum_t, st.m, scale2), log_q_tail, lane, 32, all);
  } else {
    for (int64_t k = lane; k < K; k += 32) topk_grad[k] = 0.f;
  }
  if (lane == 0) {
    double ce = 0.0;
    if (p.with_ce) ce = row_ce(st.m, (label >= 0 && label < V) ? static_cast<double>(to_float(x[label])) : NAN, sum_1);
    static_cast<float*>(p.loss_rows)[r] = static_cast<float>(row_loss(p.alpha, p.temperature, kd.kd, ce));
    stats[kStatMax] = st.m;
    stats[kStatSumT] = sum_t;
    stats[kStatSum1] = sum_1;
    stats[kStatCRest] = static_cast<float>(kd.c_rest);
    stats[kStatKD] = static_cast<float>(p.temperature * p.temperature * kd.kd);
    stats[kStatCE] = static_cast<float>(ce);
  }
}

template <typename T, bool kCeSep>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardParams p) {
  __shared__ int label_in_topk;
  constexpr int kN = Vec<T>::kN;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t V = p.vocab, K = p.k;
  T* dx = static_cast<T*>(p.grad_logits) + r * V;
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const float* stats = static_cast<const float*>(p.row_stats) + r * kRowStats;
  const int64_t label = p.labels ? p.labels[r] : -1;
  const double w = static_cast<const float*>(p.grad_rows)[r];
  const bool zero_row = (p.labels && label == p.ignore_index) || w == 0.0;
  if (tid == 0) label_in_topk = 0;

  const float scale2 = exp_scale<float>(p.temperature);
  DenseCoefs<float> c{0.f, 0.f, 0.f, 0.f, false};
  if (!zero_row) c = dense_coefs(stats, w, p.alpha, p.temperature, p.with_ce, scale2);
  // Ignored rows (and rows whose loss has zero weight) only write zeros.
  auto value_at = [&](int64_t j) {
    return from_float<T>(zero_row ? 0.f : dense_grad<kCeSep>(to_float(x[j]), c, scale2));
  };
  if ((reinterpret_cast<uintptr_t>(x) & 15) != (reinterpret_cast<uintptr_t>(dx) & 15)) {
    // x and dx misaligned differently (a strided logits view): no common vector path.
    for (int64_t j = tid; j < V; j += kThreads) dx[j] = value_at(j);
  } else {
    const int64_t head = head_elements(x, V);
    const int64_t n_vec = (V - head) / kN;
    const int64_t body_end = head + n_vec * kN;
    if (tid < head + (V - body_end)) {
      const int64_t j = tid < head ? tid : body_end + (tid - head);
      dx[j] = value_at(j);
    }
    const uint4* body_x = reinterpret_cast<const uint4*>(x + head);
    uint4* body_dx = reinterpret_cast<uint4*>(dx + head);
    for (int64_t base = tid; base < n_vec; base += kThreads * kUnroll) {
      uint4 raw[kUnroll];
      if (!zero_row) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + u * kThreads;
          if (i < n_vec) raw[u] = body_x[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i >= n_vec) continue;
        float v[kN];
        if (zero_row) {
#pragma unroll
          for (int e = 0; e < kN; ++e) v[e] = 0.f;
        } else {
          unpack<T>(raw[u], v);
#pragma unroll
          for (int e = 0; e < kN; ++e) v[e] = dense_grad<kCeSep>(v[e], c, scale2);
        }
        body_dx[i] = pack<T>(v);
      }
    }
  }
  if (zero_row) return;  // uniform across the block

  __syncthreads();  // the dense values are written; now the top-k ids and the label get their exact values
  const int32_t* idx = p.topk_idx + r * K;
  const float* topk_grad = static_cast<const float*>(p.topk_grad) + r * K;
  for (int64_t k = tid; k < K; k += kThreads) {
    const int32_t id = idx[k];
    if (id < 0 || id >= V) continue;
    const bool is_label = p.with_ce && id == label;
    if (is_label) label_in_topk = 1;
    dx[id] = from_float<T>(
        sparse_grad(to_float(x[id]), w, p.alpha, p.temperature, p.with_ce, topk_grad[k], is_label, stats));
  }
  __syncthreads();
  if (tid == 0 && p.with_ce && !label_in_topk && label >= 0 && label < V) {
    const float v = dense_grad<kCeSep>(to_float(x[label]), c, scale2);
    dx[label] = from_float<T>(v - static_cast<float>(w * (1.0 - p.alpha)));
  }
}

template <typename T, bool kTail, bool kCeSep>
cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream) {
  const size_t smem = kTail ? static_cast<size_t>((p.vocab + 31) / 32 + 2) * sizeof(uint32_t) : 0;
  auto kernel = forward_kernel<T, kTail, kCeSep>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(p.n_rows), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_for(const ForwardParams& p, cudaStream_t stream) {
  const bool ce_sep = p.with_ce && p.temperature != 1.0;
  if (p.tail) return ce_sep ? launch_forward<T, true, true>(p, stream) : launch_forward<T, true, false>(p, stream);
  return ce_sep ? launch_forward<T, false, true>(p, stream) : launch_forward<T, false, false>(p, stream);
}

template <typename T>
cudaError_t backward_for(const BackwardParams& p, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(p.n_rows);
  if (p.with_ce && p.temperature != 1.0)
    backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  else
    backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse_kl_forward_cuda(const ForwardParams& p, Dtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return forward_for<float>(p, stream);
    case Dtype::kBFloat16: return forward_for<__nv_bfloat16>(p, stream);
    case Dtype::kFloat16: return forward_for<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t sparse_kl_backward_cuda(const BackwardParams& p, Dtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return backward_for<float>(p, stream);
    case Dtype::kBFloat16: return backward_for<__nv_bfloat16>(p, stream);
    case Dtype::kFloat16: return backward_for<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

int64_t sparse_kl_cuda_max_tail_vocab(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
  const int64_t static_bytes = 1024;  // the block's static shared memory, rounded up
  return (static_cast<int64_t>(optin) - static_bytes) / static_cast<int64_t>(sizeof(uint32_t)) * 32 - 64;
}

}  // namespace kdengine
