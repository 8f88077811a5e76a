"""The compiled kernels as `torch.library` custom ops, with fake (meta) implementations and registered
autograd, so that `torch.compile` traces through the losses without graph breaks.

    torch.ops.kdengine.sparse_kl_forward    logits -> (loss_rows [N], row_stats [N, 6], topk_grad [N, K])
    torch.ops.kdengine.sparse_kl_backward   -> grad_logits [N, V]
    torch.ops.kdengine.sparse_kl_linear     hidden, weight, bias -> (loss, kd, ce, bad_rows, grads ...)
    torch.ops.kdengine.sparse_kl_linear_backward  -> (grad_hidden, grad_weight, grad_bias)

The ops take plain tensors and numbers only (no Python objects), do no input validation (the public
functions in sparse_kl.py and linear.py do), and never sync with the device.
"""
from __future__ import annotations

import torch
from torch import Tensor

ROW_STATS = 6  # csrc/sparse_kl_math.h kRowStats
STAT_KD, STAT_CE = 4, 5


def _ext():
    from kdengine import _C

    return _C


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- sparse_kl over given logits ---------------------------------------------------------------
@torch.library.custom_op("kdengine::sparse_kl_forward", mutates_args=())
def sparse_kl_forward(logits: Tensor, topk_idx: Tensor, topk_logp: Tensor, labels: Tensor | None,
                      tempered_lse: Tensor | None, tail: bool, alpha: float, temperature: float, ignore_index: int,
                      divergence: int, beta: float, parts: bool) -> tuple[Tensor, Tensor, Tensor]:
    loss_rows, row_stats, topk_grad = _ext().forward(logits, topk_idx, topk_logp, labels, tail, alpha, temperature,
                                                     ignore_index, divergence, beta, tempered_lse, parts)
    return loss_rows, row_stats, topk_grad


@sparse_kl_forward.register_fake
def _(logits, topk_idx, topk_logp, labels, tempered_lse, tail, alpha, temperature, ignore_index, divergence, beta,
      parts):
    n, k = topk_idx.shape
    acc = _acc(logits.dtype)
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n, ROW_STATS), dtype=acc),
            logits.new_empty((n, k), dtype=acc))


@torch.library.custom_op("kdengine::sparse_kl_backward", mutates_args=())
def sparse_kl_backward(grad_rows: Tensor, logits: Tensor, topk_idx: Tensor, labels: Tensor | None, row_stats: Tensor,
                       topk_grad: Tensor, alpha: float, temperature: float, ignore_index: int) -> Tensor:
    return _ext().backward(grad_rows, logits, topk_idx, labels, row_stats, topk_grad, alpha, temperature, ignore_index)


