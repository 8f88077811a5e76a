"""`sampled_kl`: the distillation loss for sampled teacher targets (RS-KD), over the compiled kernels.

The forward validates its inputs and runs the CPU or CUDA sampled forward (kdengine._C), which reads
the logits once and returns the per-row loss plus O(N + N*K) statistics; the backward is the sparse
KL backward, one more pass (the gradient has the same shape: a per-row dense coefficient plus K
sparse entries). Without the compiled extension it falls back to the pure-torch reference with a
one-time warning. The estimator, its proof of unbiasedness and its gradient: sampled_reference.py.
"""
from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from .checks import (IDX_DTYPES, RowChecks, bad_rows_by_torch, check_alpha_needs_labels, check_devices,
                     check_labels, check_logits, check_mix_options, describe)
from .sampled_reference import sampled_kl_reference
from .sparse_kl import _load_extension, extension_available

_COUNT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.float32, torch.float64)


class SampledKLError(ValueError):
    """Invalid input to sampled_kl (a ValueError): the message names the argument, expected vs got."""


def sampled_kl(
    logits: torch.Tensor,
    sample_idx: torch.Tensor,
    sample_count: torch.Tensor,
    target_logp: torch.Tensor,
    proposal_logp: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Unbiased estimate of the forward KL from the teacher to the student, from sampled teacher ids.

    Per row, with M = sum_k c_k draws and w_k = c_k / M * exp(target_logp_k - proposal_logp_k):
    KD = T^2 * sum_k w_k (target_logp_k - log_softmax(logits / T)[i_k]), CE = -log_softmax(logits)[label]
    at T = 1, loss = alpha KD + (1 - alpha) CE. E[KD] and E[grad KD] over the draws are the dense
    T^2 KL(p^T || q^T) and its gradient (proof: kdengine/losses/sampled_reference.py). Dims: N rows,
    V vocab, K slots (distinct drawn ids, padded).

    Args:
        logits: float32/bfloat16/float16 [N, V] (float64 on CPU), the student's logits, on CPU or
            CUDA, unit stride along V. Accumulation in float32 (float64 for float64 logits); the
            gradient has the logits' dtype.
        sample_idx: int32/int64 [N, K], K >= 1, the drawn ids: in [0, V) and distinct within a row
            where the count is > 0 (anything at padding slots).
        sample_count: int or float [N, K], >= 0, how often each id was drawn; 0 marks padding. Every
            counted row needs a positive total.
        target_logp: float32 [N, K], log p^T of the ids: the teacher at the loss temperature,
            normalised over its full vocabulary. Finite where the count is > 0. No gradient.
        proposal_logp: float32 [N, K] or None, log r of the ids under the proposal they were drawn
            from (finite where the count is > 0); None when it is p^T itself (weights c_k / M).
        labels: int64/int32 [N] or None. Rows equal to `ignore_index` contribute 0 loss and 0
            gradient; other labels must be in [0, V). None: every row counts. Required if alpha < 1.
        alpha: in [0, 1], weight of the KD term.
        temperature: T > 0 of the student's softmax in the KD term (CE stays at T = 1); KD is
            scaled by T^2. `target_logp` must be the teacher at this same T.
        ignore_index: label value marking rows to ignore.
        reduction: "mean" over counted rows (0 when none count), "sum", or "none".

    Returns:
        float32 (float64 for float64 logits): a scalar, or [N] for reduction="none" (ignored rows 0).
        A single draw's KD estimate can be negative; its expectation is the KL.

    Raises:
        SampledKLError (a ValueError), before any result is returned, for: wrong shapes, dtypes or
        devices; drawn ids outside [0, V) or repeated within a row; negative or non-finite counts;
        a counted row without draws; NaN/inf log-probs at drawn slots; labels outside [0, V); alpha
        outside [0, 1] or < 1 without labels; temperature <= 0; an unknown reduction; logits rows
        with NaN/+inf (or no finite entry) among the counted rows. One host-device sync per call.
    """
    _check_args(logits, sample_idx, sample_count, target_logp, proposal_logp, labels, alpha, temperature,
                ignore_index, reduction)
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        logits = logits.contiguous()
    if labels is not None:
        labels = labels.long()
    checks = _DataChecks(logits, sample_idx, sample_count, target_logp, proposal_logp, labels, ignore_index)
    ext = _extension_for(logits.device)
    if ext is None:
        checks.raise_if_invalid(bad_logit_rows=bad_rows_by_torch(logits, checks.counted))
        loss_rows = sampled_kl_reference(
            logits, sample_idx, sample_count, target_logp, proposal_logp, labels,
            alpha=alpha, temperature=temperature, ignore_index=ignore_index, reduction="none",
        )
    else:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        # Padding slots become id -1, which both kernels skip (forward and backward).
        idx = torch.where(checks.drawn, sample_idx, -1).to(torch.int32).contiguous()
        loss_rows = _SampledKLFunction.apply(
            logits, idx, sample_count.to(acc).contiguous(), target_logp.to(acc).contiguous(),
            None if proposal_logp is None else proposal_logp.to(acc).contiguous(),
            None if labels is None else labels.contiguous(),
            checks, ext, float(alpha), float(temperature), int(ignore_index),
        )
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / checks.count


class _SampledKLFunction(torch.autograd.Function):
    """loss_rows [N] = the per-row loss; the kernels do all the work."""

    @staticmethod
    def forward(ctx, logits, idx, count, target_logp, proposal_logp, labels, checks, ext, alpha, temperature,
                ignore_index):
        loss_rows, row_stats, sample_grad = ext.sampled_forward(
            logits, idx, count, target_logp, proposal_logp, labels, alpha, temperature, ignore_index
        )
        max_, sum_ = row_stats[:, 0], row_stats[:, 1]
        bad = ~(torch.isfinite(max_) & torch.isfinite(sum_) & (sum_ > 0))
        checks.raise_if_invalid(bad_logit_rows=bad & checks.counted)
        ctx.ext = ext
        ctx.params = (alpha, temperature, ignore_index)
        ctx.save_for_backward(logits, idx, labels, row_stats, sample_grad)
        return loss_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        logits, idx, labels, row_stats, sample_grad = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad_rows.to(row_stats.dtype).contiguous()
            grad_logits = ctx.ext.backward(grad_rows, logits, idx, labels, row_stats, sample_grad, *ctx.params)
        return (grad_logits,) + (None,) * 10


def _fail(message: str):
    raise SampledKLError(f"sampled_kl: {message}")


def _check_args(logits, sample_idx, sample_count, target_logp, proposal_logp, labels, alpha, temperature,
                ignore_index, reduction):
    """Shape, dtype, device and option checks: metadata only, no device work."""
    check_logits(_fail, logits, logits.device if isinstance(logits, torch.Tensor) else None)
    for name, t in (("sample_idx", sample_idx), ("sample_count", sample_count), ("target_logp", target_logp)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    n = logits.shape[0]
    if sample_idx.dim() != 2 or sample_idx.shape[0] != n or sample_idx.dtype not in IDX_DTYPES:
        _fail(f"sample_idx must be int32/int64 [N, K] with N = {n} (the rows of logits), got {describe(sample_idx)}")
    if sample_idx.shape[1] < 1:
        _fail("sample_idx must have at least one column (K >= 1)")
    shape = list(sample_idx.shape)
    if sample_count.shape != sample_idx.shape or sample_count.dtype not in _COUNT_DTYPES:
        _fail(f"sample_count must be an int or float [N, K] = {shape} like sample_idx, got {describe(sample_count)}")
    for name, t in (("target_logp", target_logp), ("proposal_logp", proposal_logp)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != sample_idx.shape
                              or t.dtype not in (torch.float32, torch.float64)):
            _fail(f"{name} must be float32 [N, K] = {shape} like sample_idx, got {describe(t)}")
    check_labels(_fail, labels, n)
    check_devices(_fail, logits.device, {"sample_idx": sample_idx, "sample_count": sample_count,
                                         "target_logp": target_logp, "proposal_logp": proposal_logp,
                                         "labels": labels})
    check_sampled_options(alpha, temperature, ignore_index, reduction)
    check_alpha_needs_labels(_fail, alpha, labels)


def check_sampled_options(alpha, temperature, ignore_index, reduction):
    """The non-tensor options (also checked when the trainer builds its loss)."""
    check_mix_options(_fail, alpha, temperature, ignore_index, reduction)


class _DataChecks(RowChecks):
    """The sampled inputs' value checks (counts, ids at drawn slots, log-probs there), beside the
    common label and logits checks."""

    def __init__(self, logits, sample_idx, sample_count, target_logp, proposal_logp, labels, ignore_index):
        super().__init__(_fail, logits.shape[0], logits.shape[1], logits.device, labels, ignore_index)
        self.sample_idx, self.sample_count = sample_idx, sample_count
        self.target_logp, self.proposal_logp = target_logp, proposal_logp
        count = sample_count if sample_count.is_floating_point() else sample_count.long()
        self.drawn = count > 0
        # Padding slots get distinct negative ids, so only drawn ids can repeat.
        cols = torch.arange(sample_idx.shape[1], device=sample_idx.device)
        ids = torch.where(self.drawn, sample_idx.long(), -1 - cols).sort(dim=1).values
        self._ids_sorted = ids
        finite_at_drawn = lambda t: self.drawn & ~torch.isfinite(t)  # noqa: E731
        self.rows = {
            "count_value": ((count < 0) | ~torch.isfinite(count.double())).any(dim=1),
            "no_draws": self.counted & ~self.drawn.any(dim=1),
            "id_range": (self.drawn & ((sample_idx < 0) | (sample_idx >= self.vocab))).any(dim=1),
            "id_repeat": (ids[:, 1:] == ids[:, :-1]).any(dim=1),
            "target_value": finite_at_drawn(target_logp).any(dim=1),
            "proposal_value": (finite_at_drawn(proposal_logp).any(dim=1) if proposal_logp is not None
                               else torch.zeros_like(self.counted)),
            "label_range": self.label_rows(),
        }

    def message(self, name: str, row: int, where: str) -> str:
        if name == "count_value":
            return f"sample_count must be finite and >= 0; {where} holds {self.sample_count[row].tolist()}"
        if name == "no_draws":
            return (f"sample_count must give every counted row at least one draw; {where} has none "
                    f"(mark rows without targets with labels = ignore_index)")
        if name == "id_range":
            ids = self.sample_idx[row][self.drawn[row]]
            bad_id = int(ids[(ids < 0) | (ids >= self.vocab)][0])
            return (f"sample_idx must hold ids in [0, V = {self.vocab}) where the count is > 0; {where} holds "
                    f"{bad_id}. Is the teacher's vocabulary the student's (compare the store manifest's vocab size)?")
        if name == "id_repeat":
            ids = self._ids_sorted[row]
            dup = int(ids[1:][ids[1:] == ids[:-1]][0])
            return f"sample_idx must hold distinct ids within a row (add their counts); {where} repeats id {dup}"
        if name in ("target_value", "proposal_value"):
            arg = "target_logp" if name == "target_value" else "proposal_logp"
            vals = (self.target_logp if name == "target_value" else self.proposal_logp)[row][self.drawn[row]]
            bad = float(vals[~torch.isfinite(vals)][0])
            return f"{arg} must be finite log-probabilities where the count is > 0; {where} holds {bad}"
        return super().message(name, row, where)


_WARNED: set[str] = set()


def sampled_extension_available(device: str | torch.device = "cpu") -> bool:
    """Whether sampled_kl runs a compiled kernel (not the reference) for tensors on `device`."""
    return extension_available(device) and hasattr(_load_extension(), "sampled_forward")


def _extension_for(device: torch.device):
    if sampled_extension_available(device):
        return _load_extension()
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(
            f"sampled_kl: kdengine._C has no sampled-target kernel for {device.type} (missing, stale or "
            f"built without it); falling back to the pure-torch reference, which is much slower. Rebuild "
            f"with `pip install --no-build-isolation -e .` (with nvcc on PATH for CUDA).",
            RuntimeWarning,
            stacklevel=3,
        )
    return None
