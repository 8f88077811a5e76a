"""sampled_kl (RS-KD): unbiasedness by Monte Carlo, and the kernels against the float64 reference.

Monte Carlo tolerance: the mean of R independent gradient estimates (each from M draws) must lie
within 5 standard errors of the dense forward-KL gradient in every vocabulary entry, the standard
error being the estimator's exact one, sqrt(Var_m / (M R)) (Var_m computed in closed form from the
teacher, the proposal and the student), plus 1e-6 for the kernel's float32 rounding. The bound
shrinks like 1/sqrt(R); the top-k gradient, which has no randomness, must sit outside it at the
largest R.
Kernel checks: errors relative to the largest reference magnitude, <= 1e-5 for float32 logits and
<= 1e-2 for bfloat16/float16.
"""
import math
import zlib

import pytest
import torch

from kdengine.losses.sampled_kl import SampledKLError, sampled_extension_available, sampled_kl
from kdengine.losses.sampled_reference import sampled_kl_reference
from kdengine.losses.reference import sparse_kl_reference
from kdengine.sampling import dedupe_draws, draw_targets, loss_targets, sample_seed

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _teacher_and_student(vocab, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(vocab, generator=g, dtype=torch.float64) * scale
    student = torch.randn(vocab, generator=g, dtype=torch.float64) * scale
    return teacher, student


def _dense_grad(teacher_logits, student, temperature):
    x = student.clone().requires_grad_()
    p = torch.softmax(teacher_logits / temperature, -1)
    kd = temperature**2 * (p * (p.log() - torch.log_softmax(x / temperature, -1))).sum()
    kd.backward()
    return kd.detach(), x.grad


def _per_draw_std(teacher_logits, student, tau, temperature):
    """Exact std of one draw's gradient contribution z(y) = T rho_y (q - e_y), rho = p^T / r, y ~ r:
    the sampled gradient from M draws is their mean, so its std is this / sqrt(M)."""
    t = temperature
    p_t = torch.softmax(teacher_logits / t, -1)
    r = torch.softmax(torch.log_softmax(teacher_logits, -1) / tau, -1)
    rho = p_t / r
    q = torch.softmax(student / t, -1)
    second = t**2 * (q**2 * (r * rho**2).sum() - 2 * q * r * rho**2 + r * rho**2)
    return (second - (t * (q - p_t)) ** 2).clamp_min(0).sqrt()


def _sampled_grads(teacher_logits, student, repeats, draws, tau, temperature, seed, exact_top=0):
    """Per-draw-set gradients [R, V] and loss values [R] of the sampled loss (one row per draw set)."""
    gen = torch.Generator().manual_seed(seed)
    t = draw_targets(teacher_logits.expand(repeats, -1), draws, proposal_temperature=tau, exact_top=exact_top,
                     generator=gen)
    target, proposal = loss_targets(t, tau, temperature, exact_top)
    x = student.expand(repeats, -1).clone().requires_grad_()
    loss = sampled_kl(x, t.ids, t.counts, target.float(), None if proposal is None else proposal.float(),
                      temperature=temperature, reduction="sum")
    loss.backward()
    rows = sampled_kl(x.detach(), t.ids, t.counts, target.float(),
                      None if proposal is None else proposal.float(), temperature=temperature, reduction="none")
    return x.grad.double(), rows.double()


@pytest.mark.parametrize("tau,temperature", [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0)], ids=["tau1", "is-tau2-T1", "tau2-T2"])
def test_sampled_gradient_converges_to_dense_kl_gradient_while_topk_does_not(tau, temperature):
    vocab, draws, k = 40, 12, 12
    teacher, student = _teacher_and_student(vocab, seed=zlib.crc32(f"{tau}{temperature}".encode()))
    kd_dense, g_dense = _dense_grad(teacher, student, temperature)
    # Top-k with the tail bucket at the same K: deterministic, so averaging does not help it.
    logp = torch.log_softmax(teacher, -1)
    top = logp.topk(k)
    x = student[None].clone().requires_grad_()
    sparse_kl_reference(x, top.indices[None], top.values[None].float(), tail=True, temperature=temperature).backward()
    g_topk = x.grad[0]

    std = _per_draw_std(teacher, student, tau, temperature)
    bounds = []
    for repeats in (1000, 16000):
        grads, losses = _sampled_grads(teacher, student, repeats, draws, tau, temperature, seed=repeats)
        err = (grads.mean(0) - g_dense).abs()
        bound = 5 * std / math.sqrt(draws * repeats) + 1e-6
        assert (err <= bound).all(), f"R={repeats}: max excess {(err - bound).max():.3e}"
        loss_bound = 5 * losses.std() / math.sqrt(repeats) + 1e-5
        assert abs(losses.mean() - kd_dense) <= loss_bound, (losses.mean(), kd_dense, loss_bound)
        bounds.append(bound.max())
    assert bounds[1] < bounds[0] / 2  # the tolerance shrinks with the draws (1/sqrt(16) = 1/4)
    assert ((g_topk - g_dense).abs() > bound).any(), "top-k's gradient should be biased beyond the MC bound"


