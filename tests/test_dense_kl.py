"""dense_kl against independent full-vocabulary formulas (torch.nn.functional.kl_div and explicit
mixtures): loss and gradient per divergence, temperature, alpha, dtype, chunk size, ignored rows."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdengine.losses.dense_kl import DenseKLError, dense_kl, dense_kl_rows

N, V = 37, 301  # odd shapes: chunks do not divide them


def _inputs(dtype=torch.float32, n=N, v=V, vt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = torch.randn(n, vt or v, generator=g) * 4
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return x, t, labels


def _expected_rows(x, t, labels, *, divergence="fkl", beta=0.5, alpha=1.0, temperature=1.0):
    """The loss per row, written independently of dense_kl (F.kl_div; unchunked; float64)."""
    x, t = x.double(), t.double()
    if t.shape[1] < x.shape[1]:
        t = F.pad(t, (0, x.shape[1] - t.shape[1]), value=float("-inf"))
    log_q = F.log_softmax(x / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    if divergence == "fkl":
        kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").nan_to_num(0.0).sum(-1)
    elif divergence == "rkl":
        kd = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    else:
        m = beta * log_p.exp() + (1 - beta) * log_q.exp()
        kd = (beta * F.kl_div(m.log(), log_p, log_target=True, reduction="none").nan_to_num(0.0).sum(-1)
              + (1 - beta) * F.kl_div(m.log(), log_q, log_target=True, reduction="none").sum(-1))
    kd = temperature**2 * kd
    ce = F.cross_entropy(x, labels, reduction="none", ignore_index=-100)
    loss = alpha * kd + (1 - alpha) * ce
    return torch.where(labels != -100, loss, torch.zeros_like(loss))


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.7), (0.5, 0.0)])
def test_rows_and_gradient_match_full_vocabulary_formulas(divergence, temperature, alpha):
    x, t, labels = _inputs(torch.float64)
    x.requires_grad_(True)
    ours = dense_kl(x, t, labels, divergence=divergence, beta=0.3, alpha=alpha, temperature=temperature,
                    reduction="none", chunk_rows=8)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = _expected_rows(x_ref, t, labels, divergence=divergence, beta=0.3, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    w = torch.rand(N, dtype=torch.float64)  # a grad_output that is not 1
    (ours * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    assert bool((x.grad[labels == -100] == 0).all())


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
@pytest.mark.parametrize("chunk_rows", [1, 5, None])
def test_low_precision_accumulates_in_float32(dtype, rtol, chunk_rows):
    x, t, labels = _inputs(dtype)
    x.requires_grad_(True)
    loss = dense_kl(x, t.to(dtype), labels, alpha=0.5, temperature=2.0, reduction="sum", chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32
    expected = _expected_rows(x.detach(), t.to(dtype), labels, alpha=0.5, temperature=2.0).sum()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=rtol)
    loss.backward()
    assert x.grad.dtype == dtype
    ref = x.detach().double().requires_grad_(True)
    _expected_rows(ref, t.to(dtype), labels, alpha=0.5, temperature=2.0).sum().backward()
    # relative to each row's largest entry, so that small entries are seen too
    scale = ref.grad.abs().amax(1, keepdim=True).clamp_min(1e-30)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert float(((x.grad.double() - ref.grad) / scale).abs().max()) < tol


def test_reductions_parts_and_all_ignored():
    x, t, labels = _inputs()
    rows = dense_kl_rows(x, t, labels, alpha=0.25)
    counted = labels != -100
    assert torch.allclose(rows.loss, 0.25 * rows.kd + 0.75 * rows.ce, atol=1e-6)
    assert torch.allclose(rows.kd, _expected_rows(x, t, labels).float(), rtol=1e-5, atol=1e-6)
    mean = dense_kl(x, t, labels, alpha=0.25)
    assert float(mean) == pytest.approx(float(rows.loss.sum() / counted.sum()), rel=1e-6)
    assert not rows.kd.requires_grad and not rows.ce.requires_grad
    ignored = torch.full_like(labels, -100)
    x.requires_grad_(True)
    loss = dense_kl(x, t, ignored, alpha=0.5)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert bool((x.grad == 0).all())


def test_teacher_narrower_than_student_gets_zero_mass_on_padding_columns():
    x, t, labels = _inputs(vt=V - 11)
    ours = dense_kl(x, t, labels, reduction="none")
    assert torch.allclose(ours, _expected_rows(x, t, labels).float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(DenseKLError, match="rkl needs the teacher's vocabulary"):
        dense_kl(x, t, labels, divergence="rkl")


def test_gradcheck_float64():
    x, t, labels = _inputs(torch.float64, n=4, v=7)
    x.requires_grad_(True)
    for divergence in ("fkl", "rkl", "jsd"):
        assert torch.autograd.gradcheck(
            lambda z: dense_kl(z, t, labels, divergence=divergence, alpha=0.6, temperature=1.5, chunk_rows=3), (x,),
            fast_mode=True)


def test_equal_distributions_give_zero():
    x, _, labels = _inputs()
    for divergence in ("fkl", "rkl", "jsd"):
        assert float(dense_kl(x, x.clone(), labels, divergence=divergence).abs()) < 1e-6


@pytest.mark.parametrize("kwargs,message", [
    ({"divergence": "kl"}, "divergence must be one of fkl, rkl, jsd"),
    ({"divergence": "jsd", "beta": 1.0}, r"beta must be in \(0, 1\)"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"chunk_rows": 0}, "chunk_rows must be >= 1"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    x, t, labels = _inputs()
    with pytest.raises(DenseKLError, match=message):
        dense_kl(x, t, labels, **kwargs)


def test_bad_shapes_are_errors():
    x, t, labels = _inputs()
    with pytest.raises(DenseKLError, match="teacher_logits must be a float"):
        dense_kl(x, t[:-1], labels)
    with pytest.raises(DenseKLError, match="teacher_logits must be a float"):
        dense_kl(x, torch.randn(N, V + 1), labels)
    with pytest.raises(DenseKLError, match="needs labels"):
        dense_kl(x, t, None, alpha=0.5)
    assert math.isfinite(float(dense_kl(x, t, None)))
