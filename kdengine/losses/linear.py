"""`sparse_kl_linear`: the output head fused into sparse_kl, chunked over rows, so that the [N, V]
logits and their gradient never exist: at most one [chunk_rows, V] block of each lives at a time.

Per chunk: logits = hidden @ weight.T (+ bias; softcap * tanh(logits / softcap)), the kernel's forward,
and, when a gradient will be wanted and the loss is reduced ("mean"/"sum"), at once the kernel's
backward folded into grad_hidden = dlogits @ weight, grad_weight += dlogits.T @ hidden (float32 across
chunks) and grad_bias += dlogits.sum(0); the backward then only scales them by the upstream scalar.
With reduction="none" (a per-row upstream gradient) the backward recomputes the chunks instead.
The spec is the unfused composition, `sparse_kl(hidden @ weight.T + bias, ...)` (ops.py has the ops).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import sparse_kl as _sk
from .checks import LOGITS_DTYPES, describe
from .reference import DIVERGENCES, SparseKLOutput

DEFAULT_CHUNK_ROWS = 1024


def sparse_kl_linear(
    hidden: Tensor,
    weight: Tensor,
    topk_idx: Tensor,
    topk_logp: Tensor,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    tail: bool = False,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    divergence: str = "fkl",
    beta: float = 0.5,
    tempered_lse: Tensor | None = None,
    return_parts: bool = False,
    validate: bool = True,
) -> Tensor | SparseKLOutput:
    """`sparse_kl(hidden @ weight.T (+ bias, softcap), topk_idx, topk_logp, labels, ...)` without the [N, V] logits.

    The same value and gradients (for `hidden`, `weight` and `bias`) as that composition, computed
    `chunk_rows` rows at a time. Dims: N rows, H hidden size, V vocab, K top-k.

    Args:
        hidden: float32/bfloat16/float16 [N, H] (float64 on CPU): the final hidden states of the rows
            that carry a teacher target.
        weight: [V, H], the output head (a tied embedding matrix is fine), hidden's dtype and device.
        topk_idx, topk_logp, labels: as in `sparse_kl`, with V = weight.shape[0].
        bias: [V] or None, hidden's dtype.
        softcap: None, or c > 0: logits = c * tanh((hidden @ weight.T + bias) / c).
        chunk_rows: rows per chunk, >= 1; extra memory is about two [chunk_rows, V] blocks of logits
            (plus a float32 copy of the weight's gradient).
        tail, alpha, temperature, ignore_index, reduction, divergence, beta, tempered_lse, return_parts,
        validate: as in `sparse_kl`.

    Returns:
        As `sparse_kl`. The weight's gradient is accumulated in float32 across chunks and handed back
        in weight's dtype.

    Raises:
        SparseKLError as `sparse_kl` does, and for hidden/weight/bias that do not fit together,
        softcap <= 0 or chunk_rows < 1.
    """
    _check_linear(hidden, weight, bias, softcap, chunk_rows)
    ext = _sk._extension_for(hidden.device)
    if ext is None:  # no compiled kernels: the unfused composition through the reference
        logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return _sk.sparse_kl(logits, topk_idx, topk_logp, labels, tail=tail, alpha=alpha, temperature=temperature,
                             ignore_index=ignore_index, reduction=reduction, divergence=divergence, beta=beta,
                             tempered_lse=tempered_lse, return_parts=return_parts, validate=validate)
    logits_meta = torch.empty((hidden.shape[0], weight.shape[0]), dtype=hidden.dtype, device="meta")
    prepared = _sk._prepare(logits_meta, topk_idx, topk_logp, labels, tail, alpha, temperature, ignore_index,
                            reduction, divergence, beta, tempered_lse, validate, device=hidden.device)
    topk_idx, topk_logp, labels, tempered_lse, checks = prepared
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    precompute = needs_grad and reduction != "none"
    row_weights = torch.ones(hidden.shape[0], dtype=topk_logp.dtype, device=hidden.device) if precompute else None
    loss_rows, row_stats, *_ = torch.ops.kdengine.sparse_kl_linear(
        hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse, row_weights, float(softcap or 0.0),
        int(chunk_rows), tail, float(alpha), float(temperature), int(ignore_index), DIVERGENCES.index(divergence),
        float(beta), return_parts,
    )
    return _sk._finish(loss_rows, row_stats, labels, checks, reduction, return_parts, validate)


def _check_linear(hidden, weight, bias, softcap, chunk_rows):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor):
            _sk._fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or hidden.dtype not in LOGITS_DTYPES:
        _sk._fail(f"hidden must be float32/bfloat16/float16 [N, H], got {describe(hidden)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.dtype != hidden.dtype:
        _sk._fail(f"weight must be [V, H] with H = {hidden.shape[1]} in hidden's dtype {hidden.dtype}, "
                  f"got {describe(weight)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)
                             or bias.dtype != hidden.dtype):
        got = describe(bias) if isinstance(bias, Tensor) else type(bias).__name__
        _sk._fail(f"bias must be [V] = [{weight.shape[0]}] in hidden's dtype (or None), got {got}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            _sk._fail(f"{name} must be on hidden's device {hidden.device}, got {t.device}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not softcap > 0):
        _sk._fail(f"softcap must be a number > 0 (or None), got {softcap!r}")
    if not isinstance(chunk_rows, numbers.Integral) or chunk_rows < 1:
        _sk._fail(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