def test_exact_head_gradient_converges_to_dense_kl_gradient_with_less_variance():
    """With the H most likely ids exact and M draws off them, the weights sum to 1 exactly and the
    gradient q - w varies only through the tail: per draw, entry m of w has std (1 - P_H) sqrt(r_m (1 - r_m))
    (r = p off the head, renormalised), 0 on the head. Same 5-sigma bound as above; and its total
    variance is below half that of M plain draws."""
    vocab, draws, head = 40, 12, 4
    teacher, student = _teacher_and_student(vocab, seed=11)
    kd_dense, g_dense = _dense_grad(teacher, student, 1.0)
    p = torch.softmax(teacher, -1)
    head_ids = p.topk(head).indices
    r = p.clone()
    r[head_ids] = 0
    p_head = 1 - r.sum()
    r = r / r.sum()
    std = (1 - p_head) * (r * (1 - r)).sqrt()
    for repeats in (1000, 16000):
        grads, losses = _sampled_grads(teacher, student, repeats, draws, 1.0, 1.0, seed=repeats, exact_top=head)
        err = (grads.mean(0) - g_dense).abs()
        bound = 5 * std / math.sqrt(draws * repeats) + 1e-6
        assert (err <= bound).all(), f"R={repeats}: max excess {(err - bound).max():.3e}"
        assert (err[head_ids] <= 1e-5).all()  # the head's entries carry no randomness at all
        loss_bound = 5 * losses.std() / math.sqrt(repeats) + 1e-5
        assert abs(losses.mean() - kd_dense) <= loss_bound, (losses.mean(), kd_dense, loss_bound)
    plain, _ = _sampled_grads(teacher, student, 4000, draws, 1.0, 1.0, seed=5)
    hybrid, _ = _sampled_grads(teacher, student, 4000, draws, 1.0, 1.0, seed=5, exact_top=head)
    assert hybrid.var(0).sum() < plain.var(0).sum() / 2, (hybrid.var(0).sum(), plain.var(0).sum())


def test_exact_head_draws_never_repeat_the_head_and_handle_an_underflowing_tail():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [400.0, 0.0, 0.0, 0.0, 0.0, 300.0]])
    t = draw_targets(logits, 8, exact_top=2, generator=torch.Generator().manual_seed(0))
    assert t.ids[:, :2].tolist() == [[4, 5], [0, 5]] and (t.counts[:, :2] == 1).all()
    assert (t.counts[:, 2:].sum(1) == 8).all()
    for row, head in ((0, {4, 5}), (1, {0, 5})):
        assert not head & set(t.ids[row, 2:][t.counts[row, 2:] > 0].tolist())
    assert torch.isfinite(t.log_norm).all() and t.log_norm[1] < -300  # p(tail) ~ e^-400, no NaN, no -inf
    target, proposal = loss_targets(t, 1.0, 1.0, 2)
    assert torch.isfinite(proposal[t.counts > 0]).all()
    with pytest.raises(ValueError, match="temperature 1 only"):
        loss_targets(t, 1.0, 2.0, 2)
    with pytest.raises(ValueError, match="0 unless proposal_temperature is 1"):
        draw_targets(logits, 8, exact_top=2, proposal_temperature=2.0)


def test_self_normalised_weights_are_biased_where_importance_weights_are_not():
    """The renormalised estimator (w / S) a top-k-style loss would apply: biased when tau != T."""
    vocab, draws, repeats = 40, 12, 16000
    teacher, student = _teacher_and_student(vocab, seed=3)
    _, g_dense = _dense_grad(teacher, student, 1.0)
    gen = torch.Generator().manual_seed(0)
    t = draw_targets(teacher.expand(repeats, -1), draws, proposal_temperature=3.0, generator=gen)
    target, proposal = loss_targets(t, 3.0, 1.0)
    w = t.counts / t.counts.sum(-1, keepdim=True) * (target - proposal).exp() * (t.counts > 0)
    w = w / w.sum(-1, keepdim=True)
    x = student.expand(repeats, -1).clone().requires_grad_()
    sampled_kl(x, t.ids, w.float(), target.float(), reduction="sum").backward()  # counts = w: weights w / S
    g = x.grad.double()
    bound = 5 * _per_draw_std(teacher, student, 3.0, 1.0) / math.sqrt(draws * repeats) + 1e-6
    assert ((g.mean(0) - g_dense).abs() > bound).any()


