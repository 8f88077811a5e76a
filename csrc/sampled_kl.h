// Parameters and entry points of the sampled-target (RS-KD) KL forward kernels. The backward is the
// sparse KL backward (sparse_kl.h's BackwardParams): the sampled loss's gradient has the same shape,
// a dense coefficient per row plus K sparse entries (see kdengine/losses/sampled_reference.py).
#pragma once

#include <cstdint>

#include "sparse_kl.h"

namespace kdengine {

struct SampledForwardParams {
  const void* logits;            // [N, V] logits dtype, unit stride along V
  int64_t logits_row_stride;     // in elements
  const int32_t* sample_idx;     // [N, K] contiguous; a slot with an id outside [0, V) or count 0 is padding
  const void* sample_count;      // [N, K] acc type, >= 0
  const void* target_logp;       // [N, K] acc type: log p^T of the ids
  const void* proposal_logp;     // [N, K] acc type: log r of the ids, or nullptr (proposal = p^T)
  const int64_t* labels;         // [N] or nullptr (every row counts)
  int64_t n_rows, vocab, k;
  double temperature, alpha;     // alpha == 0 is passed with temperature 1
  int64_t ignore_index;
  bool with_ce;                  // alpha < 1: compute CE against labels
  void* loss_rows;               // out [N]
  void* row_stats;               // out [N, kRowStats]: max, S_T, S_1, S (the weights' sum, as c_rest)
  void* sample_grad;             // out [N, K]: S q_k - w_k (0 at padding slots)
};

void sampled_kl_forward_cpu(const SampledForwardParams& p, Dtype dtype);

}  // namespace kdengine

#if defined(KDENGINE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kdengine {
// Launch on `stream`; return the launch error (cudaSuccess when none). Float64 is not supported.
cudaError_t sampled_kl_forward_cuda(const SampledForwardParams& p, Dtype dtype, cudaStream_t stream);
}  // namespace kdengine
#endif
