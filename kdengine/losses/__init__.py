"""Distillation losses: `sparse_kl` (function) and `SparseKLLoss` (module) over the compiled kernels,
with the pure-torch reference in `kdengine.losses.reference`."""
from .module import SparseKLLoss
from .sparse_kl import SparseKLError, sparse_kl

__all__ = ["sparse_kl", "SparseKLLoss", "SparseKLError"]
