"""`SparseKLLoss`: sparse_kl as an nn.Module holding its options."""
from __future__ import annotations

import torch
from torch import nn

from .sparse_kl import _check_options, sparse_kl


class SparseKLLoss(nn.Module):
    """nn.Module form of `kdengine.losses.sparse_kl` (same options, checked at construction).

    Call it as ``loss_fn(logits [N, V], topk_idx [N, K], topk_logp [N, K], labels [N] | None,
    tempered_lse=None)``; see `sparse_kl` for shapes, dtypes, the formula and the errors it raises.
    """

    def __init__(self, *, tail: bool = False, alpha: float = 1.0, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", divergence: str = "fkl", beta: float = 0.5):
        super().__init__()
        _check_options(tail, alpha, temperature, ignore_index, reduction, divergence, beta)
        self.tail, self.alpha, self.temperature = tail, alpha, temperature
        self.ignore_index, self.reduction = ignore_index, reduction
        self.divergence, self.beta = divergence, beta

    def forward(self, logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor,
                labels: torch.Tensor | None = None, tempered_lse: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_kl(logits, topk_idx, topk_logp, labels, tail=self.tail, alpha=self.alpha,
                         temperature=self.temperature, ignore_index=self.ignore_index, reduction=self.reduction,
                         divergence=self.divergence, beta=self.beta, tempered_lse=tempered_lse)

    def extra_repr(self) -> str:
        return (f"tail={self.tail}, alpha={self.alpha}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"divergence={self.divergence!r}, beta={self.beta}")
