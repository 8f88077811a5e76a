// CUDA sampled-target KL forward: one 256-thread block per row. Each thread keeps an online max /
// sum-exp over a strided share of the row (8 logits at a time), the block merges them (warp
// shuffles, then shared memory), and warp 0 runs the teacher-side epilogue of sampled_kl_math.h over
// the K drawn ids. The backward is sparse_kl_backward_cuda (same gradient shape).
// Compile-checked by scripts/check_cuda_compile.sh; no torch headers.
#ifndef KDENGINE_WITH_CUDA
#define KDENGINE_WITH_CUDA
#endif

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sampled_kl.h"
#include "sampled_kl_math.h"

namespace kdengine {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;  // logits per max update
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

struct WarpSum {
  template <typename V>
  __device__ __forceinline__ V sum(V v) const {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
  }
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

template <typename T, bool kCeSep>
__global__ void __launch_bounds__(kThreads) sampled_forward_kernel(const SampledForwardParams p) {
  __shared__ OnlineSums<float> warp_sums[kWarps];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t V = p.vocab, K = p.k;
  float* stats = static_cast<float*>(p.row_stats) + r * kRowStats;
  float* grad = static_cast<float*>(p.sample_grad) + r * K;
  const int64_t label = p.labels ? p.labels[r] : -1;
  if (p.labels && label == p.ignore_index) {
    if (tid == 0) {
      static_cast<float*>(p.loss_rows)[r] = 0.f;
      for (int i = 0; i < kRowStats; ++i) stats[i] = 0.f;
    }
    for (int64_t k = tid; k < K; k += kThreads) grad[k] = 0.f;
    return;
  }
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const float scale2 = exp_scale<float>(p.temperature), l2e = exp_scale<float>(1.0);

  // Thread tid reads the groups tid, tid + kThreads, ...: group g covers [g kGroup, (g + 1) kGroup).
  OnlineSums<float> st{-INFINITY, 0.f, 0.f};
  for (int64_t g0 = static_cast<int64_t>(tid) * kGroup; g0 < V; g0 += static_cast<int64_t>(kThreads) * kGroup) {
    float v[kGroup];
    float gm = -INFINITY;
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      v[i] = g0 + i < V ? to_float(x[g0 + i]) : -INFINITY;
      gm = fmaxf(gm, v[i]);
    }
    if (gm > st.m) {
      st.s *= rescale(st.m, gm, scale2);
      if (kCeSep) st.s1 *= rescale(st.m, gm, l2e);
      st.m = gm;
    }
    const float sh = shift_of(st.m, scale2), sh1 = shift_of(st.m, l2e);
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      st.s += exp2_fast(fmaf(v[i], scale2, -sh));
      if (kCeSep) st.s1 += exp2_fast(fmaf(v[i], l2e, -sh1));
    }
  }
  st = warp_merge(st, scale2);
  if (lane == 0) warp_sums[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  st = lane < kWarps ? warp_sums[lane] : OnlineSums<float>{-INFINITY, 0.f, 0.f};
  st = warp_merge(st, scale2);

  const float sum_1 = kCeSep ? st.s1 : st.s;
  SampledRow kd{0.0, 1.0};
  if (p.alpha > 0.0) {
    const int64_t off = r * K;
    const float* proposal = p.proposal_logp ? static_cast<const float*>(p.proposal_logp) + off : nullptr;
    kd = sampled_kd_row(x, p.sample_idx + off, static_cast<const float*>(p.sample_count) + off,
                        static_cast<const float*>(p.target_logp) + off, proposal, grad, K, V, p.temperature,
                        static_cast<double>(st.m), log_sum(st.s, st.m, scale2), lane, 32, WarpSum{});
  } else {
    for (int64_t k = lane; k < K; k += 32) grad[k] = 0.f;
  }
  if (lane == 0) {
    double ce = 0.0;
    if (p.with_ce) ce = row_ce(st.m, (label >= 0 && label < V) ? static_cast<double>(to_float(x[label])) : NAN, sum_1);
    static_cast<float*>(p.loss_rows)[r] = static_cast<float>(row_loss(p.alpha, p.temperature, kd.kd, ce));
    stats[kStatMax] = st.m;
    stats[kStatSumT] = st.s;
    stats[kStatSum1] = sum_1;
    stats[kStatCRest] = static_cast<float>(kd.s);
  }
}

template <typename T>
cudaError_t forward_for(const SampledForwardParams& p, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(p.n_rows);
  if (p.with_ce && p.temperature != 1.0)
    sampled_forward_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  else
    sampled_forward_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sampled_kl_forward_cuda(const SampledForwardParams& p, Dtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return forward_for<float>(p, stream);
    case Dtype::kBFloat16: return forward_for<__nv_bfloat16>(p, stream);
    case Dtype::kFloat16: return forward_for<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kdengine
