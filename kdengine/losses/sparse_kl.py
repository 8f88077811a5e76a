"""`sparse_kl`: the distillation loss over the compiled kernels.

The function validates its inputs (unless `validate=False`), runs the CPU or CUDA kernel through the
`torch.ops.kdengine.sparse_kl_forward` custom op (ops.py: fake implementation and registered
autograd, so `torch.compile` traces it), which reads the logits once and returns the per-row loss
plus O(N + N*K) statistics; the backward writes dX in one more pass. Without the compiled extension
(or without its CUDA part for a CUDA tensor) it falls back to the pure-torch reference with a one-time
warning. The formula and its gradient: reference.py.
"""
from __future__ import annotations

import numbers
import warnings

import torch

from . import ops
from .checks import (IDX_DTYPES, CountedRows, RowChecks, bad_rows_by_torch, check_alpha_needs_labels,
                     check_devices, check_labels, check_logits, check_mix_options, describe)
from .reference import DIVERGENCES, SparseKLOutput, sparse_kl_reference

PAD_ID = -1  # a top-k entry with this id and log-prob -inf is padding (rows of an adaptive-K store): skipped


class SparseKLError(ValueError):
    """Invalid input to sparse_kl (a ValueError): the message names the argument, expected vs got."""


def sparse_kl(
    logits: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_logp: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    tail: bool = False,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    divergence: str = "fkl",
    beta: float = 0.5,
    tempered_lse: torch.Tensor | None = None,
    return_parts: bool = False,
    validate: bool = True,
) -> torch.Tensor | SparseKLOutput:
    """A divergence between the teacher's top-k distribution and the student's softmax, mixed with CE.

    Per row, over the K teacher buckets (plus the tail bucket when `tail`), with p the teacher's and
    q the student's bucket probabilities at temperature T: KD = T^2 D(p, q) with D forward KL
    sum_b p_b log(p_b / q_b) ("fkl"), reverse KL sum_b q_b log(q_b / p_b) ("rkl"), or the generalized
    JSD beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q ("jsd"); CE =
    -log_softmax(logits)[label] at T = 1; loss = alpha KD + (1 - alpha) CE. Full definitions and the
    gradient: kdengine/losses/reference.py. Dims: N rows, V vocab, K top-k.

    Args:
        logits: float32/bfloat16/float16 [N, V] (float64 on CPU), the student's logits, on CPU or
            CUDA, unit stride along V. Accumulation is in float32 (float64 for float64 logits); the
            gradient has the logits' dtype.
        topk_idx: int32/int64 [N, K], 1 <= K <= V, the teacher's top-k ids: distinct within a row, in [0, V);
            an entry with id -1 and log-prob -inf is padding and is skipped (rows with fewer than K
            entries, as an adaptive-K store gives them).
        topk_logp: float32 [N, K], the teacher's log-probabilities of those ids over its full
            vocabulary at T = 1 (so sum_k exp <= 1). No gradient flows to it.
        labels: int64/int32 [N] or None. Rows equal to `ignore_index` contribute 0 loss and 0
            gradient; other labels must be in [0, V). None: every row counts. Required if alpha < 1.
        tail: add a bucket for the teacher's mass outside its top-k (1 - sum_k exp(logp_k)) against
            the student's mass outside those ids. Required by "rkl" and "jsd".
        alpha: in [0, 1], weight of the KD term.
        temperature: T > 0 for the KD term (CE stays at T = 1); KD is scaled by T^2. With the tail
            and T != 1, pass `tempered_lse` for the exact tempered tail; without it the tail mass
            is tempered as if it were one token (an approximation that understates it for T > 1).
        ignore_index: label value marking rows to ignore.
        reduction: "mean" over counted rows (0 when none count), "sum", or "none".
        divergence: "fkl" (default; today's loss bit for bit), "rkl" or "jsd".
        beta: the jsd mixture weight, in (0, 1) (TRL's generalized JSD convention); checked always,
            used by "jsd" only.
        tempered_lse: float32 [N] or None: c_T = logsumexp over the teacher's full vocabulary of
            logp / T, the store's per-position quantity for this T (`kdengine dump --temperatures`).
            Only the tail bucket uses it (without the tail it cancels).
        return_parts: return SparseKLOutput(loss, kd, ce): kd = T^2 D and ce, reduced like the loss
            and detached (for logging; ce is None without labels). They come from the same kernel
            pass; asking for a part that alpha weighs by 0 makes the pass compute it.
        validate: check the values of the inputs (ids, log-probs, labels, tempered_lse, and NaN/inf
            in the logits' rows), at the cost of one host-device sync per call. False skips these
            checks (shapes, dtypes and options are still checked, at no device cost): for a training
            loop whose first step ran validated, and for `torch.compile(..., fullgraph=True)`.
            Invalid values then give undefined (possibly NaN) results, not an error.

    Returns:
        float32 (float64 for float64 logits): a scalar, or [N] for reduction="none" (ignored rows 0);
        a SparseKLOutput of those with `return_parts`.

    Raises:
        SparseKLError (a ValueError), before any result is returned, for: wrong shapes, dtypes or
        devices; K > V; ids outside [0, V) or repeated within a row; NaN/+inf in topk_logp; labels
        outside [0, V); alpha outside [0, 1] or < 1 without labels; temperature <= 0; an unknown
        reduction or divergence; beta outside (0, 1); "rkl"/"jsd" without the tail; a non-finite
        tempered_lse in a counted row; logits rows with NaN/+inf (or no finite entry) among the
        counted rows (with `validate`). The data checks cost one host-device sync per call; NaN in the
        logits is detected by the kernel's own per-row statistics rather than by another read of the
        [N, V] logits.
    """
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.stride(1) != 1 and logits.shape[1] > 1:
        logits = logits.contiguous()  # the kernels stream rows; row-strided views need no copy
    topk_idx, topk_logp, labels, tempered_lse, checks = _prepare(
        logits, topk_idx, topk_logp, labels, tail, alpha, temperature, ignore_index, reduction, divergence, beta,
        tempered_lse, validate)
    if _extension_for(logits.device) is None:
        if validate:
            checks.raise_if_invalid(bad_logit_rows=bad_rows_by_torch(logits, checks.counted))
        loss_rows, kd_rows, ce_rows = sparse_kl_reference(
            logits, topk_idx, topk_logp, labels,
            tail=tail, alpha=alpha, temperature=temperature, ignore_index=ignore_index, reduction="none",
            divergence=divergence, beta=beta, tempered_lse=tempered_lse, return_parts=True,
        )
        return _reduce_all(loss_rows, kd_rows, ce_rows, checks.count, reduction, return_parts)
    loss_rows, row_stats, _ = torch.ops.kdengine.sparse_kl_forward(
        logits, topk_idx, topk_logp, labels, tempered_lse, tail, float(alpha), float(temperature), int(ignore_index),
        DIVERGENCES.index(divergence), float(beta), return_parts,
    )
    return _finish(loss_rows, row_stats, labels, checks, reduction, return_parts, validate)


