r"""Sparse KL in plain torch: the specification every kernel is tested against.

Dims: N rows (token positions), V vocabulary, K teacher top-k entries per row.

With T the temperature, for one row with student logits x [V], teacher ids i_1..i_K and teacher
log-probs logp_k (over the full vocabulary, at T = 1, so sum_k exp(logp_k) <= 1):

    teacher buckets  z_k = logp_k / T,  and with ``tail``  z_tail = ln(max(1 - sum_k exp(logp_k), TAIL_MIN)) / T
                     (approximate for T != 1: it treats the tail as one token), or, exactly, given
                     c_T = logsumexp over the teacher's full vocabulary of logp / T (``tempered_lse``):
                     z_k = logp_k / T - c_T = log p_T,k  and  z_tail = ln(max(1 - sum_k exp(z_k), TAIL_MIN))
    p = softmax(z) over the K (+1) buckets
    student          log q = log_softmax(x / T) over all V,  q_k = q[i_k],
                     q_tail = sum_{j not in top-k} q_j   (= 1 - sum_k q_k for distinct ids; taken as the
                     mass outside the top-k, so it keeps its precision as it goes to 0), clamped below at TAIL_MIN
    D (divergence over the buckets b, ``divergence=``):
        fkl  sum_b p_b (log p_b - log q_b)
        rkl  sum_b q_b (log q_b - log p_b)                                  (needs the tail bucket)
        jsd  beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,  0 < beta < 1  (needs the tail)
    KD   = T^2 * D
    CE   = -log_softmax(x)[label]                     (at T = 1)
    loss = alpha * KD + (1 - alpha) * CE

Without the tail bucket the student's mass outside the teacher's top-k would be invisible to rkl and
jsd (q_b would not sum to 1), so they require it.

Gradient (what the kernels' backward writes; q = softmax(x / T), Q = sum_k q_k, P = sum_k p_k).
D depends on x only through log q_b, and d log q_j / d x_m = (delta_jm - q_m) / T, so

    d log q_k    / d x_m = (delta_{m,i_k} - q_m) / T
    d log q_tail / d x_m = ([m not in top-k] / q_tail - 1) q_m / T

With g_b = dD / d log q_b and G = sum_b g_b (g_tail = 0 when q_tail is clamped: the tail term is then
a constant), for any D:

    d KD / d x_m = T (g_k - q_k G)                      m = i_k in the top-k
    d KD / d x_m = T q_m (g_tail / q_tail - G)          m outside the top-k

    fkl  g_b = -p_b;  G = -1 with the tail (-P if q_tail is clamped), -1 without it (P = 1 then), so
         top-k  T (q_m - p_k),  outside  T q_m (1 - p_tail / q_tail)    (clamped: T (P q_m - p_k), T P q_m)
    rkl  g_b = q_b (log q_b - log p_b + 1);  G = D + 1 (sum_b q_b = 1), so
         top-k  T q_k (log q_k - log p_k - D),  outside  T q_m (log q_tail - log p_tail - D)
    jsd  dD / dq_b = (1 - beta) log(q_b / m_b) (the beta p_b / m_b and (1 - beta) q_b / m_b terms of the
         two KLs sum to 1 and cancel the +1 of d(q log q)), so g_b = (1 - beta) q_b log(q_b / m_b),
         G = (1 - beta) KL(q || m):
         top-k  T (1 - beta) q_k (log(q_k / m_k) - KL(q||m)),  outside  T (1 - beta) q_m (log(q_tail / m_tail) - KL(q||m))
    d CE / d x_m = softmax(x)_m - [m = label]

Every off-top-k entry shares one coefficient per row, so the backward is one dense pass
(a * q_m + b * softmax(x)_m) plus K + 1 sparse entries, whatever the divergence; the forward keeps
O(N K) statistics (the K top-k coefficients and a few numbers per row).

TAIL_MIN = 1e-20 (the same constant as csrc/sparse_kl_math.h): it only binds for a teacher whose
top-k holds all of its mass (K = V, or quantized log-probs summing past 1) and for a student whose
non-top-k logits all sit ~46 nats below its top-k.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

TAIL_MIN = 1e-20
DIVERGENCES = ("fkl", "rkl", "jsd")


class SparseKLOutput(NamedTuple):
    """What ``return_parts=True`` returns: the loss and, reduced the same way and detached (for
    logging), its KD part (T^2 D, before alpha) and CE part (None without labels)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor | None


