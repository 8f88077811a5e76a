"""sparse_kl's divergences (fkl, rkl, jsd), the exact tempered tail (tempered_lse) and the KD/CE parts,
against the float64 pure-torch reference.

Besides the loss and the gradient's largest entries (relative to the largest reference magnitude, as in
test_sparse_kl.py), every off-top-k gradient entry is checked against its own magnitude
(`assert_small_entries_close`): those entries are q_m-sized, ~1e-10 in these inputs, and a max-relative
bound cannot see them at all in half precision.
"""
import math
import zlib

import pytest
import torch

from kdengine.losses import SparseKLError, SparseKLLoss, SparseKLOutput, sparse_kl
from kdengine.losses.reference import sparse_kl_reference
from test_sparse_kl import DEVICES, make_inputs, max_rel_error

# (logits dtype, bound relative to the largest reference magnitude, per-entry relative bound, per-entry
# absolute floor: fp16 gradients below its normal range (6e-5) are subnormal with a fixed 2^-24 spacing;
# the kernels flush exponentials below 2^-125 to 0, so fp32 entries under ~1e-37 may read 0)
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, 1e-30, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 8e-3, 0.0, id="bf16"),
    pytest.param(torch.float16, 1e-2, 2e-3, 2.0**-24, id="fp16"),
]
DIVERGENCES = ["fkl", "rkl", "jsd"]


def _seed(request) -> int:
    return zlib.crc32(request.node.name.encode())


def _reference(logits, idx, logp, labels, dtype, **kw):
    x = logits.detach().to(dtype).cpu().requires_grad_()
    lse = kw.pop("tempered_lse", None)
    out = sparse_kl_reference(x, idx.cpu(), logp.to(dtype).cpu(), None if labels is None else labels.cpu(),
                              tempered_lse=None if lse is None else lse.to(dtype).cpu(), return_parts=True, **kw)
    return out, x