def _prepare(logits, topk_idx, topk_logp, labels, tail, alpha, temperature, ignore_index, reduction, divergence, beta,
             tempered_lse, validate, device=None):
    """Checks (metadata always; values with `validate`, queued without a sync) and the kernels' input
    layout. `logits` may be a meta tensor of the logits' shape and dtype (sparse_kl_linear), with
    `device` the real one. Returns (topk_idx int32, topk_logp acc, labels int64, tempered_lse acc, checks)."""
    device = logits.device if device is None else device
    _check_args(logits, topk_idx, topk_logp, labels, tail, alpha, temperature, ignore_index, reduction,
                divergence, beta, tempered_lse, device)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    labels = None if labels is None else labels.long().contiguous()
    n, vocab = logits.shape
    checks = (_DataChecks(n, vocab, device, topk_idx, topk_logp, labels, tail, ignore_index, tempered_lse)
              if validate else CountedRows(n, device, labels, ignore_index))
    return (topk_idx.to(torch.int32).contiguous(), topk_logp.to(acc).contiguous(), labels,
            None if tempered_lse is None else tempered_lse.to(acc).contiguous(), checks)


def _finish(loss_rows, row_stats, labels, checks, reduction, parts, validate):
    """The kernels' logits check (with `validate`) and the reductions of the loss and its parts."""
    if validate:
        # row_stats[:, 0] is the row max, [:, 1] the sum of exps against it: a NaN/+inf logit or a
        # row with no finite logit shows there, at no extra pass over the logits.
        max_, sum_ = row_stats[:, 0], row_stats[:, 1]
        bad = ~(torch.isfinite(max_) & torch.isfinite(sum_) & (sum_ > 0))
        checks.raise_if_invalid(bad_logit_rows=bad & checks.counted)
    # Contiguous copies: a strided column would be summed in another order than loss_rows, so a part
    # equal to the loss row by row (alpha = 0 or 1) would differ from it in the last bits.
    kd_rows = row_stats[:, ops.STAT_KD].detach().contiguous()
    ce_rows = None if labels is None else row_stats[:, ops.STAT_CE].detach().contiguous()
    return _reduce_all(loss_rows, kd_rows, ce_rows, checks.count, reduction, parts)


