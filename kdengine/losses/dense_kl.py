r"""`dense_kl`: full-vocabulary distillation against a teacher's logits (online KD), chunked over rows.

Dims: N rows (token positions), V the student's vocabulary, V_t <= V the teacher's. Per row, with
T the temperature, q = softmax(x / T) the student's and p = softmax(t / T) the teacher's distribution
(a teacher narrower than the student gives probability 0 to the student's extra columns):

    fkl  KD = T^2 * sum_v p_v (log p_v - log q_v)
    rkl  KD = T^2 * sum_v q_v (log q_v - log p_v)
    jsd  KD = T^2 * [beta * KL(p || m) + (1 - beta) * KL(q || m)],  m = beta p + (1 - beta) q
    CE   = -log_softmax(x)[label]                              (at T = 1)
    loss = alpha * KD + (1 - alpha) * CE

the same definitions as `sparse_kl`'s divergences over its buckets (TRL's generalized-JSD convention),
here over all V entries; terms with p_v = 0 (fkl) or q_v = 0 (rkl) are 0.

Memory: the forward reads the logits a chunk of rows at a time and keeps only the per-row results;
the backward recomputes each chunk with autograd and writes its rows of the gradient. Besides the
teacher's logits (the one extra [N, V] tensor, made by the caller) and the gradient, it holds a few
float32 [chunk, V] temporaries, never another [N, V] tensor.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .checks import REDUCTIONS, describe
from .reference import DIVERGENCES

_CHUNK_ELEMENTS = 1 << 22  # float32 entries per temporary: 16 MiB (85 rows of a 49152 vocabulary)


class DenseKLError(ValueError):
    """Invalid input to dense_kl: the message names the argument, expected vs got."""


class DenseKLRows(NamedTuple):
    """Per-row results [N] (float32, float64 for float64 logits); ignored rows are 0. Only `loss`
    carries a gradient."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def dense_kl(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "fkl",
    beta: float = 0.5,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The distillation loss against the teacher's full distribution (module docstring: the formulas).

    Args:
        logits: float32/bfloat16/float16/float64 [N, V], the student's logits (the gradient has their dtype).
        teacher_logits: float [N, V_t] with V_t <= V, the teacher's logits at the same positions; no
            gradient flows to them.
        labels: int [N] or None; rows equal to `ignore_index` count for nothing; required if alpha < 1.
        divergence: "fkl", "rkl" or "jsd".
        beta: the JSD mixing weight, in (0, 1) (used by "jsd" only).
        alpha: in [0, 1], the weight of KD (1 - alpha weighs CE).
        temperature: T > 0 of the KD term, scaled back by T^2 (CE stays at T = 1).
        ignore_index: the label value of rows to ignore.
        reduction: "mean" over counted rows (0 when none count), "sum" or "none" ([N]).
        chunk_rows: rows per chunk; default: as many as keep a float32 [chunk, V] under 16 MiB.
    Returns:
        float32 (float64 for float64 logits): a scalar, or [N] for reduction="none".
    Raises:
        DenseKLError: shapes, dtypes, devices or options out of range.
    """
    if reduction not in REDUCTIONS:
        raise DenseKLError(f"dense_kl: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    rows = dense_kl_rows(logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
                         temperature=temperature, ignore_index=ignore_index, chunk_rows=chunk_rows)
    if reduction == "none":
        return rows.loss
    if reduction == "sum":
        return rows.loss.sum()
    counted = rows.loss.new_tensor(logits.shape[0]) if labels is None else (labels != ignore_index).sum()
    return rows.loss.sum() / counted.clamp_min(1)


def dense_kl_rows(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "fkl",
    beta: float = 0.5,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> DenseKLRows:
    """Per-row loss and its KD and CE parts, from one pass (arguments as `dense_kl`)."""
    _check(logits, teacher_logits, labels, divergence, beta, alpha, temperature)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(logits.shape[1], 1))
    if chunk_rows < 1:
        raise DenseKLError(f"dense_kl: chunk_rows must be >= 1, got {chunk_rows}")
    params = _Params(divergence, float(beta), float(alpha), float(temperature), int(ignore_index), int(chunk_rows))
    labels = None if labels is None else labels.long()
    loss, kd, ce = _DenseKLFunction.apply(logits, teacher_logits.detach(), labels, params)
    return DenseKLRows(loss, kd, ce)


class _Params(NamedTuple):
    divergence: str
    beta: float
    alpha: float
    temperature: float
    ignore_index: int
    chunk_rows: int


class _DenseKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher_logits, labels, params):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n = logits.shape[0]
        loss, kd, ce = (torch.zeros(n, dtype=acc, device=logits.device) for _ in range(3))
        with torch.no_grad():
            for start in range(0, n, params.chunk_rows):
                end = min(n, start + params.chunk_rows)
                lab = None if labels is None else labels[start:end]
                parts = _chunk_rows(logits[start:end].to(acc), teacher_logits[start:end], lab, params)
                for whole, part in zip((loss, kd, ce), parts):
                    whole[start:end] = part
        ctx.params = params
        ctx.save_for_backward(logits, teacher_logits, labels)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        logits, teacher_logits, labels = ctx.saved_tensors
        params = ctx.params
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return None, None, None, None
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        grad = torch.empty_like(logits)
        grad_loss = grad_loss.to(acc)
        for start in range(0, logits.shape[0], params.chunk_rows):
            end = min(logits.shape[0], start + params.chunk_rows)
            lab = None if labels is None else labels[start:end]
            with torch.enable_grad():
                x = logits[start:end].detach().to(acc).requires_grad_(True)
                loss, _, _ = _chunk_rows(x, teacher_logits[start:end], lab, params)
                (g,) = torch.autograd.grad(loss, x, grad_loss[start:end])
            grad[start:end] = g.to(logits.dtype)
        return grad, None, None, None


def _chunk_rows(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, p: _Params):
    """(loss, kd, ce) [rows] for one chunk; x is already in the accumulation dtype."""
    rows, vocab = x.shape
    t = t.to(x.dtype)
    if t.shape[1] < vocab:  # the student's extra (padding) columns: teacher probability 0
        t = torch.nn.functional.pad(t, (0, vocab - t.shape[1]), value=float("-inf"))
    counted = torch.ones(rows, dtype=torch.bool, device=x.device) if labels is None else labels != p.ignore_index
    zero = x.new_zeros(rows)
    kd = ce = zero
    if p.alpha > 0:
        temp = p.temperature
        log_q = torch.log_softmax(x if temp == 1 else x / temp, dim=-1)
        log_p = torch.log_softmax(t if temp == 1 else t / temp, dim=-1)
        kd = temp * temp * _divergence(log_p, log_q, p.divergence, p.beta)
    if p.alpha < 1:
        safe = torch.where(counted, labels, torch.zeros_like(labels))
        ce = -torch.log_softmax(x, dim=-1).gather(1, safe[:, None])[:, 0]
    loss = p.alpha * kd + (1 - p.alpha) * ce if p.alpha < 1 else kd
    return (torch.where(counted, loss, zero), torch.where(counted, kd, zero).detach(),
            torch.where(counted, ce, zero).detach())


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v (log a_v - log b_v) per row, with 0 where a_v = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    if divergence == "fkl":
        return _kl(log_p, log_q)
    if divergence == "rkl":
        return _kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _check(logits, teacher_logits, labels, divergence, beta, alpha, temperature) -> None:
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def fail(message: str):
        raise DenseKLError(f"dense_kl: {message}")

    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in floats:
        fail(f"logits must be a float [N, V] tensor, got {describe(logits) if torch.is_tensor(logits) else logits!r}")
    n, vocab = logits.shape
    if (not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 2 or teacher_logits.dtype not in floats
            or teacher_logits.shape[0] != n or not 1 <= teacher_logits.shape[1] <= vocab):
        got = describe(teacher_logits) if torch.is_tensor(teacher_logits) else repr(teacher_logits)
        fail(f"teacher_logits must be a float [N, V_t] tensor with N = {n} and 1 <= V_t <= V = {vocab}, got {got}")
    if teacher_logits.device != logits.device:
        fail(f"teacher_logits must be on the logits' device {logits.device}, got {teacher_logits.device}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (n,)
                               or labels.dtype not in (torch.int32, torch.int64) or labels.device != logits.device):
        got = describe(labels)
        fail(f"labels must be int64 [N] with N = {n} on {logits.device} (or None), got {got}")
    if divergence not in DIVERGENCES:
        fail(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if divergence == "rkl" and teacher_logits.shape[1] < vocab:
        fail(f"rkl needs the teacher's vocabulary to cover the student's ({teacher_logits.shape[1]} < {vocab}): "
             "reverse KL is infinite where the student has mass and the teacher none")
    if divergence == "jsd" and not 0 < beta < 1:
        fail(f"beta must be in (0, 1) for jsd, got {beta!r}")
    if not 0 <= alpha <= 1:
        fail(f"alpha must be in [0, 1], got {alpha!r}")
    if not 0 < temperature < float("inf"):
        fail(f"temperature must be a finite number > 0, got {temperature!r}")
    if alpha < 1 and labels is None:
        fail(f"alpha = {alpha} < 1 mixes in cross-entropy, which needs labels; pass labels or use alpha=1")
