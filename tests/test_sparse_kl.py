"""sparse_kl kernels (CPU, and CUDA when a GPU is present) against the float64 pure-torch reference.

Errors are measured relative to the largest magnitude of the reference tensor (loss or gradient):
<= 1e-5 for float32 logits, <= 1e-2 for bfloat16/float16 (whose gradient is rounded to 8/11 bits).
"""
import importlib
import math
import os
import warnings
import zlib

import pytest
import torch

from kdengine.losses import SparseKLError, SparseKLLoss, sparse_kl
from kdengine.losses.reference import TAIL_MIN, sparse_kl_reference
from kdengine.losses.sparse_kl import extension_available

sparse_kl_module = importlib.import_module("kdengine.losses.sparse_kl")  # the package attribute is the function

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]
# (logits dtype, bound on the error relative to the largest reference magnitude)
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _seed(request) -> int:
    return zlib.crc32(request.node.name.encode())


def make_inputs(n, vocab, k, *, dtype=torch.float32, device="cpu", seed=0, ignored_every=5, scale=3.0):
    """Student logits, the teacher's top-k (ids shuffled within each row) and labels: every
    `ignored_every`-th row ignored, every other row labelled with a teacher top-k id (so the label
    and a top-k entry coincide), the rest with a random id."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    teacher = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale).log_softmax(-1)
    top = teacher.topk(k, dim=-1).indices
    order = torch.argsort(torch.rand(n, k, generator=g), dim=-1)
    idx = top.gather(1, order)
    logp = teacher.gather(1, idx).float()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[1::2] = idx[1::2, 0]
    if ignored_every:
        labels[::ignored_every] = -100
    return logits.to(dtype).to(device), idx.to(device), logp.to(device), labels.to(device)


def max_rel_error(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def run_both(logits, idx, logp, labels, grad_out=None, **kw):
    """(loss, grad) from sparse_kl and from the float64 reference on the same (upcast) inputs."""
    x = logits.detach().clone().requires_grad_()
    loss = sparse_kl(x, idx, logp, labels, **kw)
    x64 = logits.detach().double().cpu().requires_grad_()
    ref = sparse_kl_reference(
        x64, idx.cpu(), logp.double().cpu(), None if labels is None else labels.cpu(), **kw
    )
    if grad_out is None:
        grad_out = torch.ones_like(ref)
    loss.backward(grad_out.to(loss))
    ref.backward(grad_out.double())
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    return loss, x.grad, ref, x64.grad


def assert_matches(logits, idx, logp, labels, tol, grad_out=None, **kw):
    loss, grad, ref, ref_grad = run_both(logits, idx, logp, labels, grad_out, **kw)
    assert loss.shape == ref.shape
    assert max_rel_error(loss, ref) <= tol, f"loss {loss} vs reference {ref}"
    assert max_rel_error(grad, ref_grad) <= tol, f"gradient error {max_rel_error(grad, ref_grad):.2e} > {tol}"
    return loss, grad


def test_extension_is_built():
    # Without it every comparison below would pit the reference against itself.
    assert extension_available("cpu"), "kdengine._C is missing: python setup.py build_ext --inplace"


@pytest.mark.skipif(os.environ.get("KDENGINE_REQUIRE_CUDA") != "1", reason="KDENGINE_REQUIRE_CUDA=1 is for GPU runs")
def test_cuda_kernels_present():
    # scripts/gpu_check_kernel.sh sets KDENGINE_REQUIRE_CUDA=1, so the CUDA cases cannot all be skipped there.
    assert torch.cuda.is_available(), "no CUDA device visible"
    assert extension_available("cuda"), "kdengine._C was built without CUDA kernels"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tail", [False, True], ids=["no_tail", "tail"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_reference(request, device, dtype, tol, tail, alpha, temperature):
    # V = 1031 is prime: rows start at every alignment, no vector width divides V.
    logits, idx, logp, labels = make_inputs(37, 1031, 8, dtype=dtype, device=device, seed=_seed(request))
    grad_out = torch.randn(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss, grad = assert_matches(logits, idx, logp, labels, tol, grad_out, tail=tail, alpha=alpha,
                                temperature=temperature, reduction="none")
    ignored = (labels == -100).cpu()
    assert torch.all(loss.cpu()[ignored] == 0) and torch.all(grad.cpu()[ignored] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("tail", [False, True], ids=["no_tail", "tail"])
@pytest.mark.parametrize("dtype,tol", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_topk_sizes(request, device, k, tail, dtype, tol):
    logits, idx, logp, labels = make_inputs(19, 317, k, dtype=dtype, device=device, seed=_seed(request))
    assert_matches(logits, idx, logp, labels, tol, tail=tail, alpha=0.7, temperature=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_scale", [1.0, 2.5], ids=["grad1", "grad2.5"])
def test_reductions(request, device, reduction, grad_scale):
    logits, idx, logp, labels = make_inputs(23, 509, 8, device=device, seed=_seed(request))
    n_out = 23 if reduction == "none" else None
    grad_out = torch.full((n_out,) if n_out else (), grad_scale, dtype=torch.float64)
    loss, _ = assert_matches(logits, idx, logp, labels, 1e-5, grad_out, tail=True, alpha=0.5, reduction=reduction)
    assert loss.shape == ((23,) if reduction == "none" else ())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [2, 3, 7, 15, 17, 33, 4099])
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
def test_vocab_sizes(request, device, vocab, dtype, tol):
    # Shorter than one 16-byte vector, odd, and a few vectors plus a remainder. K = V covers the
    # teacher tail at (or, by rounding, past) zero mass and the student tail at exactly zero.
    k = min(vocab, 4)
    logits, idx, logp, labels = make_inputs(6, vocab, k, dtype=dtype, device=device, seed=_seed(request))
    assert_matches(logits, idx, logp, labels, tol, tail=True, alpha=0.5, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS[:2])
def test_one_token_vocab(device, dtype):
    # V = K = 1: both distributions are certain, so loss and gradient are 0 up to rounding.
    logits, idx, logp, labels = make_inputs(4, 1, 1, dtype=dtype, device=device)
    x = logits.clone().requires_grad_()
    loss = sparse_kl(x, idx, logp, labels, tail=True, alpha=0.5, temperature=2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and x.grad.abs().max() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("labelled", [False, True])
def test_single_row(request, device, labelled):
    logits, idx, logp, labels = make_inputs(1, 777, 5, device=device, seed=_seed(request), ignored_every=0)
    assert_matches(logits, idx, logp, labels if labelled else None, 1e-5, tail=True, temperature=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_large_rows(request, device, dtype, tol):
    logits, idx, logp, labels = make_inputs(12, 32003, 64, dtype=dtype, device=device, seed=_seed(request))
    assert_matches(logits, idx, logp, labels, tol, tail=True, alpha=0.5, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(device, reduction):
    logits, idx, logp, labels = make_inputs(9, 101, 4, device=device)
    labels[:] = -100
    x = logits.clone().requires_grad_()
    loss = sparse_kl(x, idx, logp, labels, alpha=0.5, tail=True, reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(x.grad == 0)


@pytest.mark.parametrize("tail", [False, True], ids=["no_tail", "tail"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gradcheck_float64(tail, alpha):
    logits, idx, logp, labels = make_inputs(4, 13, 4, dtype=torch.float64, seed=3, ignored_every=3)
    x = logits.clone().requires_grad_()
    fn = lambda x: sparse_kl(x, idx, logp, labels, tail=tail, alpha=alpha, temperature=2.0, reduction="none")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_confident_student_keeps_tail_precision(device):
    # The student puts ~1 - 1e-12 of its mass on the teacher's top-k: 1 - sum_k q_k would be pure
    # rounding noise in float32; the kernel sums the mass outside the top-k directly.
    logits, idx, logp, labels = make_inputs(8, 2000, 16, device=device, seed=11, ignored_every=0)
    logits = logits.scatter_add(1, idx, torch.full(idx.shape, 45.0, device=device))
    loss, grad = assert_matches(logits, idx, logp, None, 1e-5, tail=True, reduction="none")
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(1, idx, False)
    assert grad.cpu()[outside.cpu()].abs().max() > 0  # the tail term still pushes mass out


@pytest.mark.parametrize("device", DEVICES)
def test_student_tail_below_clamp(device):
    # q_tail ~ e^-60 < TAIL_MIN: log q_tail is clamped and (as in the reference) carries no gradient.
    logits, idx, logp, _ = make_inputs(5, 300, 8, device=device, seed=12)
    logits = logits.scatter_add(1, idx, torch.full(idx.shape, 80.0, device=device))
    assert math.exp(-60) < TAIL_MIN
    assert_matches(logits, idx, logp, None, 1e-5, tail=True, temperature=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_teacher_mass_all_in_topk(device, temperature):
    # K = V with the full log-softmax: sum_k exp(logp_k) is 1 up to rounding (either side).
    logits, idx, logp, labels = make_inputs(7, 64, 64, device=device, seed=13)
    assert_matches(logits, idx, logp, labels, 1e-5, tail=True, alpha=0.5, temperature=temperature)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_vocab_entries(device):
    # -inf logits (a masked vocabulary slice) outside the top-k are allowed and get zero gradient.
    logits, idx, logp, labels = make_inputs(6, 211, 8, device=device, seed=14)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, 150:] = True
    mask.scatter_(1, idx, False)
    mask[labels.clamp_min(0)[:, None] == torch.arange(211, device=device)] = False
    logits = logits.masked_fill(mask, float("-inf"))
    _, grad = assert_matches(logits, idx, logp, labels, 1e-5, tail=True, alpha=0.5)
    assert torch.all(grad[mask] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_logits(device):
    # A row-strided view (the unpadded part of a wider tensor): rows start unaligned, and differently
    # from the contiguous gradient.
    logits, idx, logp, labels = make_inputs(10, 515, 8, device=device, seed=15)
    wide = torch.zeros(10, 523, device=device)
    wide[:, 3:518] = logits
    view = wide[:, 3:518]
    assert view.stride() == (523, 1)
    assert_matches(view, idx, logp, labels, 1e-5, tail=True, alpha=0.5, temperature=2.0)


def test_column_strided_logits():
    logits, idx, logp, labels = make_inputs(9, 130, 8, seed=20)
    transposed = logits.t().contiguous().t()
    assert transposed.stride(1) != 1
    assert_matches(transposed, idx, logp, labels, 1e-5, tail=True, alpha=0.5)


def test_int32_ids_and_labels_match_int64():
    logits, idx, logp, labels = make_inputs(11, 300, 8, seed=16)
    a = sparse_kl(logits, idx, logp, labels, tail=True, alpha=0.5, reduction="none")
    b = sparse_kl(logits, idx.int(), logp, labels.int(), tail=True, alpha=0.5, reduction="none")
    assert torch.equal(a, b)


def test_empty_batch():
    logits, idx, logp, labels = make_inputs(0, 50, 4)
    x = logits.clone().requires_grad_()
    assert sparse_kl(x, idx, logp, labels, alpha=0.5).item() == 0.0
    loss = sparse_kl(x, idx, logp, labels, reduction="none")
    loss.sum().backward()
    assert loss.shape == (0,) and x.grad.shape == (0, 50)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS)
@pytest.mark.parametrize("tail", [False, True], ids=["no_tail", "tail"])
def test_cuda_matches_cpu(request, dtype, tail):
    logits, idx, logp, labels = make_inputs(64, 4099, 32, dtype=dtype, seed=_seed(request))
    results = []
    for device in ("cpu", "cuda"):
        x = logits.detach().to(device).requires_grad_()
        loss = sparse_kl(x, idx.to(device), logp.to(device), labels.to(device), tail=tail, alpha=0.5,
                         temperature=2.0, reduction="none")
        loss.backward(torch.linspace(0.5, 2.0, 64, device=device))
        results.append((loss.cpu(), x.grad.cpu()))
    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = results
    assert max_rel_error(gpu_loss, cpu_loss) <= 1e-5
    # Both round the same float32 value to the logits' dtype: one ulp apart at most.
    assert max_rel_error(gpu_grad, cpu_grad) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_module_matches_function():
    logits, idx, logp, labels = make_inputs(8, 120, 6, seed=17)
    module = SparseKLLoss(tail=True, alpha=0.25, temperature=2.0, reduction="sum")
    want = sparse_kl(logits, idx, logp, labels, tail=True, alpha=0.25, temperature=2.0, reduction="sum")
    assert torch.equal(module(logits, idx, logp, labels), want)
    assert "alpha=0.25" in repr(module)
    with pytest.raises(SparseKLError, match="temperature must be a finite number > 0, got 0"):
        SparseKLLoss(temperature=0)


def _valid():
    logits, idx, logp, labels = make_inputs(6, 40, 4, seed=18, ignored_every=0)
    return dict(logits=logits, topk_idx=idx, topk_logp=logp, labels=labels)


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


ARG_ERRORS = [
    (dict(logits=torch.zeros(2, 6, 40)), {}, r"logits must be float32/bfloat16/float16 \[N, V\], got float32 \[2, 6, 40\]"),
    (dict(logits=torch.zeros(6, 40, dtype=torch.int64)), {}, r"logits must be .*got int64 \[6, 40\]"),
    (dict(topk_idx=torch.zeros(6, 4)), {}, r"topk_idx must be int32/int64 \[N, K\] with N = 6 .*got float32"),
    (dict(topk_idx=torch.zeros(5, 4, dtype=torch.long)), {}, r"topk_idx must be .*N = 6 .*got int64 \[5, 4\]"),
    (dict(topk_idx=torch.zeros(6, 41, dtype=torch.long), topk_logp=torch.zeros(6, 41)), {},
     r"1 <= K <= V = 40 columns, got K = 41"),
    (dict(topk_logp=torch.zeros(6, 3)), {}, r"topk_logp must be float32 \[N, K\] = \[6, 4\] like topk_idx, got float32 \[6, 3\]"),
    (dict(topk_logp=torch.zeros(6, 4, dtype=torch.float16)), {}, r"topk_logp must be float32 .*got float16"),
    (dict(labels=torch.zeros(6, 1, dtype=torch.long)), {}, r"labels must be int64 \[N\] with N = 6 \(or None\), got int64 \[6, 1\]"),
    (dict(labels=torch.zeros(6)), {}, r"labels must be int64 \[N\] .*got float32 \[6\]"),
    (dict(labels=None), dict(alpha=0.5), r"alpha = 0.5 < 1 mixes in cross-entropy, which needs labels"),
    ({}, dict(alpha=1.5), r"alpha must be a number in \[0, 1\], got 1.5"),
    ({}, dict(temperature=-1.0), r"temperature must be a finite number > 0, got -1.0"),
    ({}, dict(reduction="avg"), r"reduction must be one of mean, sum, none, got 'avg'"),
    ({}, dict(tail=1), r"tail must be a bool, got 1"),
]


@pytest.mark.parametrize("change,options,message", ARG_ERRORS)
def test_argument_errors(change, options, message):
    args = {**_valid(), **change}
    with pytest.raises(SparseKLError, match=message):
        sparse_kl(args["logits"], args["topk_idx"], args["topk_logp"], args["labels"], **options)


def _data_errors():
    v = _valid()
    idx, logp, labels, logits = v["topk_idx"], v["topk_logp"], v["labels"], v["logits"]
    dup = idx.clone()
    dup[4, 2] = dup[4, 0]
    return [
        (dict(topk_idx=_set(idx, (3, 1), 40)), {}, r"ids in \[0, V = 40\); row 3 holds 40\. Is the teacher's vocabulary"),
        (dict(topk_idx=_set(idx, (2, 0), -1)), {}, r"ids in \[0, V = 40\); row 2 holds -1"),
        (dict(topk_idx=_set(idx, (1, 0), 2**32 + 1)), {}, r"row 1 holds 4294967297"),
        (dict(topk_idx=dup), {}, rf"distinct ids within a row; row 4 repeats id {int(dup[4, 0])}"),
        (dict(topk_logp=_set(logp, (5, 3), float("nan"))), {}, r"topk_logp must hold log-probabilities .*row 5 holds nan"),
        (dict(topk_logp=_set(logp, 0, float("-inf"))), {}, r"topk_logp must give each row some mass when tail=False; row 0 is all -inf"),
        (dict(labels=_set(labels, 2, 40)), dict(alpha=0.5), r"labels must be in \[0, V = 40\) or ignore_index = -100; row 2 holds 40"),
        (dict(logits=_set(logits, (3, 7), float("nan"))), {}, r"logits must be finite .*row 3 holds NaN or \+inf"),
        (dict(logits=_set(logits, (1, 0), float("inf"))), dict(tail=True), r"logits must be finite .*row 1"),
        (dict(logits=_set(logits, 4, float("-inf"))), {}, r"row 4 holds NaN or \+inf, or no finite entry"),
        (dict(logits=_set(_set(logits, 1, float("nan")), 2, float("nan"))), {}, r"row 1 \(and 1 more rows\)"),
    ]


@pytest.mark.parametrize("case", range(len(_data_errors())))
def test_data_errors(case):
    change, options, message = _data_errors()[case]
    args = {**_valid(), **change}
    with pytest.raises(SparseKLError, match=message):
        sparse_kl(args["logits"], args["topk_idx"], args["topk_logp"], args["labels"], **options)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_device_mismatch():
    v = _valid()
    with pytest.raises(SparseKLError, match=r"topk_idx must be on the logits' device cuda:0, got cpu"):
        sparse_kl(v["logits"].cuda(), v["topk_idx"], v["topk_logp"].cuda(), v["labels"].cuda())


def test_bad_values_in_ignored_rows_are_fine():
    v = _valid()
    labels = _set(v["labels"], 3, -100)
    logits = _set(v["logits"], 3, float("nan"))
    loss = sparse_kl(logits, v["topk_idx"], v["topk_logp"], labels, alpha=0.5, reduction="none")
    assert loss[3] == 0 and torch.isfinite(loss).all()


def test_tail_allows_an_empty_teacher_topk():
    v = _valid()
    logp = _set(v["topk_logp"], 0, float("-inf"))
    assert torch.isfinite(sparse_kl(v["logits"], v["topk_idx"], logp, tail=True))


def test_falls_back_to_reference_with_one_warning(monkeypatch):
    logits, idx, logp, labels = make_inputs(5, 60, 4, seed=19)
    monkeypatch.setattr(sparse_kl_module, "_EXTENSION", None)
    monkeypatch.setattr(sparse_kl_module, "_EXTENSION_ERROR", "simulated: no module named kdengine._C")
    monkeypatch.setattr(sparse_kl_module, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="simulated: no module named kdengine._C.*pure-torch reference"):
        got = sparse_kl(logits, idx, logp, labels, tail=True, alpha=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse_kl(logits, idx, logp, labels, tail=True, alpha=0.5)  # no second warning
    want = sparse_kl_reference(logits, idx, logp, labels, tail=True, alpha=0.5)
    assert torch.equal(got, want)
    assert torch.equal(sparse_kl(logits, idx.int(), logp, labels.int(), tail=True, alpha=0.5), want)
    with pytest.raises(SparseKLError, match="row 2 holds NaN"):
        sparse_kl(_set(logits, 2, float("nan")), idx, logp, labels)


_FP16_PATHS = """
import sys, torch
from kdengine.losses import sparse_kl
torch.manual_seed(0)
n, v, k = 24, 5000, 16
x = (torch.randn(n, v) * 4).half()
x[0, :8] = torch.tensor([65504.0, -65504.0, 6e-8, -6e-8, 3e-5, 0.0, -0.0, 1e-4]).half()  # max, subnormals, zeros
x[1] += 20  # gradients far below 1: fp16 subnormals
idx = torch.rand(n, v).argsort(1)[:, :k].int()
logp = torch.log_softmax(torch.randn(n, k), -1)
labels = torch.randint(0, v, (n,))
out = {}
for name, kw in (("fkl", {}), ("tail_ce_t2", dict(tail=True, alpha=0.5, temperature=2.0))):
    xi = x.clone().requires_grad_()
    loss = sparse_kl(xi, idx, logp, labels, reduction="none", **kw)
    loss.backward(torch.linspace(0.5, 2.0, n))
    out[name + "_loss"], out[name + "_grad"] = loss.detach(), xi.grad
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not extension_available(), reason="needs the compiled extension")
def test_fp16_hardware_and_bit_level_conversions_agree_bit_for_bit(tmp_path):
    """fp16 rows convert in hardware (F16C) where the CPU has it, else bit by bit: the same bits."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for env in ({}, {"KDENGINE_NO_F16C": "1"}):
        path = tmp_path / f"out{len(results)}.pt"
        subprocess.run([sys.executable, "-c", _FP16_PATHS, str(path)], check=True,
                       env={**os.environ, "PYTHONPATH": root, **env})
        results.append(torch.load(path, weights_only=True))
    hardware, bits = results
    assert hardware.keys() == bits.keys()
    for name in hardware:
        assert torch.equal(hardware[name].view(torch.int16) if hardware[name].dtype == torch.half else hardware[name],
                           bits[name].view(torch.int16) if bits[name].dtype == torch.half else bits[name]), name
    assert (hardware["fkl_grad"][1] != 0).any() and (hardware["fkl_grad"][1].abs() < 6.1e-5).any()  # subnormal grads