def _reduce_all(loss_rows, kd_rows, ce_rows, count, reduction, parts):
    loss = _reduce(loss_rows, reduction, count)
    if not parts:
        return loss
    return SparseKLOutput(loss, _reduce(kd_rows.detach(), reduction, count),
                          None if ce_rows is None else _reduce(ce_rows.detach(), reduction, count))


def _reduce(rows: torch.Tensor, reduction: str, count) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / count


def _fail(message: str):
    raise SparseKLError(f"sparse_kl: {message}")


def _check_args(logits, topk_idx, topk_logp, labels, tail, alpha, temperature, ignore_index, reduction,
                divergence, beta, tempered_lse, device):
    """Shape, dtype, device and option checks: metadata only, no device work."""
    check_logits(_fail, logits, device)
    for name, t in (("topk_idx", topk_idx), ("topk_logp", topk_logp)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    n, vocab = logits.shape
    if topk_idx.dim() != 2 or topk_idx.shape[0] != n or topk_idx.dtype not in IDX_DTYPES:
        _fail(f"topk_idx must be int32/int64 [N, K] with N = {n} (the rows of logits), got {describe(topk_idx)}")
    k = topk_idx.shape[1]
    if not 1 <= k <= vocab:
        _fail(f"topk_idx must have 1 <= K <= V = {vocab} columns, got K = {k}")
    if topk_logp.shape != topk_idx.shape or topk_logp.dtype not in (torch.float32, torch.float64):
        _fail(f"topk_logp must be float32 [N, K] = {list(topk_idx.shape)} like topk_idx, got {describe(topk_logp)}")
    check_labels(_fail, labels, n)
    if tempered_lse is not None and (not isinstance(tempered_lse, torch.Tensor) or tempered_lse.shape != (n,)
                                     or tempered_lse.dtype not in (torch.float32, torch.float64)):
        _fail(f"tempered_lse must be float32 [N] with N = {n} (or None), got {describe(tempered_lse)}")
    check_devices(_fail, device, {"topk_idx": topk_idx, "topk_logp": topk_logp, "labels": labels,
                                  "tempered_lse": tempered_lse})
    _check_options(tail, alpha, temperature, ignore_index, reduction, divergence, beta)
    check_alpha_needs_labels(_fail, alpha, labels)


def _check_options(tail, alpha, temperature, ignore_index, reduction, divergence="fkl", beta=0.5):
    """The non-tensor options (also checked when a SparseKLLoss module is built)."""
    if not isinstance(tail, bool):
        _fail(f"tail must be a bool, got {tail!r}")
    check_mix_options(_fail, alpha, temperature, ignore_index, reduction)
    if divergence not in DIVERGENCES:
        _fail(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if not isinstance(beta, numbers.Real) or not 0 < beta < 1:
        _fail(f"beta must be a number in (0, 1) (the jsd mixture weight), got {beta!r}")
    if divergence != "fkl" and not tail:
        _fail(f"divergence={divergence!r} needs tail=True: without the tail bucket the student's mass outside "
              f"the teacher's top-k is invisible to a reverse divergence")


class _DataChecks(RowChecks):
    """The top-k inputs' value checks (ids in range and distinct, log-probs, a row's mass without the
    tail, tempered_lse), beside the common label and logits checks."""

    def __init__(self, n, vocab, device, topk_idx, topk_logp, labels, tail, ignore_index, tempered_lse=None):
        super().__init__(_fail, n, vocab, device, labels, ignore_index)
        self.topk_idx, self.topk_logp, self.tempered_lse = topk_idx, topk_logp, tempered_lse
        ids = topk_idx.sort(dim=1).values
        padding = (topk_idx == PAD_ID) & (topk_logp == float("-inf"))
        none = torch.zeros_like(self.counted)
        self.rows = {
            "id_range": (((topk_idx < 0) | (topk_idx >= vocab)) & ~padding).any(dim=1),
            "id_repeat": ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] != PAD_ID)).any(dim=1),
            "logp_value": (torch.isnan(topk_logp) | (topk_logp == float("inf"))).any(dim=1),
            "logp_empty": (topk_logp == float("-inf")).all(dim=1) if not tail else none,
            "label_range": self.label_rows(),
            "lse_value": self.counted & ~torch.isfinite(tempered_lse) if tempered_lse is not None else none,
        }
        self._ids_sorted = ids

    def message(self, name: str, row: int, where: str) -> str:
        vocab = self.vocab
        if name == "id_range":
            ids, logp = self.topk_idx[row], self.topk_logp[row]
            bad_id = int(ids[((ids < 0) | (ids >= vocab)) & ~((ids == PAD_ID) & (logp == float("-inf")))][0])
            return (f"topk_idx must hold ids in [0, V = {vocab}); {where} holds {bad_id}. Is the teacher's "
                    f"vocabulary the student's (compare the store manifest's vocab size)? ({PAD_ID} with "
                    f"log-prob -inf is padding)")
        if name == "id_repeat":
            ids = self._ids_sorted[row]
            dup = int(ids[1:][(ids[1:] == ids[:-1]) & (ids[1:] != PAD_ID)][0])
            return f"topk_idx must hold distinct ids within a row; {where} repeats id {dup}"
        if name == "logp_value":
            vals = self.topk_logp[row]
            bad = float(vals[torch.isnan(vals) | (vals == float("inf"))][0])
            return f"topk_logp must hold log-probabilities (no NaN or +inf); {where} holds {bad}"
        if name == "logp_empty":
            return (f"topk_logp must give each row some mass when tail=False; {where} is all -inf "
                    f"(use tail=True to put the mass in the tail bucket)")
        if name == "lse_value":
            return (f"tempered_lse must be finite where rows count (it is logsumexp(logp / T) over the teacher's "
                    f"vocabulary); {where} holds {float(self.tempered_lse[row])}")
        return super().message(name, row, where)


