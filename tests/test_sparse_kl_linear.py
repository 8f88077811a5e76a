"""sparse_kl_linear (the fused output head) against the unfused composition sparse_kl(hidden @ W.T + b),
the custom ops under torch.compile(fullgraph=True), and validate=False."""
import pytest
import torch

from kdengine.losses import SparseKLError, sparse_kl, sparse_kl_linear
from test_sparse_kl import make_inputs, max_rel_error

# (dtype, bound relative to the largest reference magnitude)
DTYPES = [pytest.param(torch.float32, 2e-5, id="fp32"), pytest.param(torch.bfloat16, 2e-2, id="bf16"),
          pytest.param(torch.float16, 2e-2, id="fp16")]


def make_head(n, hidden_size, vocab, k, *, dtype=torch.float32, seed=0, bias=False, ignored_every=5):
    _, idx, logp, labels = make_inputs(n, vocab, k, seed=seed, ignored_every=ignored_every)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(n, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5 * 3).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    return hidden, weight, b, idx, logp, labels


def run(fn, hidden, weight, bias, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(*leaves, b, **kw)
    loss = out.loss if isinstance(out, tuple) else out
    loss.backward(grad_out.to(loss) if grad_out is not None else None)
    return out, [t.grad for t in leaves] + ([] if b is None else [b.grad])


def fused(hidden, weight, bias, **kw):
    return sparse_kl_linear(hidden, weight, kw.pop("idx"), kw.pop("logp"), kw.pop("labels"), bias=bias, **kw)


def unfused(hidden, weight, bias, *, softcap=None, chunk_rows=None, **kw):
    """The spec: the head in float64, then sparse_kl (the fused op's value for these inputs)."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return sparse_kl(logits, kw.pop("idx"), kw.pop("logp").double(), kw.pop("labels"), **kw)


def assert_fused_matches(hidden, weight, bias, tol, grad_out=None, **kw):
    out, grads = run(fused, hidden, weight, bias, grad_out, **kw)
    want, want_grads = run(unfused, hidden, weight, bias, None if grad_out is None else grad_out.double(), **kw)
    loss, want_loss = (out.loss, want.loss) if kw.get("return_parts") else (out, want)
    assert loss.shape == want_loss.shape and max_rel_error(loss, want_loss) <= tol, f"{loss} vs {want_loss}"
    for got, ref, name in zip(grads, want_grads, ("hidden", "weight", "bias")):
        assert got.dtype == hidden.dtype, name
        assert max_rel_error(got, ref) <= tol, f"grad {name}: {max_rel_error(got, ref):.2e}"
    return out, grads


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("divergence,tail", [("fkl", False), ("fkl", True), ("rkl", True), ("jsd", True)])
@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0)])
def test_matches_unfused(dtype, tol, divergence, tail, alpha, temperature):
    # 37 rows in chunks of 8: the last chunk is partial.
    hidden, weight, _, idx, logp, labels = make_head(37, 24, 301, 8, dtype=dtype, seed=1)
    assert_fused_matches(hidden, weight, None, tol, idx=idx, logp=logp, labels=labels, chunk_rows=8, tail=tail,
                         alpha=alpha, temperature=temperature, divergence=divergence)


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunks_reductions_bias_softcap(chunk_rows, reduction):
    # chunk sizes that divide N = 20, that do not, and one larger than N; a per-row upstream gradient
    # (reduction="none", recomputed in the backward) and a scalar one != 1.
    hidden, weight, bias, idx, logp, labels = make_head(20, 16, 211, 8, seed=2, bias=True)
    grad_out = torch.linspace(-1, 2, 20) if reduction == "none" else torch.tensor(2.5)
    out, _ = assert_fused_matches(hidden, weight, bias, 2e-5, grad_out, idx=idx, logp=logp, labels=labels,
                                  chunk_rows=chunk_rows, tail=True, alpha=0.5, temperature=2.0, reduction=reduction,
                                  softcap=5.0, return_parts=True)
    assert out.kd.shape == out.loss.shape


def test_tied_weights_get_both_gradients():
    # A tied head: the embedding matrix is the output weight; its gradient adds the head's to the lookup's.
    hidden_ids, weight, _, idx, logp, labels = make_head(12, 16, 97, 4, seed=3)
    tokens = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in ("fused", "unfused"):
        emb = weight.clone().requires_grad_()
        hidden = torch.tanh(emb[tokens] * 2)
        if fn == "fused":
            loss = sparse_kl_linear(hidden, emb, idx, logp, labels, alpha=0.5, tail=True, chunk_rows=5)
        else:
            loss = sparse_kl(hidden @ emb.t(), idx, logp, labels, alpha=0.5, tail=True)
        loss.backward()
        grads.append(emb.grad)
    assert max_rel_error(grads[0], grads[1]) <= 1e-5


def test_all_rows_ignored_and_empty_batch():
    hidden, weight, _, idx, logp, labels = make_head(9, 8, 50, 4, seed=4)
    labels[:] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sparse_kl_linear(h, w, idx, logp, labels, alpha=0.5, chunk_rows=4)
    loss.backward()
    assert loss.item() == 0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)
    h, w = hidden[:0].clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sparse_kl_linear(h, w, idx[:0], logp[:0], labels[:0], alpha=0.5)
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 8) and torch.all(w.grad == 0)


def test_no_grad_forward_matches():
    hidden, weight, _, idx, logp, labels = make_head(10, 8, 60, 4, seed=5)
    with torch.no_grad():
        a = sparse_kl_linear(hidden, weight, idx, logp, labels, tail=True, chunk_rows=3)
    b = sparse_kl(hidden @ weight.t(), idx, logp, labels, tail=True)
    assert max_rel_error(a, b) <= 1e-5


def test_gradcheck_float64():
    hidden, weight, bias, idx, logp, labels = make_head(6, 5, 23, 4, dtype=torch.float64, seed=6, bias=True,
                                                        ignored_every=4)
    fn = lambda h, w, b: sparse_kl_linear(h, w, idx, logp.double(), labels, bias=b, tail=True, alpha=0.5,
                                          temperature=2.0, divergence="jsd", softcap=3.0, chunk_rows=4)
    args = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_argument_errors():
    hidden, weight, _, idx, logp, labels = make_head(6, 8, 40, 4, seed=7)
    with pytest.raises(SparseKLError, match=r"weight must be \[V, H\] with H = 8 in hidden's dtype"):
        sparse_kl_linear(hidden, weight[:, :7], idx, logp, labels)
    with pytest.raises(SparseKLError, match=r"bias must be \[V\] = \[40\]"):
        sparse_kl_linear(hidden, weight, idx, logp, labels, bias=torch.zeros(39))
    with pytest.raises(SparseKLError, match=r"chunk_rows must be an int >= 1, got 0"):
        sparse_kl_linear(hidden, weight, idx, logp, labels, chunk_rows=0)
    with pytest.raises(SparseKLError, match=r"softcap must be a number > 0"):
        sparse_kl_linear(hidden, weight, idx, logp, labels, softcap=-1.0)
    with pytest.raises(SparseKLError, match=r"ids in \[0, V = 40\); row 2 holds 40"):
        sparse_kl_linear(hidden, weight, idx.index_put((torch.tensor(2), torch.tensor(0)), torch.tensor(40)), logp)
    with pytest.raises(SparseKLError, match=r"logits must be finite .*row 3"):
        sparse_kl_linear(hidden.index_put((torch.tensor(3),), torch.tensor(float("nan"))), weight, idx, logp)


@pytest.mark.parametrize("fn", ["sparse_kl", "sparse_kl_linear"])
def test_validate_false_gives_the_same_results_without_syncing(fn, monkeypatch):
    hidden, weight, _, idx, logp, labels = make_head(14, 8, 70, 4, seed=8)
    call = (lambda v, h, w: sparse_kl(h @ w.t(), idx, logp, labels, tail=True, alpha=0.5, validate=v)) \
        if fn == "sparse_kl" else \
        (lambda v, h, w: sparse_kl_linear(h, w, idx, logp, labels, tail=True, alpha=0.5, chunk_rows=4, validate=v))
    results = []
    for validate in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if not validate:  # the one sync of the checks is a .tolist(): with validate=False nothing may call it
            monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("validate=False synced"))
        loss = call(validate, h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    monkeypatch.undo()
    for a, b in zip(*results):
        assert torch.equal(a, b)


class TinyLM(torch.nn.Module):
    """Embedding -> one MLP block -> tied head: enough to trace model + loss together."""

    def __init__(self, vocab=61, hidden=16):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.5)
        self.mlp = torch.nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.mlp.weight.copy_(torch.randn(hidden, hidden, generator=g))
            self.mlp.bias.copy_(torch.randn(hidden, generator=g) * 0.1)

    def forward(self, tokens, idx, logp, labels, fused):
        h = torch.tanh(self.mlp(self.emb[tokens]))
        kw = dict(tail=True, alpha=0.5, temperature=2.0, divergence="jsd", validate=False)
        if fused:
            return sparse_kl_linear(h, self.emb, idx, logp, labels, chunk_rows=4, **kw)
        return sparse_kl(h @ self.emb.t(), idx, logp, labels, **kw)


@pytest.mark.parametrize("fused", [False, True], ids=["sparse_kl", "sparse_kl_linear"])
def test_torch_compile_fullgraph_matches_eager(fused):
    torch._dynamo.reset()
    _, idx, logp, labels = make_inputs(11, 61, 4, seed=10)
    tokens = torch.randint(0, 61, (11,), generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        model = TinyLM()
        fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        loss = fn(tokens, idx, logp, labels, fused)
        loss.backward()
        results.append((loss.detach(), model.emb.grad, model.mlp.weight.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    explain = torch._dynamo.explain(TinyLM())(tokens, idx, logp, labels, fused)
    assert explain.graph_break_count == 0, explain.break_reasons
