r"""Sampled-target KL (RS-KD) in plain torch: the specification the sampled kernels are tested against.

Dims: N rows (token positions), V vocabulary, K slots per row (the distinct sampled ids, padded).

**Targets.** Per row the dump drew M ids y_1..y_M independently from a proposal r over the full
vocabulary (the teacher's distribution tempered by the proposal temperature tau,
r = softmax(log p / tau), with full support), and kept the distinct ids i_k with their counts c_k
(sum_k c_k = M) and log-probabilities. Slots with c_k = 0 are padding and are ignored.

**Estimator.** With T the loss temperature, the dense KD target is p^T = softmax(log p / T) and the
student's q^T = softmax(x / T), over all V. Per row

    w_k      = (c_k / M) * exp(log p^T_{i_k} - log r_{i_k})         (the importance-weighted frequency)
    S        = sum_k w_k
    KD_hat   = T^2 * sum_k w_k (log p^T_{i_k} - log q^T_{i_k})
    CE       = -log_softmax(x)[label]                               (at T = 1)
    loss     = alpha * KD_hat + (1 - alpha) * CE

``target_logp`` is log p^T at the ids (normalised over the full vocabulary at the loss temperature)
and ``proposal_logp`` is log r; without ``proposal_logp`` the proposal is p^T itself (tau = T) and
w_k = c_k / M, S = 1.

**Unbiasedness (proof).** Write w as a vector over the vocabulary: w_v = (c_v / M) p^T_v / r_v, 0
for ids not drawn. c_v = sum_n [y_n = v] with y_n ~ r i.i.d., so E[c_v] = M r_v and
E[w_v] = p^T_v for every v with r_v > 0, which is every v with p^T_v > 0 (the proposal has full
support). KD_hat is linear in w with coefficients T^2 (log p^T_v - log q^T_v) that do not depend
on the draws, so for every student x

    E[KD_hat(x)] = T^2 sum_v p^T_v (log p^T_v - log q^T_v) = T^2 KL(p^T || q^T) = KD(x).

Its gradient: d log q^T_v / d x_m = (delta_vm - q^T_m) / T, hence

    d KD_hat / d x_m = T (S q^T_m - w_m)     (w_m = 0 off the drawn ids)

which is linear in w too, with E[S] = sum_v p^T_v = 1, so E[grad KD_hat] = T (q^T - p^T) = grad KD:
an unbiased estimate of the full-vocabulary forward-KL gradient, at every x and so at every
training step (the draws are made once, at dump time, independently of the student). The variance
of each entry is O(1/M). Two things would break this and are avoided: renormalising w to sum to 1
(the self-normalised estimator, w / S, is biased whenever tau != T), and the top-k cut (its target
is p restricted to the K largest entries, which no number of steps averages back to p). At tau = T
the weights are plain frequencies, S = 1 and the two estimators coincide (the RS-KD of Anshumann
et al., 2025, with the teacher as its own proposal).

**Exact head (lower variance, still unbiased).** With `--exact-top H` the dump keeps the teacher's H
most likely ids exactly and draws the M ids from r_v = p_v / (1 - P_H) over the rest (P_H: the head's
mass; T = tau = 1). The weights are w_v = p_v on the head and w_v = (c_v / M)(1 - P_H) off it, so
E[w_v] = p_v everywhere (E[c_v] = M r_v off the head) and KD_hat and its gradient are unbiased as
above; moreover S = P_H + (1 - P_H) sum_k c_k / M = 1 exactly, and the gradient T (q - w) varies only
in the tail: Var(w_v) = (1 - P_H)^2 r_v (1 - r_v) / M, a factor (1 - P_H)^2 below the plain draws' on
the same ids, where LLM teachers put most of their mass in a few ids. (The store quantizes log p to
1/1024 nats, so a head weight is p_v within a factor exp(+-1/2048), the same rounding a top-k
store's values carry; the drawn ids' weights use the exact float32 ln(1 - P_H).) The kernels take this as
ordinary (count, target_logp, proposal_logp): head slots count 1 with log r = -ln(H + M), drawn slots
log r = log p - ln(1 - P_H) + ln(M / (H + M)), which make c_k / (H + M) * exp(log p_k - log r_k) the
weights above (`kdengine.sampling.loss_targets`).

**Temperatures the store can serve.** The store keeps log p at T = 1 and log r at tau, both
normalised over the full vocabulary at dump time. log p^T_v = log p_v / T - log sum_u p_u^(1/T) needs
a full-vocabulary normaliser, which is known only for T = 1 (it is 0) and T = tau (log r), so a
store with proposal temperature tau trains unbiasedly at T = 1 (importance weights p / r) or T = tau
(plain frequencies).

Gradient as the kernels write it: every id that was not drawn shares the coefficient T S / S_T of
its exp, so the backward is one dense pass plus K sparse entries (T (S q_k - w_k) at the drawn ids),
exactly the shape of the top-k loss's backward with c_rest = S.
"""
from __future__ import annotations

import torch


def sampled_kl_reference(
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
    """The sampled-target KD loss in plain torch (autograd gives the gradient); no input validation.

    Computes in float64 when `logits` are float64, else in float32.

    Args:
        logits: float [N, V], the student's logits.
        sample_idx: int [N, K], the distinct drawn ids per row (any value where the count is 0).
        sample_count: [N, K] (int or float), how often each id was drawn; 0 marks a padding slot.
        target_logp: float [N, K], log p^T of the ids (teacher at the loss temperature, normalised
            over the full vocabulary).
        proposal_logp: float [N, K] or None, log r of the ids under the proposal they were drawn
            from; None when the proposal is p^T itself.
        labels: int [N] or None. Rows with ``labels == ignore_index`` count for nothing.
        alpha: weight of the KD term; 1 - alpha weighs cross-entropy on `labels`.
        temperature: T > 0 of the student's softmax in the KD term (scaled back by T^2).
        ignore_index: label value of rows to ignore.
        reduction: "mean" (over counted rows; 0 if none), "sum", or "none" (per row, ignored rows 0).

    Returns:
        A scalar, or [N] for reduction="none", in the compute dtype (float32 or float64).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    n = x.shape[0]
    counted = torch.ones(n, dtype=torch.bool, device=x.device) if labels is None else labels != ignore_index
    loss = torch.zeros(n, dtype=dtype, device=x.device)
    if alpha > 0:
        count = sample_count.to(dtype)
        drawn = count > 0
        idx = torch.where(drawn, sample_idx.long(), torch.zeros_like(sample_idx, dtype=torch.long))
        log_ratio = torch.zeros_like(count) if proposal_logp is None else target_logp.to(dtype) - proposal_logp.to(dtype)
        draws = count.sum(-1, keepdim=True).clamp_min(1)
        w = torch.where(drawn, count / draws * torch.where(drawn, log_ratio, 0).exp(), 0)
        log_q = torch.log_softmax(x / temperature, dim=-1).gather(1, idx)
        terms = torch.where(drawn, w * (torch.where(drawn, target_logp.to(dtype), 0) - log_q), 0)
        loss = loss + alpha * temperature**2 * terms.sum(-1)
    if alpha < 1:
        if labels is None:
            raise ValueError("alpha < 1 mixes in cross-entropy and needs labels")
        safe = torch.where(counted, labels, torch.zeros_like(labels))
        loss = loss + (1 - alpha) * -torch.log_softmax(x, dim=-1).gather(1, safe[:, None])[:, 0]
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum().clamp_min(1)
