"""Distillation losses: `sparse_kl` (function) and `SparseKLLoss` (module) over the compiled kernels,
with the pure-torch reference in `kdengine.losses.reference`; `sampled_kl` for sampled teacher targets (RS-KD),
its reference and proof in `kdengine.losses.sampled_reference`; `dense_kl`, the full-vocabulary loss
against a teacher's logits (online KD, chunked pure torch)."""
from .dense_kl import DenseKLError, dense_kl
from .module import SparseKLLoss
from .reference import SparseKLOutput
from .sampled_kl import SampledKLError, sampled_kl
from .sparse_kl import SparseKLError, sparse_kl

__all__ = ["sparse_kl", "SparseKLLoss", "SparseKLError", "SparseKLOutput", "sampled_kl", "SampledKLError",
           "dense_kl", "DenseKLError"]
