"""Distillation losses: `sparse_kl` (function) and `SparseKLLoss` (module) over the compiled kernels,
`sparse_kl_linear` (the output head fused in), with the pure-torch reference in
`kdengine.losses.reference` and the kernels as torch.library custom ops in `kdengine.losses.ops`;
`sampled_kl` for sampled teacher targets (RS-KD), its reference and proof in
`kdengine.losses.sampled_reference`."""
from .linear import sparse_kl_linear
from .module import SparseKLLoss
from .reference import SparseKLOutput
from .sampled_kl import SampledKLError, sampled_kl
from .sparse_kl import SparseKLError, sparse_kl

__all__ = ["sparse_kl", "sparse_kl_linear", "SparseKLLoss", "SparseKLError", "SparseKLOutput", "sampled_kl",
           "SampledKLError"]