def sparse_kl_reference(
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
) -> torch.Tensor | SparseKLOutput:
    """The sparse KL loss in plain torch (autograd gives the gradient); no input validation.

    Computes in float64 when `logits` are float64, else in float32 (so bf16/fp16 inputs are upcast:
    this materialises several [N, V] float32 tensors; it is the ground truth, not the fast path).

    Args:
        logits: float [N, V], the student's logits.
        topk_idx: int32/int64 [N, K], the teacher's top-k token ids (distinct within a row); -1 marks
            a padding entry (its log-prob is -inf), which counts for nothing.
        topk_logp: float [N, K], the teacher's log-probabilities of those ids over the full vocab at T=1.
        labels: int64 [N] or None. Rows with ``labels == ignore_index`` count for nothing.
        tail: add the teacher's remaining mass as one more bucket (required by rkl and jsd).
        alpha: weight of the KD term; 1 - alpha weighs cross-entropy on `labels`.
        temperature: T > 0, applied to both distributions of the KD term (scaled back by T^2).
        ignore_index: label value of rows to ignore.
        reduction: "mean" (over counted rows; 0 if none), "sum", or "none" (per row, ignored rows 0).
        divergence: "fkl", "rkl" or "jsd" (see the module docstring).
        beta: the jsd mixture weight, in (0, 1).
        tempered_lse: float [N] or None, c_T = logsumexp_V(logp / T) of the teacher at this temperature:
            makes the tempered tail exact (only the tail bucket uses it; without the tail it cancels).
        return_parts: return a SparseKLOutput (loss, kd, ce) instead of the loss.

    Returns:
        A scalar, or [N] for reduction="none", in the compute dtype (float32 or float64); or a
        SparseKLOutput of such tensors.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    padding = topk_idx < 0  # id -1 with log-prob -inf: an absent entry (adaptive-K rows)
    idx = topk_idx.long().clamp_min(0)
    logp = topk_logp.to(dtype).masked_fill(padding, float("-inf"))
    counted = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if labels is not None:
        counted = labels != ignore_index
    zeros = torch.zeros(x.shape[0], dtype=dtype, device=x.device)

    loss = zeros
    kd = zeros
    if alpha > 0 or return_parts:
        d = _divergence_rows(x, idx, padding, logp, tail, temperature, divergence, beta, tempered_lse)
        kd = temperature**2 * d
        if alpha > 0:
            loss = loss + alpha * temperature**2 * d
    ce = None
    if alpha < 1 or (return_parts and labels is not None):
        if labels is None:
            raise ValueError("alpha < 1 mixes in cross-entropy and needs labels")
        safe = torch.where(counted, labels, torch.zeros_like(labels))
        ce = -torch.log_softmax(x, dim=-1).gather(1, safe[:, None])[:, 0]
        if alpha < 1:
            loss = loss + (1 - alpha) * ce
    loss = torch.where(counted, loss, zeros)
    if not return_parts:
        return _reduce(loss, counted, reduction)
    kd = torch.where(counted, kd, zeros).detach()
    ce = None if ce is None else torch.where(counted, ce, zeros).detach()
    return SparseKLOutput(_reduce(loss, counted, reduction), _reduce(kd, counted, reduction),
                          None if ce is None else _reduce(ce, counted, reduction))


def _divergence_rows(x, idx, padding, logp, tail, temperature, divergence, beta, tempered_lse):
    """D per row [N] (before the T^2 factor) over the K (+ tail) buckets; padding entries are no
    bucket (p = q = 0)."""
    log_q_all = torch.log_softmax(x if temperature == 1 else x / temperature, dim=-1)
    log_q = log_q_all.gather(1, idx).masked_fill(padding, float("-inf"))
    if tempered_lse is None:
        z = logp / temperature
    else:
        z = logp / temperature - tempered_lse.to(logp.dtype)[:, None]
    if tail:
        if tempered_lse is None:
            rest = (1 - logp.exp().sum(-1)).clamp_min(TAIL_MIN)
            z_tail = rest.log() / temperature
        else:
            z_tail = (1 - z.exp().sum(-1)).clamp_min(TAIL_MIN).log()
        z = torch.cat([z, z_tail[:, None]], dim=1)
        in_topk = torch.zeros(x.shape[0], x.shape[1] + 1, dtype=torch.bool, device=x.device)
        in_topk.scatter_(1, torch.where(padding, x.shape[1], idx), True)
        outside = log_q_all.masked_fill(in_topk[:, :-1], float("-inf"))
        log_q_tail = torch.logsumexp(outside, dim=-1).clamp_min(math.log(TAIL_MIN))
        log_q = torch.cat([log_q, log_q_tail[:, None]], dim=1)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    if divergence == "fkl":
        return _xlogy_rows(p, log_p, log_q)
    q = log_q.exp()
    if divergence == "rkl":
        return _xlogy_rows(q, log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _xlogy_rows(p, log_p, log_m) + (1 - beta) * _xlogy_rows(q, log_q, log_m)


def _xlogy_rows(a, log_a, log_b):
    """sum_b a (log a - log b) per row, with 0 where a = 0."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _reduce(rows: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / counted.sum().clamp_min(1)
