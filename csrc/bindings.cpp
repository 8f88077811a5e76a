// The only file that handles torch tensors and Python objects: checks them (naming the argument,
// expected vs got), fills the plain params structs of sparse_kl.h and dispatches to the CPU or CUDA
// kernels; the store's top-k coder is bound in topk_codec_bindings.cpp. User-facing
// validation (ValueError with row numbers) lives in kdengine/losses/sparse_kl.py and
// kdengine/store/codec.py; these checks guard the raw ops.
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/extension.h>

#include "sparse_kl.h"
#include "sparse_kl_math.h"
#include "sampled_kl.h"
#include "topk_codec_bindings.h"

#if defined(KDENGINE_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace kdengine {
namespace {

#define CHECK_ARG(cond, name, expected, got) \
  TORCH_CHECK(cond, "sparse_kl: ", name, " must be ", expected, ", got ", got)

Dtype dtype_of(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    default:
      TORCH_CHECK(false, "sparse_kl: logits must be float32, bfloat16, float16 (or float64 on CPU), got ",
                  logits.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const at::Tensor& logits) {
  CHECK_ARG(logits.dim() == 2, "logits", "2-D [N, V]", logits.sizes());
  CHECK_ARG(logits.stride(1) == 1 || logits.size(1) == 1, "logits", "unit-stride along V (stride(1) == 1)",
            logits.strides());
  dtype_of(logits);
#if defined(KDENGINE_WITH_CUDA)
  CHECK_ARG(logits.is_cpu() || logits.is_cuda(), "logits", "on CPU or CUDA", logits.device());
  CHECK_ARG(!(logits.is_cuda() && logits.scalar_type() == at::kDouble), "CUDA logits", "float32/bfloat16/float16",
            logits.scalar_type());
#else
  CHECK_ARG(logits.is_cpu(), "logits", "on CPU (this build of kdengine has no CUDA kernels)", logits.device());
#endif
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& logits, at::ScalarType dtype,
                int64_t cols) {
  CHECK_ARG(t.device() == logits.device(), name, std::string("on ") + logits.device().str(), t.device());
  CHECK_ARG(t.scalar_type() == dtype, name, dtype, t.scalar_type());
  CHECK_ARG(t.is_contiguous(), name, "contiguous", t.strides());
  if (cols < 0) {
    CHECK_ARG(t.dim() == 1 && t.size(0) == logits.size(0), name, "[N] with N = " + std::to_string(logits.size(0)),
              t.sizes());
  } else {
    CHECK_ARG(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == cols, name,
              "[N, " + std::to_string(cols) + "] with N = " + std::to_string(logits.size(0)), t.sizes());
  }
}

// Without KD (alpha == 0 and no KD part wanted) only cross-entropy is left: the pass then runs at
// T = 1 without the tail bucket. The backward's dense pass needs T only for the KD term.
double effective_temperature(bool with_kd, double temperature) { return with_kd ? temperature : 1.0; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& topk_idx,
                                                       const at::Tensor& topk_logp,
                                                       const std::optional<at::Tensor>& labels, bool tail,
                                                       double alpha, double temperature, int64_t ignore_index,
                                                       int64_t divergence, double beta,
                                                       const std::optional<at::Tensor>& tempered_lse, bool parts) {
  check_logits(logits);
  const int64_t k = topk_idx.dim() == 2 ? topk_idx.size(1) : -1;
  CHECK_ARG(topk_idx.dim() == 2, "topk_idx", "2-D [N, K]", topk_idx.sizes());
  check_rows(topk_idx, "topk_idx", logits, at::kInt, k);
  check_rows(topk_logp, "topk_logp", logits, acc_type(logits), k);
  CHECK_ARG(labels.has_value() || alpha >= 1.0, "labels", "given when alpha < 1", "None");
  const bool with_ce = alpha < 1.0 || (parts && labels.has_value());
  const bool with_kd = alpha > 0.0 || parts;
  if (labels.has_value()) check_rows(*labels, "labels", logits, at::kLong, -1);
  if (tempered_lse.has_value()) check_rows(*tempered_lse, "tempered_lse", logits, acc_type(logits), -1);
  CHECK_ARG(temperature > 0.0, "temperature", "> 0", temperature);
  CHECK_ARG(alpha >= 0.0 && alpha <= 1.0, "alpha", "in [0, 1]", alpha);
  CHECK_ARG(divergence >= 0 && divergence <= 2, "divergence", "0 (fkl), 1 (rkl) or 2 (jsd)", divergence);
  CHECK_ARG(beta > 0.0 && beta < 1.0, "beta", "in (0, 1)", beta);
  CHECK_ARG(divergence == 0 || tail || !with_kd, "tail", "true for rkl and jsd", "false");

  const int64_t n = logits.size(0);
  auto opts = logits.options().dtype(acc_type(logits));
  at::Tensor loss_rows = at::empty({n}, opts);
  at::Tensor row_stats = at::empty({n, kRowStats}, opts);
  at::Tensor topk_grad = at::empty({n, k}, opts);
  if (n == 0) return {loss_rows, row_stats, topk_grad};

  ForwardParams p{};
  p.logits = logits.data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.topk_idx = topk_idx.data_ptr<int32_t>();
  p.topk_logp = topk_logp.data_ptr();
  p.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  p.n_rows = n;
  p.vocab = logits.size(1);
  p.k = k;
  p.temperature = effective_temperature(with_kd, temperature);
  p.alpha = alpha;
  p.ignore_index = ignore_index;
  p.tail = tail && with_kd;
  p.with_kd = with_kd;
  p.with_ce = with_ce;
  p.divergence = static_cast<int32_t>(divergence);
  p.beta = beta;
  p.tempered_lse = tempered_lse.has_value() ? tempered_lse->data_ptr() : nullptr;
  p.loss_rows = loss_rows.data_ptr();
  p.row_stats = row_stats.data_ptr();
  p.topk_grad = topk_grad.data_ptr();
  if (logits.is_cpu()) {
    sparse_kl_forward_cpu(p, dtype_of(logits));
  } else {
#if defined(KDENGINE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(logits.device());
    if (p.tail) {
      const int64_t max_vocab = sparse_kl_cuda_max_tail_vocab(logits.get_device());
      CHECK_ARG(p.vocab <= max_vocab, "V (logits.size(1)) with tail=True on this GPU",
                "<= " + std::to_string(max_vocab), p.vocab);
    }
    const cudaError_t err = sparse_kl_forward_cuda(p, dtype_of(logits), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "sparse_kl: CUDA forward launch failed: ", cudaGetErrorString(err));
#endif
  }
  return {loss_rows, row_stats, topk_grad};
}

at::Tensor backward(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& topk_idx,
                    const std::optional<at::Tensor>& labels, const at::Tensor& row_stats,
                    const at::Tensor& topk_grad, double alpha, double temperature, int64_t ignore_index) {
  check_logits(logits);
  CHECK_ARG(topk_idx.dim() == 2, "topk_idx", "2-D [N, K]", topk_idx.sizes());
  const int64_t k = topk_idx.size(1);
  check_rows(topk_idx, "topk_idx", logits, at::kInt, k);
  check_rows(grad_rows, "grad_rows", logits, acc_type(logits), -1);
  check_rows(row_stats, "row_stats", logits, acc_type(logits), kRowStats);
  check_rows(topk_grad, "topk_grad", logits, acc_type(logits), k);
  const bool with_ce = alpha < 1.0;
  CHECK_ARG(labels.has_value() || !with_ce, "labels", "given when alpha < 1", "None");
  if (labels.has_value()) check_rows(*labels, "labels", logits, at::kLong, -1);

  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.size(0) == 0) return grad_logits;
  BackwardParams p{};
  p.logits = logits.data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.topk_idx = topk_idx.data_ptr<int32_t>();
  p.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  p.grad_rows = grad_rows.data_ptr();
  p.row_stats = row_stats.data_ptr();
  p.topk_grad = topk_grad.data_ptr();
  p.n_rows = logits.size(0);
  p.vocab = logits.size(1);
  p.k = k;
  p.temperature = effective_temperature(alpha > 0.0, temperature);
  p.alpha = alpha;
  p.ignore_index = ignore_index;
  p.with_ce = with_ce;
  p.grad_logits = grad_logits.data_ptr();
  if (logits.is_cpu()) {
    sparse_kl_backward_cpu(p, dtype_of(logits));
  } else {
#if defined(KDENGINE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(logits.device());
    const cudaError_t err = sparse_kl_backward_cuda(p, dtype_of(logits), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "sparse_kl: CUDA backward launch failed: ", cudaGetErrorString(err));
#endif
  }
  return grad_logits;
}

bool has_cuda() {
#if defined(KDENGINE_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

// ---- sampled-target (RS-KD) KL forward; its backward is `backward` above ----------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampled_forward(
    const at::Tensor& logits, const at::Tensor& sample_idx, const at::Tensor& sample_count,
    const at::Tensor& target_logp, const std::optional<at::Tensor>& proposal_logp,
    const std::optional<at::Tensor>& labels, double alpha, double temperature, int64_t ignore_index) {
  check_logits(logits);
  CHECK_ARG(sample_idx.dim() == 2, "sample_idx", "2-D [N, K]", sample_idx.sizes());
  const int64_t k = sample_idx.size(1);
  check_rows(sample_idx, "sample_idx", logits, at::kInt, k);
  check_rows(sample_count, "sample_count", logits, acc_type(logits), k);
  check_rows(target_logp, "target_logp", logits, acc_type(logits), k);
  if (proposal_logp.has_value()) check_rows(*proposal_logp, "proposal_logp", logits, acc_type(logits), k);
  const bool with_ce = alpha < 1.0;
  CHECK_ARG(labels.has_value() || !with_ce, "labels", "given when alpha < 1", "None");
  if (labels.has_value()) check_rows(*labels, "labels", logits, at::kLong, -1);
  CHECK_ARG(temperature > 0.0, "temperature", "> 0", temperature);
  CHECK_ARG(alpha >= 0.0 && alpha <= 1.0, "alpha", "in [0, 1]", alpha);

  const int64_t n = logits.size(0);
  auto opts = logits.options().dtype(acc_type(logits));
  at::Tensor loss_rows = at::empty({n}, opts);
  at::Tensor row_stats = at::empty({n, kRowStats}, opts);
  at::Tensor sample_grad = at::empty({n, k}, opts);
  if (n == 0) return {loss_rows, row_stats, sample_grad};

  SampledForwardParams p{};
  p.logits = logits.data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.sample_idx = sample_idx.data_ptr<int32_t>();
  p.sample_count = sample_count.data_ptr();
  p.target_logp = target_logp.data_ptr();
  p.proposal_logp = proposal_logp.has_value() ? proposal_logp->data_ptr() : nullptr;
  p.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  p.n_rows = n;
  p.vocab = logits.size(1);
  p.k = k;
  p.temperature = effective_temperature(alpha, temperature);
  p.alpha = alpha;
  p.ignore_index = ignore_index;
  p.with_ce = with_ce;
  p.loss_rows = loss_rows.data_ptr();
  p.row_stats = row_stats.data_ptr();
  p.sample_grad = sample_grad.data_ptr();
  if (logits.is_cpu()) {
    sampled_kl_forward_cpu(p, dtype_of(logits));
  } else {
#if defined(KDENGINE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(logits.device());
    const cudaError_t err =
        sampled_kl_forward_cuda(p, dtype_of(logits), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "sampled_kl: CUDA forward launch failed: ", cudaGetErrorString(err));
#endif
  }
  return {loss_rows, row_stats, sample_grad};
}

}  // namespace
}  // namespace kdengine

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdengine sparse KL kernels (CPU, and CUDA when built with it) and the store's top-k coder";
  m.def("forward", &kdengine::forward, "sparse KL forward -> (loss_rows, row_stats, topk_grad)");
  m.def("backward", &kdengine::backward, "sparse KL backward -> grad_logits");
  m.def("sampled_forward", &kdengine::sampled_forward,
        "sampled-target KL forward -> (loss_rows, row_stats, sample_grad); its backward is `backward`");
  m.def("has_cuda", &kdengine::has_cuda, "whether this build has the CUDA kernels");

  kdengine::bind_topk_codec(m);
}