def check(logits, idx, logp, labels, tol, rtol_entry, atol_entry, grad_out=None, **kw):
    """Loss, parts and gradient of sparse_kl against the float64 reference; the per-entry check of
    the off-top-k gradient allows 4x the float32 reference's own error on the row on top of rtol_entry."""
    x = logits.detach().clone().requires_grad_()
    out = sparse_kl(x, idx, logp, labels, return_parts=True, **kw)
    ref, x64 = _reference(logits, idx, logp, labels, torch.float64, **kw)
    ref32, x32 = _reference(logits, idx, logp, labels, torch.float32, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(ref.loss)
    out.loss.backward(grad_out.to(out.loss))
    ref.loss.backward(grad_out.double())
    ref32.loss.backward(grad_out.float())
    assert isinstance(out, SparseKLOutput) and out.loss.shape == ref.loss.shape
    assert max_rel_error(out.loss, ref.loss) <= tol, f"loss {out.loss} vs reference {ref.loss}"
    assert max_rel_error(out.kd, ref.kd) <= tol and not out.kd.requires_grad
    if labels is not None:
        assert max_rel_error(out.ce, ref.ce) <= tol
    assert x.grad.dtype == logits.dtype
    assert max_rel_error(x.grad, x64.grad) <= tol, f"gradient error {max_rel_error(x.grad, x64.grad):.2e}"
    assert_small_entries_close(x.grad, x64.grad, x32.grad, idx, labels, rtol_entry, atol_entry)
    return out, x.grad


def assert_small_entries_close(grad, ref64, ref32, idx, labels, rtol, atol):
    grad, ref64, ref32 = grad.double().cpu(), ref64.double(), ref32.double()
    dense = torch.ones_like(ref64, dtype=torch.bool).scatter(1, idx.cpu().long(), False)
    if labels is not None:
        counted = labels.cpu() >= 0
        dense[counted.nonzero()[:, 0], labels.cpu()[counted]] = False
    scale = ref64.abs()
    ref32_rel = torch.where(dense & (scale > 0), (ref32 - ref64).abs() / scale.clamp_min(1e-300), 0).amax(1, keepdim=True)
    bound = (rtol + 4 * ref32_rel) * scale + atol
    bad = dense & ((grad - ref64).abs() > bound)
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        pytest.fail(f"{int(bad.sum())} off-top-k gradient entries off, e.g. [{r}, {c}]: {grad[r, c]:.6e} vs "
                    f"{ref64[r, c]:.6e} (bound {bound[r, c]:.2e})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol,rtol_entry,atol_entry", DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature,exact", [(1.0, False), (2.0, False), (2.0, True)],
                         ids=["T1", "T2_approx_tail", "T2_exact_tail"])
def test_tail_divergences_match_reference(request, device, dtype, tol, rtol_entry, atol_entry, divergence, alpha,
                                          temperature, exact):
    # V = 1031 is prime (rows at every alignment); a per-row grad_output with reduction="none".
    seed = _seed(request)
    logits, idx, logp, labels = make_inputs(37, 1031, 8, dtype=dtype, device=device, seed=seed)
    lse = _teacher_lse(1031, temperature, idx, logp, seed) if exact else None
    grad_out = torch.randn(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grad = check(logits, idx, logp, labels, tol, rtol_entry, atol_entry, grad_out, tail=True, alpha=alpha,
                      temperature=temperature, divergence=divergence, reduction="none",
                      tempered_lse=None if lse is None else lse.to(device))
    ignored = (labels == -100).cpu()
    assert torch.all(out.loss.cpu()[ignored] == 0) and torch.all(grad.cpu()[ignored] == 0)


@pytest.mark.parametrize("dtype,tol,rtol_entry,atol_entry", DTYPES)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_fkl_without_tail(request, dtype, tol, rtol_entry, atol_entry, alpha):
    logits, idx, logp, labels = make_inputs(29, 517, 8, dtype=dtype, seed=_seed(request))
    check(logits, idx, logp, labels, tol, rtol_entry, atol_entry, alpha=alpha, temperature=2.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_scale", [1.0, 2.5], ids=["grad1", "grad2.5"])
def test_reductions(request, divergence, reduction, grad_scale):
    logits, idx, logp, labels = make_inputs(23, 509, 8, seed=_seed(request))
    grad_out = torch.full((23,) if reduction == "none" else (), grad_scale, dtype=torch.float64)
    out, _ = check(logits, idx, logp, labels, 1e-5, 1e-5, 0.0, grad_out, tail=True, alpha=0.5, temperature=2.0,
                   divergence=divergence, reduction=reduction)
    assert out.loss.shape == ((23,) if reduction == "none" else ())


@pytest.mark.parametrize("divergence", ["rkl", "jsd"])
@pytest.mark.parametrize("vocab,k", [(2, 1), (3, 3), (17, 4), (33, 1), (4099, 64)])
def test_odd_shapes(request, divergence, vocab, k):
    # K = V puts the teacher's and the student's tails at (or, by rounding, past) zero.
    logits, idx, logp, labels = make_inputs(6, vocab, k, seed=_seed(request))
    check(logits, idx, logp, labels, 1e-5, 1e-5, 0.0, tail=True, alpha=0.5, temperature=2.0, divergence=divergence)


@pytest.mark.parametrize("divergence", ["rkl", "jsd"])
def test_student_tail_below_clamp(divergence):
    # q_tail ~ e^-60 < TAIL_MIN: the tail term is a constant and carries no gradient, as in the reference.
    logits, idx, logp, _ = make_inputs(5, 300, 8, seed=12)
    logits = logits.scatter_add(1, idx, torch.full(idx.shape, 80.0, dtype=logits.dtype))
    check(logits, idx, logp, None, 1e-5, 1e-5, 1e-30, tail=True, divergence=divergence)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("exact", [False, True], ids=["approx_tail", "exact_tail"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_gradcheck_float64(divergence, exact, alpha):
    logits, idx, logp, labels = make_inputs(4, 13, 4, dtype=torch.float64, seed=3, ignored_every=3)
    lse = _teacher_lse(13, 2.0, idx, logp, 3).double() if exact else None
    x = logits.clone().requires_grad_()
    fn = lambda x: sparse_kl(x, idx, logp.double(), labels, tail=True, alpha=alpha, temperature=2.0,
                             divergence=divergence, beta=0.3, tempered_lse=lse, reduction="none")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(divergence, reduction):
    logits, idx, logp, labels = make_inputs(9, 101, 4)
    labels[:] = -100
    x = logits.clone().requires_grad_()
    out = sparse_kl(x, idx, logp, labels, alpha=0.5, tail=True, temperature=2.0, divergence=divergence,
                    reduction=reduction, return_parts=True)
    out.loss.sum().backward()
    assert torch.all(out.loss == 0) and torch.all(out.kd == 0) and torch.all(out.ce == 0)
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_parts_add_up_and_match_separate_runs(divergence, temperature):
    # loss = alpha KD + (1 - alpha) CE from one pass; KD is the alpha = 1 loss and CE the alpha = 0 one.
    logits, idx, logp, labels = make_inputs(31, 401, 8, seed=21, ignored_every=0)
    kw = dict(tail=True, temperature=temperature, divergence=divergence, reduction="sum")
    out = sparse_kl(logits, idx, logp, labels, alpha=0.3, return_parts=True, **kw)
    kd = sparse_kl(logits, idx, logp, labels, alpha=1.0, **kw)
    ce = sparse_kl(logits, idx, logp, labels, alpha=0.0, **kw)
    assert torch.allclose(out.kd, kd, rtol=1e-6) and torch.allclose(out.ce, ce, rtol=1e-6)
    assert torch.allclose(out.loss, 0.3 * out.kd + 0.7 * out.ce, rtol=1e-6)
    assert torch.allclose(sparse_kl(logits, idx, logp, None, alpha=1.0, return_parts=True, **kw).kd, kd, rtol=1e-6)
    assert sparse_kl(logits, idx, logp, None, return_parts=True, **kw).ce is None
    for alpha in (0.0, 1.0):  # the part alpha weighs by 0 is computed on request; the loss stays (to rounding)
        got = sparse_kl(logits, idx, logp, labels, alpha=alpha, return_parts=True, **kw)
        assert torch.allclose(got.loss, sparse_kl(logits, idx, logp, labels, alpha=alpha, **kw), rtol=1e-6)
        assert torch.allclose(got.kd, kd, rtol=1e-6) and torch.allclose(got.ce, ce, rtol=1e-6)
        assert torch.equal(got.loss, got.ce if alpha == 0.0 else got.kd)  # the trainer logs loss == its part


def test_default_is_fkl_bit_for_bit():
    logits, idx, logp, labels = make_inputs(17, 333, 8, seed=22)
    for kw in (dict(tail=True, alpha=0.5, temperature=2.0), dict(alpha=1.0)):
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        a = sparse_kl(x1, idx, logp, labels, reduction="none", **kw)
        b = sparse_kl(x2, idx, logp, labels, reduction="none", divergence="fkl", beta=0.9, return_parts=True, **kw)
        a.sum().backward()
        b.loss.sum().backward()
        assert torch.equal(a, b.loss) and torch.equal(x1.grad, x2.grad)


def _teacher_lse(vocab, temperature, idx, logp, seed):
    """A full teacher log-softmax consistent with (idx, logp) and its c_T = logsumexp(logp / T): the
    mass outside the top-k spread over the other ids with random weights."""
    return _full_teacher(vocab, idx, logp, seed).div(temperature).logsumexp(-1).float()


def _full_teacher(vocab, idx, logp, seed):
    g = torch.Generator().manual_seed(seed)
    n = idx.shape[0]
    rest = (1 - logp.double().exp().sum(-1)).clamp_min(1e-30)
    w = torch.rand(n, vocab, generator=g, dtype=torch.float64) ** 4
    w = w.scatter(1, idx.cpu().long(), 0.0)
    full = (w / w.sum(-1, keepdim=True) * rest[:, None]).log()
    return full.scatter(1, idx.cpu().long(), logp.double().cpu())


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_exact_tempered_tail_matches_full_vocabulary_teacher(divergence, temperature):
    # Ground truth from the full teacher: p_T = softmax(logp_full / T); buckets = its top-k entries and
    # the rest; the same divergence against the student's buckets, all in float64.
    n, vocab, k = 16, 500, 8
    logits, idx, logp, _ = make_inputs(n, vocab, k, seed=23, ignored_every=0)
    full = _full_teacher(vocab, idx, logp, 23)
    lse = full.div(temperature).logsumexp(-1)
    p_full = (full / temperature).log_softmax(-1).exp()
    p_top = p_full.gather(1, idx)
    p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True))], 1)
    q_full = (logits.double() / temperature).log_softmax(-1).exp()
    q_top = q_full.gather(1, idx)
    q = torch.cat([q_top, q_full.scatter(1, idx, 0.0).sum(-1, keepdim=True)], 1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    m = 0.3 * p + 0.7 * q
    want = temperature**2 * {"fkl": kl(p, q), "rkl": kl(q, p), "jsd": 0.3 * kl(p, m) + 0.7 * kl(q, m)}[divergence]
    kw = dict(tail=True, temperature=temperature, divergence=divergence, beta=0.3, reduction="none")
    got = sparse_kl(logits, idx, logp, tempered_lse=lse.float(), **kw)
    assert max_rel_error(got, want) <= 2e-5
    approx = sparse_kl(logits, idx, logp, **kw)  # the tail tempered as one token: visibly off
    assert max_rel_error(approx, want) > 1e-2


ERRORS = [
    (dict(divergence="kl"), r"divergence must be one of fkl, rkl, jsd, got 'kl'"),
    (dict(divergence="rkl"), r"divergence='rkl' needs tail=True: without the tail bucket"),
    (dict(divergence="jsd", tail=False, alpha=0.5), r"divergence='jsd' needs tail=True"),
    (dict(divergence="jsd", tail=True, beta=1.0), r"beta must be a number in \(0, 1\) \(the jsd mixture weight\), got 1.0"),
    (dict(tail=True, beta=0), r"beta must be a number in \(0, 1\)"),
    (dict(tail=True, tempered_lse=torch.zeros(5)), r"tempered_lse must be float32 \[N\] with N = 6 \(or None\), got float32 \[5\]"),
    (dict(tail=True, tempered_lse=torch.zeros(6, dtype=torch.int64)), r"tempered_lse must be float32 \[N\].*got int64"),
    (dict(tail=True, tempered_lse=torch.tensor([0, 0, float("nan"), 0, 0, 0])),
     r"tempered_lse must be finite where rows count .*row 2 holds nan"),
]


@pytest.mark.parametrize("options,message", ERRORS)
def test_errors(options, message):
    logits, idx, logp, labels = make_inputs(6, 40, 4, seed=18, ignored_every=0)
    with pytest.raises(SparseKLError, match=message):
        sparse_kl(logits, idx, logp, labels, **options)


def test_module_takes_the_divergence():
    logits, idx, logp, labels = make_inputs(8, 120, 6, seed=17)
    module = SparseKLLoss(tail=True, alpha=0.25, temperature=2.0, divergence="jsd", beta=0.2)
    want = sparse_kl(logits, idx, logp, labels, tail=True, alpha=0.25, temperature=2.0, divergence="jsd", beta=0.2)
    assert torch.equal(module(logits, idx, logp, labels), want)
    assert "divergence='jsd', beta=0.2" in repr(module)
    with pytest.raises(SparseKLError, match="needs tail=True"):
        SparseKLLoss(divergence="rkl")


def test_nan_tempered_lse_in_an_ignored_row_is_fine():
    logits, idx, logp, labels = make_inputs(6, 40, 4, seed=18, ignored_every=3)
    lse = torch.zeros(6)
    lse[0] = float("nan")  # row 0 is ignored
    assert torch.isfinite(sparse_kl(logits, idx, logp, labels, tail=True, tempered_lse=lse, alpha=0.5))
    assert math.isfinite(float(sparse_kl(logits, idx, logp, labels, tail=True, tempered_lse=lse, divergence="rkl")))
