"""Input checks shared by the loss front ends (`sparse_kl`, `sampled_kl`, `dense_kl`).

Each front end raises its own error type with its own prefix, so every check takes the front end's
`fail(message)`. The value checks of the small [N, K] and [N] inputs are queued on the device
without a sync (`RowChecks`); `raise_if_invalid` adds the logits check (which the kernels compute
from their own row statistics) and syncs once; the first bad row is described only on failure.
"""
from __future__ import annotations

import numbers
from typing import Callable, NoReturn

import torch

REDUCTIONS = ("mean", "sum", "none")
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IDX_DTYPES = (torch.int32, torch.int64)

Fail = Callable[[str], NoReturn]


def describe(t) -> str:
    """'float32 [4, 7] on cpu' for a tensor, the type name for anything else."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} on {t.device}"


def check_logits(fail: Fail, logits, device: torch.device) -> None:
    if not isinstance(logits, torch.Tensor):
        fail(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.dtype not in LOGITS_DTYPES:
        fail(f"logits must be float32/bfloat16/float16 [N, V], got {describe(logits)}")
    if logits.dtype == torch.float64 and device.type != "cpu":
        fail(f"float64 logits are supported on CPU only (for gradcheck), got {describe(logits)}")


def check_labels(fail: Fail, labels, n: int) -> None:
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dtype not in IDX_DTYPES
                               or labels.shape != (n,)):
        fail(f"labels must be int64 [N] with N = {n} (or None), got {describe(labels)}")


def check_devices(fail: Fail, device: torch.device, named: dict) -> None:
    """Every tensor of `named` (None entries skipped) on the logits' device."""
    for name, t in named.items():
        if t is not None and t.device != device:
            fail(f"{name} must be on the logits' device {device}, got {t.device}")


def check_mix_options(fail: Fail, alpha, temperature, ignore_index, reduction) -> None:
    """The options every loss takes: the KD/CE mix, the temperature, ignored rows, the reduction."""
    if not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        fail(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(temperature, numbers.Real) or not 0 < temperature < float("inf"):
        fail(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(ignore_index, numbers.Integral):
        fail(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        fail(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def check_alpha_needs_labels(fail: Fail, alpha, labels) -> None:
    if alpha < 1 and labels is None:
        fail(f"alpha = {alpha} < 1 mixes in cross-entropy, which needs labels; pass labels or use alpha=1")


class CountedRows:
    """Which rows count (labels != ignore_index; all without labels) and how many: a tensor when
    labels are given, so no sync (an all-ignored batch counts 1, giving mean loss 0)."""

    def __init__(self, n: int, device: torch.device, labels: torch.Tensor | None, ignore_index: int):
        if labels is None:
            self.counted = torch.ones(n, dtype=torch.bool, device=device)
            self.count = max(n, 1)
        else:
            self.counted = labels != ignore_index
            self.count = self.counted.sum().clamp_min(1)


class RowChecks(CountedRows):
    """Per-row value checks, queued without a sync. A subclass fills `self.rows` (check name -> bool
    [N] of failing rows, in the order they are reported) and describes its own checks in `message`;
    the label and logits checks are common."""

    def __init__(self, fail: Fail, n: int, vocab: int, device: torch.device, labels, ignore_index: int):
        super().__init__(n, device, labels, ignore_index)
        self._fail, self.vocab, self.labels, self.ignore_index = fail, vocab, labels, ignore_index
        self.rows: dict[str, torch.Tensor] = {}

    def label_rows(self) -> torch.Tensor:
        if self.labels is None:
            return torch.zeros_like(self.counted)
        return self.counted & ((self.labels < 0) | (self.labels >= self.vocab))

    def raise_if_invalid(self, bad_logit_rows: torch.Tensor) -> None:
        rows = dict(self.rows, logits=bad_logit_rows)
        flags = torch.stack([r.any() for r in rows.values()]).tolist()  # the one sync
        for (name, bad), flag in zip(rows.items(), flags):
            if flag:
                row = int(bad.nonzero()[0, 0])
                where = f"row {row}" + (f" (and {int(bad.sum()) - 1} more rows)" if int(bad.sum()) > 1 else "")
                self._fail(self.message(name, row, where))

    def message(self, name: str, row: int, where: str) -> str:
        if name == "label_range":
            return (f"labels must be in [0, V = {self.vocab}) or ignore_index = {self.ignore_index}; "
                    f"{where} holds {int(self.labels[row])}")
        assert name == "logits", name
        return (f"logits must be finite where they count (-inf entries are allowed if a row keeps one "
                f"finite entry); {where} holds NaN or +inf, or no finite entry")


def bad_rows_by_torch(logits: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """The kernels' logits check, for the reference fallback (one extra pass)."""
    x = logits.float() if logits.dtype != torch.float64 else logits
    return counted & ~torch.isfinite(torch.logsumexp(x, dim=-1))