def _inputs(n, vocab, draws, *, dtype=torch.float32, seed=0, tau=1.0, temperature=1.0, ignored_every=4):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    logits = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = draw_targets(teacher, draws, proposal_temperature=tau, generator=g)
    target, proposal = loss_targets(t, tau, temperature)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[1::3] = t.ids[1::3, 0]  # the label among the drawn ids
    if ignored_every:
        labels[::ignored_every] = -100
    # A shuffled column order with the padding slots spread out, not only at the end.
    order = torch.argsort(torch.rand(t.ids.shape, generator=g), dim=1)
    pick = lambda a: None if a is None else a.gather(1, order)  # noqa: E731
    return logits, pick(t.ids), pick(t.counts), pick(target), pick(proposal), labels


def _rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def _check(logits, idx, count, target, proposal, labels, tol, grad_scale=1.0, **kw):
    x = logits.clone().requires_grad_()
    loss = sampled_kl(x, idx, count, target, proposal, labels, **kw)
    x64 = logits.double().requires_grad_()
    ref = sampled_kl_reference(x64, idx, count, target.double(), None if proposal is None else proposal.double(),
                               labels, **kw)
    (loss * grad_scale).sum().backward()
    (ref * grad_scale).sum().backward()
    assert loss.shape == ref.shape and x.grad.dtype == logits.dtype
    assert _rel(loss, ref) <= tol, (loss, ref)
    assert _rel(x.grad, x64.grad) <= tol, _rel(x.grad, x64.grad)
    return x.grad


def test_the_kernel_is_built():
    assert sampled_extension_available("cpu")


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [
    dict(),
    dict(tau=2.0, temperature=1.0),
    dict(tau=2.0, temperature=2.0, alpha=0.6),
    dict(alpha=0.0),
    dict(alpha=0.3, reduction="none"),
    dict(reduction="sum"),
], ids=["plain", "importance", "tempered-ce", "ce-only", "none", "sum"])
def test_kernel_matches_reference(dtype, tol, case):
    case = dict(case)
    tau, temperature = case.pop("tau", 1.0), case.pop("temperature", 1.0)
    logits, idx, count, target, proposal, labels = _inputs(37, 1031, 12, dtype=dtype, tau=tau, temperature=temperature,
                                                           seed=zlib.crc32(repr(case).encode()))
    grad = _check(logits, idx, count, target, proposal, labels, tol, temperature=temperature, **case)
    assert (grad[labels == -100] == 0).all()


def test_kernel_matches_reference_with_vector_grad_output_and_int64_ids():
    logits, idx, count, target, proposal, labels = _inputs(9, 300, 20, tau=0.7)
    w = torch.linspace(-2, 3, 9, dtype=torch.float64)
    _check(logits, idx.long(), count.long(), target, proposal, labels, 1e-5, grad_scale=w, alpha=0.5,
           reduction="none")


def test_gradcheck_float64():
    logits, idx, count, target, proposal, labels = _inputs(4, 11, 6, tau=2.0)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: sampled_kl(v, idx, count, target.double(), proposal.double(), labels, alpha=0.7, temperature=1.0),
        (x,))


def test_all_ignored_batch_and_empty_batch():
    logits, idx, count, target, _, _ = _inputs(5, 50, 6)
    labels = torch.full((5,), -100)
    x = logits.clone().requires_grad_()
    loss = sampled_kl(x, idx, count, target, None, labels, alpha=0.5)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()
    empty = torch.zeros(0, 50, requires_grad=True)
    out = sampled_kl(empty, idx[:0], count[:0], target[:0])
    out.backward()
    assert out.item() == 0 and empty.grad.shape == (0, 50)