@sparse_kl_backward.register_fake
def _(grad_rows, logits, topk_idx, labels, row_stats, topk_grad, alpha, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _forward_setup(ctx, inputs, output):
    logits, topk_idx, _, labels, _, _, alpha, temperature, ignore_index, _, _, _ = inputs
    _, row_stats, topk_grad = output
    ctx.save_for_backward(logits, topk_idx, labels, row_stats, topk_grad)
    ctx.params = (alpha, temperature, ignore_index)


def _forward_backward(ctx, grad_rows, _grad_stats, _grad_topk):
    logits, topk_idx, labels, row_stats, topk_grad = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        # The per-row weights fold into the kernel's per-row coefficients: a scalar upstream gradient
        # (mean/sum) or a vector one (reduction="none") costs the same single pass.
        grad_logits = sparse_kl_backward(grad_rows.to(row_stats.dtype).contiguous(), logits, topk_idx, labels,
                                         row_stats, topk_grad, *ctx.params)
    return (grad_logits,) + (None,) * 11


torch.library.register_autograd("kdengine::sparse_kl_forward", _forward_backward, setup_context=_forward_setup)


# ---- sparse_kl_linear: the output head fused in, chunk by chunk ---------------------------------
def _linear_chunks(hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse, softcap, chunk_rows, tail, alpha,
                   temperature, ignore_index, divergence, beta, parts, row_weights, want_grads):
    """Runs the head + kernel forward (and, with `want_grads`, the kernel backward with upstream
    per-row gradients `row_weights` [N] folded into the head's gradients) chunk by chunk.

    Returns (loss_rows [N], row_stats [N, 6], grad_hidden, grad_weight (float32), grad_bias (float32)),
    the gradients empty when not wanted."""
    ext = _ext()
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc(hidden.dtype)
    loss_rows = hidden.new_empty((n,), dtype=acc)
    row_stats = hidden.new_empty((n, ROW_STATS), dtype=acc)
    grad_hidden = torch.empty_like(hidden) if want_grads else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grads else hidden.new_empty(0)
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if want_grads and bias is not None else hidden.new_empty(0)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        h = hidden[rows]
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        if softcap:
            capped = torch.tanh(logits / softcap)
            logits = capped * softcap
        lab = None if labels is None else labels[rows]
        lr, rs, tg = ext.forward(logits, topk_idx[rows], topk_logp[rows], lab, tail, alpha, temperature, ignore_index,
                                 divergence, beta, None if tempered_lse is None else tempered_lse[rows], parts)
        loss_rows[rows], row_stats[rows] = lr, rs
        if not want_grads:
            continue
        dlogits = ext.backward(row_weights[rows].contiguous(), logits, topk_idx[rows], lab, rs, tg, alpha, temperature,
                               ignore_index)
        del logits
        if softcap:
            dlogits = dlogits * (1 - capped * capped).to(dlogits.dtype)
            del capped
        torch.mm(dlogits, weight, out=grad_hidden[rows])
        if acc == dlogits.dtype:
            grad_weight.addmm_(dlogits.t(), h)
        else:  # a low-precision chunk product, accumulated in float32 across chunks
            grad_weight += dlogits.t() @ h
        if bias is not None:
            grad_bias += dlogits.sum(0, dtype=acc)
    return loss_rows, row_stats, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("kdengine::sparse_kl_linear", mutates_args=())
def sparse_kl_linear_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, topk_idx: Tensor, topk_logp: Tensor,
                             labels: Tensor | None, tempered_lse: Tensor | None, row_weights: Tensor | None,
                             softcap: float, chunk_rows: int, tail: bool, alpha: float, temperature: float,
                             ignore_index: int, divergence: int, beta: float, parts: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss_rows, row_stats, grad_hidden, grad_weight, grad_bias); with `row_weights` (the upstream
    gradient of each row's loss, known up to a scalar factor for a reduced loss) the gradients are
    computed in the same pass, else they come back empty."""
    return _linear_chunks(hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse, softcap, chunk_rows, tail,
                          alpha, temperature, ignore_index, divergence, beta, parts, row_weights, row_weights is not None)


@sparse_kl_linear_forward.register_fake
def _(hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse, row_weights, softcap, chunk_rows, tail, alpha,
      temperature, ignore_index, divergence, beta, parts):
    n, acc = hidden.shape[0], _acc(hidden.dtype)
    want = row_weights is not None
    return (hidden.new_empty((n,), dtype=acc), hidden.new_empty((n, ROW_STATS), dtype=acc),
            torch.empty_like(hidden) if want else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=acc) if want else hidden.new_empty(0),
            weight.new_empty((weight.shape[0],), dtype=acc) if want and bias is not None else hidden.new_empty(0))


@torch.library.custom_op("kdengine::sparse_kl_linear_backward", mutates_args=())
def sparse_kl_linear_backward(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                              topk_idx: Tensor, topk_logp: Tensor, labels: Tensor | None, tempered_lse: Tensor | None,
                              softcap: float, chunk_rows: int, tail: bool, alpha: float, temperature: float,
                              ignore_index: int, divergence: int, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients for a per-row upstream gradient, recomputing each chunk (reduction="none")."""
    _, _, gh, gw, gb = _linear_chunks(hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse, softcap,
                                      chunk_rows, tail, alpha, temperature, ignore_index, divergence, beta, False,
                                      grad_rows, True)
    return gh, gw, gb


@sparse_kl_linear_backward.register_fake
def _(grad_rows, hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse, softcap, chunk_rows, tail, alpha,
      temperature, ignore_index, divergence, beta):
    acc = _acc(hidden.dtype)
    return (torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=acc),
            weight.new_empty((weight.shape[0],), dtype=acc) if bias is not None else hidden.new_empty(0))


def _linear_setup(ctx, inputs, output):
    (hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse, row_weights, softcap, chunk_rows, tail, alpha,
     temperature, ignore_index, divergence, beta, _) = inputs
    _, _, grad_hidden, grad_weight, grad_bias = output
    ctx.precomputed = row_weights is not None
    ctx.has_bias = bias is not None
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if ctx.precomputed:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse)
        ctx.params = (softcap, chunk_rows, tail, alpha, temperature, ignore_index, divergence, beta)


def _linear_backward(ctx, grad_rows, *_unused):
    if ctx.precomputed:
        # The forward used the upstream gradient up to one scalar factor, the same for every row
        # (sparse_kl_linear passes row_weights = 1 and reduces by a sum): that factor is any entry
        # of grad_rows, here their mean (0 for an empty batch).
        gh, gw, gb = ctx.saved_tensors
        scale = grad_rows.sum() / max(grad_rows.numel(), 1)
    else:
        hidden, weight, bias, topk_idx, topk_logp, labels, tempered_lse = ctx.saved_tensors
        gh, gw, gb = sparse_kl_linear_backward(grad_rows.to(_acc(hidden.dtype)).contiguous(), hidden, weight, bias,
                                               topk_idx, topk_logp, labels, tempered_lse, *ctx.params)
        scale = None
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes

    def out(g, dtype):
        g = g if scale is None else g * scale.to(g.dtype)
        return g.to(dtype)

    grads = [out(gh, hidden_dtype), out(gw, weight_dtype), out(gb, bias_dtype) if ctx.has_bias else None]
    return tuple(grads) + (None,) * 14


torch.library.register_autograd("kdengine::sparse_kl_linear", _linear_backward, setup_context=_linear_setup)