_EXTENSION = None
_EXTENSION_ERROR: str | None = None
_EXTENSION_HAS_CUDA = False  # read once at load, so that torch.compile never traces into the extension
_WARNED: set[str] = set()


def _load_extension():
    """kdengine._C, or None if it was not built (the import error is kept for the warning)."""
    global _EXTENSION, _EXTENSION_ERROR, _EXTENSION_HAS_CUDA
    if _EXTENSION is None and _EXTENSION_ERROR is None:
        try:
            from kdengine import _C

            _EXTENSION, _EXTENSION_HAS_CUDA = _C, bool(_C.has_cuda())
        except ImportError as e:
            _EXTENSION_ERROR = str(e)
    return _EXTENSION


def extension_available(device: str | torch.device = "cpu") -> bool:
    """Whether sparse_kl runs a compiled kernel (not the reference) for tensors on `device`."""
    device = torch.device(device)
    ext = _load_extension()
    return ext is not None and (device.type == "cpu" or (device.type == "cuda" and _EXTENSION_HAS_CUDA))


def _extension_for(device: torch.device):
    """kdengine._C when it has kernels for `device`, else None (after a one-time warning per device type)."""
    if extension_available(device):
        return _EXTENSION
    if _EXTENSION is None:
        why = f"the compiled extension kdengine._C is missing ({_EXTENSION_ERROR})"
    else:
        why = f"kdengine._C was built without kernels for {device.type}"
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(
            f"sparse_kl: {why}; falling back to the pure-torch reference, which is much slower and "
            f"materialises several [N, V] float32 tensors. Build it with "
            f"`pip install --no-build-isolation -e .` (with nvcc on PATH for CUDA).",
            RuntimeWarning,
            stacklevel=3,
        )
    return None