def test_count_scale_leaves_the_estimate_unchanged():
    """Weights are c / M: doubling every count is the same draw set."""
    logits, idx, count, target, proposal, _ = _inputs(7, 64, 10, ignored_every=0, tau=1.5)
    a = sampled_kl(logits, idx, count, target, proposal, reduction="none")
    b = sampled_kl(logits, idx, count * 2, target, proposal, reduction="none")
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a["idx"].__setitem__((1, 0), 5000), "sample_idx must hold ids in \\[0, V = 64\\) .* row 1"),
    (lambda a: a["idx"].__setitem__((2, 1), int(a["idx"][2, 0])), "distinct ids within a row.*row 2"),
    (lambda a: a["count"].__setitem__((3, 0), -1), "sample_count must be finite and >= 0; row 3"),
    (lambda a: a["count"].__setitem__(3, 0), "at least one draw; row 3"),
    (lambda a: a["target"].__setitem__((4, 0), float("nan")), "target_logp must be finite .* row 4"),
    (lambda a: a["labels"].__setitem__(2, 64), "labels must be in \\[0, V = 64\\).*row 2"),
    (lambda a: a["logits"].__setitem__((1, 3), float("nan")), "logits must be finite .* row 1"),
], ids=["id-range", "id-repeat", "count-negative", "no-draws", "target-nan", "label", "logits-nan"])
def test_invalid_values_are_refused_with_the_row(mutate, message):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 64, generator=g)
    idx = torch.stack([torch.randperm(64, generator=g)[:4] for _ in range(6)])  # every slot drawn
    count = torch.randint(1, 4, (6, 4), generator=g)
    target = -torch.rand(6, 4, generator=g) * 5
    labels = torch.randint(0, 64, (6,), generator=g)
    a = dict(logits=logits, idx=idx, count=count, target=target, labels=labels)
    mutate(a)
    with pytest.raises(SampledKLError, match=message):
        sampled_kl(a["logits"], a["idx"], a["count"], a["target"], None, a["labels"], alpha=0.5)


def test_padding_slots_may_hold_anything():
    logits, idx, count, target, _, _ = _inputs(4, 64, 8, ignored_every=0)
    pad = count == 0
    assert pad.any()
    a = sampled_kl(logits, idx, count, target, reduction="none")
    idx2, target2 = idx.clone(), target.clone()
    idx2[pad], target2[pad] = 10**6, float("nan")
    assert torch.equal(a, sampled_kl(logits, idx2, count, target2, reduction="none"))


def test_shape_and_option_errors():
    logits, idx, count, target, _, labels = _inputs(4, 64, 8)
    with pytest.raises(SampledKLError, match="sample_count must be an int or float \\[N, K\\]"):
        sampled_kl(logits, idx, count[:, :2], target)
    with pytest.raises(SampledKLError, match="alpha = 0.5 < 1 mixes in cross-entropy"):
        sampled_kl(logits, idx, count, target, alpha=0.5)
    with pytest.raises(SampledKLError, match="temperature must be a finite number > 0"):
        sampled_kl(logits, idx, count, target, temperature=0)


def test_draws_are_deduplicated_and_seeded_per_sample():
    draws = torch.tensor([[3, 1, 3, 3], [2, 2, 2, 2]])
    ids, counts = dedupe_draws(draws)
    assert ids.tolist() == [[1, 3], [2, 0]] and counts.tolist() == [[1, 3], [4, 0]]
    logits = torch.randn(5, 100)
    a = draw_targets(logits, 12, generator=torch.Generator().manual_seed(sample_seed(7, 3)))
    b = draw_targets(logits, 12, generator=torch.Generator().manual_seed(sample_seed(7, 3)))
    c = draw_targets(logits, 12, generator=torch.Generator().manual_seed(sample_seed(7, 4)))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts) and not torch.equal(a.ids, c.ids)
    assert (a.counts.sum(1) == 12).all()
    assert torch.allclose(a.logp[a.counts > 0], torch.log_softmax(logits, -1).gather(1, a.ids.long())[a.counts > 0])


def test_loss_targets_refuse_temperatures_without_a_normaliser():
    t = draw_targets(torch.randn(3, 20), 4, proposal_temperature=2.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="temperature 1 or 2.0 only"):
        loss_targets(t, 2.0, 1.5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.999, 1.0])
def test_the_trainers_sampled_parts_are_their_own_evaluations(alpha):
    """KD and CE come from alpha = 1 and alpha = 0 directly (no subtraction that cancels as alpha -> 1)."""
    from kdengine.sampling import draw_targets
    from kdengine.train.sampled_targets import SampledTargets

    torch.manual_seed(0)
    teacher, logits = torch.randn(6, 40), torch.randn(6, 40)
    d = draw_targets(teacher, 12, generator=torch.Generator().manual_seed(0))
    batch = {"sample_idx": d.ids, "sample_count": d.counts, "sample_logp": d.logp, "sample_log_norm": d.log_norm}
    labels = torch.randint(0, 40, (6,))
    targets = SampledTargets(batch, proposal_temperature=1.0)
    loss, (kd, ce) = targets.loss(logits, labels, alpha=alpha, temperature=1.0, with_parts=True)
    want_kd = sampled_kl(logits, d.ids, d.counts, d.logp, None, labels, alpha=1.0, reduction="sum")
    want_ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(kd, want_kd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, alpha * kd + (1 - alpha) * ce, rtol=1e-5, atol=1e-5)
