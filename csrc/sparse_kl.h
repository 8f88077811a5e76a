// Plain parameter structs and entry points of the sparse KL kernels. bindings.cpp is the only file
// that touches torch tensors: it checks them, fills these structs and calls the CPU or CUDA entry.
#pragma once

#include <cstdint>

namespace kdengine {

enum class Dtype { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Accumulation ("acc") type of the kernels: double for float64 logits (CPU only, for gradcheck),
// float otherwise. Every per-row output below is in the acc type.
struct ForwardParams {
  const void* logits;            // [N, V] logits dtype, unit stride along V
  int64_t logits_row_stride;     // in elements
  const int32_t* topk_idx;       // [N, K] contiguous
  const void* topk_logp;         // [N, K] contiguous, acc type
  const int64_t* labels;         // [N] or nullptr (every row counts)
  int64_t n_rows, vocab, k;
  double temperature, alpha;     // without KD the pass runs at temperature 1 with the tail off
  int64_t ignore_index;
  bool tail;                     // add the tail bucket to the KD term
  bool with_kd;                  // compute KD: alpha > 0, or its part is wanted for logging
  bool with_ce;                  // compute CE against labels: alpha < 1, or its part is wanted
  int32_t divergence;            // Divergence (sparse_kl_math.h): 0 fkl, 1 rkl, 2 jsd
  double beta;                   // the jsd mixture weight
  const void* tempered_lse;      // [N] acc type or nullptr: the teacher's c_T (exact tempered tail)
  void* loss_rows;               // out [N]: loss_row (0 for ignored rows)
  void* row_stats;               // out [N, kRowStats]: max, S_T, S_1, c_rest, KD part, CE part
  void* topk_grad;               // out [N, K]: c_top * q_k - p_k (the KD gradient at the top-k ids, / T)
};

struct BackwardParams {
  const void* logits;            // [N, V] as in the forward
  int64_t logits_row_stride;
  const int32_t* topk_idx;       // [N, K]
  const int64_t* labels;         // [N] or nullptr
  const void* grad_rows;         // [N] acc type: d(total loss) / d(loss_row)
  const void* row_stats;         // [N, kRowStats] from the forward
  const void* topk_grad;         // [N, K] from the forward
  int64_t n_rows, vocab, k;
  double temperature, alpha;
  int64_t ignore_index;
  bool with_ce;
  void* grad_logits;             // out [N, V] contiguous, logits dtype
};

void sparse_kl_forward_cpu(const ForwardParams& p, Dtype dtype);
void sparse_kl_backward_cpu(const BackwardParams& p, Dtype dtype);

}  // namespace kdengine

#if defined(KDENGINE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kdengine {
// Launch on `stream`; return the launch error (cudaSuccess when none). Float64 is not supported.
cudaError_t sparse_kl_forward_cuda(const ForwardParams& p, Dtype dtype, cudaStream_t stream);
cudaError_t sparse_kl_backward_cuda(const BackwardParams& p, Dtype dtype, cudaStream_t stream);
// The largest vocabulary the forward with the tail bucket can take (its top-k bitmap lives in shared memory).
int64_t sparse_kl_cuda_max_tail_vocab(int device);
}  // namespace kdengine
#endif
