"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine learning rate."""
from __future__ import annotations

import math

import torch

from kdengine.train.config import TrainConfig


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier on the peak learning rate for optimizer step `step` (0-based).

    Linear warmup from 1/warmup to 1 over the first `warmup` steps, then a cosine from 1 down towards
    `min_ratio`, which it reaches at step `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay applies to matrices (dim >= 2) only, not to
    norms and biases. Call it after wrapping the model (DDP/FSDP), so that it sees the final parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, warmup=cfg.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
