"""The top-k codecs: exact ids, the stated sqrt-probability bound, the tail, edge cases, corrupt frames."""
import numpy as np
import pytest
import torch

from kdengine.store.codec import CodecError, learn_vocab_order, make_codec
from kdengine.teachers.base import topk_logprobs

K = 16


@pytest.fixture(scope="module")
def teacher_topk(tiny_model_dir):
    """Top-K of the tiny Llama over a few lines of text: real log-softmax outputs, [P, K] per sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    texts = ["The farmer has 12 apples and buys 7 more. How many apples does he have?",
             "Each student spends 3 dollars per day, so in a week they spend 21 dollars.",
             "Then the baker sells half of the 40 books at the market."]
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            top = topk_logprobs(model(ids).logits[0, :-1], K)
        out.append((top.idx.numpy(), top.logp.numpy()))
    return len(tok), out


def _align(true_idx, true_logp, got_idx, got_logp):
    """Both sides sorted by id per row; asserts the id sets are equal."""
    ts, gs = np.argsort(true_idx, 1), np.argsort(got_idx, 1)
    np.testing.assert_array_equal(np.take_along_axis(true_idx, ts, 1), np.take_along_axis(got_idx, gs, 1))
    true = np.take_along_axis(true_logp.astype(np.float64), ts, 1)
    return true, np.take_along_axis(got_logp.astype(np.float64), gs, 1)


def _true_logp_in_order(idx, logp, got_idx):
    """The teacher's log-probs of the ids in got_idx, row by row."""
    order = np.argsort(idx, 1)
    ids, lp = np.take_along_axis(idx, order, 1), np.take_along_axis(logp.astype(np.float64), order, 1)
    where = np.stack([np.searchsorted(ids[r], got_idx[r]) for r in range(len(idx))])
    return np.take_along_axis(lp, where, 1)


@pytest.mark.parametrize("delta", [1 / 1100, 1 / 64])
def test_sqrt_round_trip_keeps_ids_and_the_stated_bound(teacher_topk, delta):
    vocab, samples = teacher_topk
    order = learn_vocab_order(np.concatenate([s[0] for s in samples]), vocab)
    codec = make_codec("sqrt", k=K, vocab_size=vocab, vocab_order=order, delta=delta)
    for idx, logp in samples:
        got_idx, got_logp = codec.decode(codec.encode(idx, logp))
        assert got_idx.dtype == np.int32 and got_logp.dtype == np.float32 and got_idx.shape == idx.shape
        true, got = _align(idx, logp, got_idx, got_logp)
        p, q = np.exp(true), np.exp(got)
        assert np.abs(np.sqrt(p) - np.sqrt(q)).max() <= codec.sqrt_prob_error_bound
        tail_true, tail_got = 1 - p.sum(1), 1 - q.sum(1)
        assert tail_got.min() > 0  # sum(exp(topk_logp)) < 1: the loss's tail bucket is never negative
        assert np.abs(np.sqrt(np.maximum(tail_true, 0)) - np.sqrt(tail_got)).max() <= codec.sqrt_prob_error_bound
        # Rows are sorted by decoded probability, and the teacher's order is kept up to ties: the true
        # sqrt(p) of consecutive decoded entries can rise by at most one quantization step.
        assert np.all(np.diff(got_logp, axis=1) <= 0)
        sqrt_true = np.sqrt(np.exp(_true_logp_in_order(idx, logp, got_idx)))
        assert np.all(np.diff(sqrt_true, axis=1) <= delta + 1e-12)


def test_sqrt_mean_kl_matches_the_uniform_step_estimate(teacher_topk):
    vocab, samples = teacher_topk
    delta = 1 / 256
    codec = make_codec("sqrt", k=K, vocab_size=vocab, delta=delta)
    kls = []
    for idx, logp in samples:
        true, got = _align(idx, logp, *codec.decode(codec.encode(idx, logp)))
        p, q = np.exp(true), np.exp(got)
        pt, qt = np.maximum(1 - p.sum(1), 0), 1 - q.sum(1)
        kls.append((p * (true - got)).sum(1) + pt * (np.log(np.maximum(pt, 1e-300)) - np.log(qt)))
    kl = np.concatenate(kls).mean()
    estimate = (K + 1) * delta**2 / 6
    assert estimate / 4 < kl < 2 * estimate


def test_raw_codec_is_lossless(teacher_topk):
    vocab, samples = teacher_topk
    codec = make_codec("raw", k=K, vocab_size=vocab)
    for idx, logp in samples:
        got_idx, got_logp = codec.decode(codec.encode(idx, logp))
        np.testing.assert_array_equal(got_idx, idx)
        np.testing.assert_array_equal(got_logp, logp)


def test_edge_cases_empty_one_column_whole_vocab_and_minus_inf():
    codec = make_codec("sqrt", k=4, vocab_size=10)
    idx, logp = codec.decode(codec.encode(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32)))
    assert idx.shape == (0, 4) and logp.shape == (0, 4)

    one = make_codec("sqrt", k=1, vocab_size=10)
    idx, logp = one.decode(one.encode(np.array([[3], [7]]), np.log(np.array([[0.9], [0.2]]))))
    np.testing.assert_array_equal(idx, [[3], [7]])
    np.testing.assert_allclose(np.exp(logp), [[0.9], [0.2]], atol=2e-3)

    # K = V: the true tail is 0; a near-one-hot row; and an entry whose probability underflowed.
    full = make_codec("sqrt", k=10, vocab_size=10)
    p = np.array([np.full(10, 0.1), [1 - 9e-9] + [1e-9] * 9])
    logp = np.log(p)
    logp[1, -1] = -np.inf
    idx = np.tile(np.arange(10), (2, 1))
    got_idx, got_logp = full.decode(full.encode(idx, logp))
    assert set(got_idx[1]) == set(range(10)) and got_idx[1, 0] == 0
    assert np.isfinite(got_logp).all() and np.exp(got_logp).sum(1).max() < 1


def test_inputs_are_checked():
    codec = make_codec("sqrt", k=2, vocab_size=5)
    with pytest.raises(ValueError, match=r"shape \[P, 2\]"):
        codec.encode(np.zeros((3, 4), np.int32), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
        codec.encode(np.array([[1, 5]]), np.log([[0.5, 0.4]]))
    with pytest.raises(ValueError, match="not NaN"):
        codec.encode(np.array([[1, 2]]), np.array([[np.nan, -1.0]]))
    with pytest.raises(ValueError, match="unknown codec 'zip'; expected one of sqrt, raw"):
        make_codec("zip", k=2, vocab_size=5)
    with pytest.raises(ValueError, match="permutation of range"):
        make_codec("sqrt", k=2, vocab_size=5, vocab_order=np.array([0, 1, 2, 3, 3]))


def test_corrupt_frames_raise_codec_error(teacher_topk):
    vocab, samples = teacher_topk
    codec = make_codec("sqrt", k=K, vocab_size=vocab)
    frame = codec.encode(*samples[0])
    with pytest.raises(CodecError, match="shorter than its 12-byte header"):
        codec.decode(frame[:5])
    with pytest.raises(CodecError):
        codec.decode(frame[:-3])  # low bits cut short
    with pytest.raises(CodecError, match="frame holds K=16, the store says K=8"):
        make_codec("sqrt", k=8, vocab_size=vocab).decode(frame)
    with pytest.raises(CodecError, match="not the 'raw' codec"):
        make_codec("raw", k=K, vocab_size=vocab).decode(frame)
    with pytest.raises(CodecError):
        codec.decode(frame[:12] + bytes(len(frame) - 12))  # a zeroed body
