r"""Sparse KL in plain torch: the specification every kernel is tested against.

Dims: N rows (token positions), V vocabulary, K teacher top-k entries per row.

With T the temperature, for one row with student logits x [V], teacher ids i_1..i_K and teacher
log-probs logp_k (over the full vocabulary, at T = 1, so sum_k exp(logp_k) <= 1):

    teacher buckets  z_k = logp_k / T,  and with ``tail``  z_tail = ln(max(1 - sum_k exp(logp_k), TAIL_MIN)) / T
    p = softmax(z) over the K (+1) buckets
    student          log q = log_softmax(x / T) over all V,  q_k = q[i_k],
                     q_tail = sum_{j not in top-k} q_j   (= 1 - sum_k q_k for distinct ids; taken as the
                     mass outside the top-k, so it keeps its precision as it goes to 0), clamped below at TAIL_MIN
    KD   = T^2 * sum_buckets p_b (log p_b - log q_b)
    CE   = -log_softmax(x)[label]                     (at T = 1)
    loss = alpha * KD + (1 - alpha) * CE

Gradient (what the kernels' backward writes; q = softmax(x / T), Q = sum_k q_k, P = sum_k p_k).
KD depends on x only through log q_b, and d log q_j / d x_m = (delta_jm - q_m) / T, so

    d log q_k    / d x_m = (delta_{m,i_k} - q_m) / T
    d log q_tail / d x_m = -(1/T) * sum_k q_k (delta_{m,i_k} - q_m) / q_tail = q_m (Q - [m in top-k]) / (T q_tail)

and, with P + p_tail = 1 and Q + q_tail = 1 (tail on):

    d KD / d x_m = T (q_m - p_k)                        m = i_k in the top-k
    d KD / d x_m = T q_m (1 - p_tail / q_tail)          m outside the top-k
    (tail off: the same with p_tail = 0; q_tail clamped: the tail term is a constant, so
     d KD / d x_m = T (P q_m - p_k [m = i_k]))
    d CE / d x_m = softmax(x)_m - [m = label]

Every off-top-k entry shares one coefficient per row, so the backward is one dense pass
(a * q_m + b * softmax(x)_m) plus K + 1 sparse entries.

TAIL_MIN = 1e-20 (the same constant as csrc/sparse_kl_math.h): it only binds for a teacher whose
top-k holds all of its mass (K = V, or quantized log-probs summing past 1) and for a student whose
non-top-k logits all sit ~46 nats below its top-k.
"""
from __future__ import annotations

import math

import torch

TAIL_MIN = 1e-20


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
) -> torch.Tensor:
    """The sparse KL loss in plain torch (autograd gives the gradient); no input validation.

    Computes in float64 when `logits` are float64, else in float32 (so bf16/fp16 inputs are upcast:
    this materialises several [N, V] float32 tensors; it is the ground truth, not the fast path).

    Args:
        logits: float [N, V], the student's logits.
        topk_idx: int32/int64 [N, K], the teacher's top-k token ids (distinct within a row).
        topk_logp: float [N, K], the teacher's log-probabilities of those ids over the full vocab at T=1.
        labels: int64 [N] or None. Rows with ``labels == ignore_index`` count for nothing.
        tail: add the teacher's remaining mass as one more bucket.
        alpha: weight of the KD term; 1 - alpha weighs cross-entropy on `labels`.
        temperature: T > 0, applied to both distributions of the KD term (scaled back by T^2).
        ignore_index: label value of rows to ignore.
        reduction: "mean" (over counted rows; 0 if none), "sum", or "none" (per row, ignored rows 0).

    Returns:
        A scalar, or [N] for reduction="none", in the compute dtype (float32 or float64).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    idx = topk_idx.long()
    logp = topk_logp.to(dtype)
    counted = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if labels is not None:
        counted = labels != ignore_index

    loss = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    if alpha > 0:
        log_q_all = torch.log_softmax(x if temperature == 1 else x / temperature, dim=-1)
        log_q = log_q_all.gather(1, idx)
        z = logp / temperature
        if tail:
            rest = (1 - logp.exp().sum(-1)).clamp_min(TAIL_MIN)
            z = torch.cat([z, (rest.log() / temperature)[:, None]], dim=1)
            outside = log_q_all.scatter(1, idx, float("-inf"))
            log_q_tail = torch.logsumexp(outside, dim=-1).clamp_min(math.log(TAIL_MIN))
            log_q = torch.cat([log_q, log_q_tail[:, None]], dim=1)
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        loss = loss + alpha * temperature**2 * terms.sum(-1)
    if alpha < 1:
        if labels is None:
            raise ValueError("alpha < 1 mixes in cross-entropy and needs labels")
        safe = torch.where(counted, labels, torch.zeros_like(labels))
        ce = -torch.log_softmax(x, dim=-1).gather(1, safe[:, None])[:, 0]
        loss = loss + (1 - alpha) * ce
    loss = torch.where(counted, loss, torch.zeros_like(loss))

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum().clamp_min(1)
