"""The top-k codecs: exact ids, the stated sqrt-probability bound, the tail, edge cases, corrupt frames,
frames that decode alone, and `sqrt_ac`'s dependence on the compiled extension."""
import sys
import threading

import numpy as np
import pytest
import torch

from kdengine.store.codec import (
    CodecError, codec_unavailable, learn_id_prior, learn_shard_table, make_codec,
)
from kdengine.teachers.base import topk_logprobs

LOSSY = ["sqrt_ac", "sqrt"]
TEXTS = ["The farmer has 12 apples and buys 7 more. How many apples does he have? He has 19 apples.",
         "Each student spends 3 dollars per day, so in a week they spend 21 dollars.",
         "Then the baker sells half of the 40 books at the market.",
         "The farmer has 12 apples and sells 5 of them, so the farmer has 7 apples left."]


@pytest.fixture(scope="module")
def teacher_samples(tiny_model_dir):
    """The tiny Llama over a few lines of text: per sample (input_ids [T], log-softmax [T-1, V])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    out = []
    for text in TEXTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append((ids[0].numpy().astype(np.int32), torch.log_softmax(model(ids).logits[0, :-1].float(), -1)))
    return len(tok), out


def _topk(teacher_samples, k):
    """Per sample (idx int32 [P, k], logp float32 [P, k], input_ids, positions), real teacher outputs."""
    vocab, samples = teacher_samples
    out = []
    for input_ids, logsoftmax in samples:
        top = topk_logprobs(logsoftmax, k)
        out.append((top.idx.numpy(), top.logp.numpy(), input_ids, np.arange(len(input_ids) - 1, dtype=np.int32)))
    return vocab, out


def _codec(name, k, vocab, samples=(), **params):
    ids = np.concatenate([s[0] for s in samples]) if samples else np.zeros((0, k), np.int32)
    return make_codec(name, k=k, vocab_size=vocab, table=learn_shard_table(name, ids, vocab), **params)


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


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("k, delta", [(16, 1 / 1100), (16, 1 / 64), (64, 1 / 1100), (128, 1 / 1100)])
def test_round_trip_keeps_ids_and_the_stated_bound(teacher_samples, name, k, delta):
    vocab, samples = _topk(teacher_samples, k)
    codec = _codec(name, k, vocab, samples, delta=delta)
    for idx, logp, input_ids, positions in samples:
        got_idx, got_logp = codec.decode(codec.encode(idx, logp, input_ids, positions), input_ids, positions)
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


def test_sqrt_ac_decodes_the_same_values_as_sqrt_in_fewer_bytes(teacher_samples):
    """Same quantization, different entropy coder: equal log-probs per id (up to float rounding)."""
    vocab, samples = _topk(teacher_samples, 64)
    ac, sq = _codec("sqrt_ac", 64, vocab, samples), _codec("sqrt", 64, vocab, samples)
    sizes = {"sqrt_ac": 0, "sqrt": 0}
    for idx, logp, input_ids, positions in samples:
        frames = {c.name: c.encode(idx, logp, input_ids, positions) for c in (ac, sq)}
        a = _align(idx, logp, *ac.decode(frames["sqrt_ac"], input_ids, positions))[1]
        s = _align(idx, logp, *sq.decode(frames["sqrt"], input_ids, positions))[1]
        np.testing.assert_allclose(a, s, rtol=1e-6, atol=1e-6)
        for name, frame in frames.items():
            sizes[name] += len(frame)
    assert sizes["sqrt_ac"] < sizes["sqrt"]


@pytest.mark.parametrize("name", LOSSY)
def test_mean_kl_matches_the_uniform_step_estimate(teacher_samples, name):
    vocab, samples = _topk(teacher_samples, 16)
    delta = 1 / 256
    codec = _codec(name, 16, vocab, delta=delta)
    kls = []
    for idx, logp, input_ids, positions in samples:
        frame = codec.encode(idx, logp, input_ids, positions)
        true, got = _align(idx, logp, *codec.decode(frame, input_ids, positions))
        p, q = np.exp(true), np.exp(got)
        pt, qt = np.maximum(1 - p.sum(1), 0), 1 - q.sum(1)
        kls.append((p * (true - got)).sum(1) + pt * (np.log(np.maximum(pt, 1e-300)) - np.log(qt)))
    kl = np.concatenate(kls).mean()
    estimate = (16 + 1) * delta**2 / 6
    assert estimate / 4 < kl < 2 * estimate


def test_raw_codec_is_lossless(teacher_samples):
    vocab, samples = _topk(teacher_samples, 16)
    codec = make_codec("raw", k=16, vocab_size=vocab)
    for idx, logp, input_ids, positions in samples:
        got_idx, got_logp = codec.decode(codec.encode(idx, logp, input_ids, positions), input_ids, positions)
        np.testing.assert_array_equal(got_idx, idx)
        np.testing.assert_array_equal(got_logp, logp)


@pytest.mark.parametrize("name", LOSSY)
def test_edge_cases_empty_one_position_one_column_whole_vocab_and_minus_inf(name):
    tokens = np.array([5, 1, 2, 9], np.int32)
    codec = make_codec(name, k=4, vocab_size=10)
    idx, logp = codec.decode(codec.encode(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32), tokens[:1],
                                          np.zeros(0, np.int32)), tokens[:1], np.zeros(0, np.int32))
    assert idx.shape == (0, 4) and logp.shape == (0, 4)

    one_position = np.array([[7, 2, 0, 4]]), np.log(np.array([[0.6, 0.3, 0.05, 0.01]]))
    idx, logp = codec.decode(codec.encode(*one_position, tokens, [2]), tokens, [2])
    np.testing.assert_array_equal(idx, one_position[0])
    np.testing.assert_allclose(np.exp(logp), [[0.6, 0.3, 0.05, 0.01]], atol=2e-3)

    one = make_codec(name, k=1, vocab_size=10)
    idx, logp = one.decode(one.encode(np.array([[3], [7]]), np.log(np.array([[0.9], [0.2]])), tokens, [0, 1]),
                           tokens, [0, 1])
    np.testing.assert_array_equal(idx, [[3], [7]])
    np.testing.assert_allclose(np.exp(logp), [[0.9], [0.2]], atol=2e-3)

    # K = V: the true tail is 0; a near-one-hot row; and an entry whose probability underflowed.
    full = make_codec(name, k=10, vocab_size=10)
    p = np.array([np.full(10, 0.1), [1 - 9e-9] + [1e-9] * 9])
    logp = np.log(p)
    logp[1, -1] = -np.inf
    idx = np.tile(np.arange(10), (2, 1))
    got_idx, got_logp = full.decode(full.encode(idx, logp, tokens, [0, 1]), tokens, [0, 1])
    assert set(got_idx[0]) == set(got_idx[1]) == set(range(10)) and got_idx[1, 0] == 0
    assert np.isfinite(got_logp).all() and np.exp(got_logp).sum(1).max() < 1


def test_sqrt_ac_equal_levels_come_out_by_id_and_the_next_token_may_be_anywhere():
    """A row of equal probabilities is one set; the next token in it, first, or outside the top-k."""
    codec = make_codec("sqrt_ac", k=8, vocab_size=50)
    idx = np.array([[40, 3, 17, 8, 25, 11, 30, 2], [9, 8, 7, 6, 5, 4, 3, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    logp = np.log(np.array([[0.1] * 8, [0.5, 0.2, 0.1, 0.1, 0.05, 0.02, 0.01, 0.01], [0.3] + [0.01] * 7]))
    tokens = np.array([0, 17, 9, 49, 0], np.int32)  # next tokens 17 (in a tie), 9 (top-1), 49 (absent)
    got_idx, got_logp = codec.decode(codec.encode(idx, logp, tokens, [0, 1, 2]), tokens, [0, 1, 2])
    np.testing.assert_array_equal(got_idx[0], np.sort(idx[0]))
    np.testing.assert_array_equal(got_idx[1], [9, 8, 6, 7, 5, 4, 2, 3])
    np.testing.assert_array_equal(got_idx[2], idx[2])


def test_frames_decode_alone_in_any_order_and_encode_alike_in_any_thread(teacher_samples):
    vocab, samples = _topk(teacher_samples, 64)
    codec = _codec("sqrt_ac", 64, vocab, samples)
    frames = [codec.encode(*s[:4]) for s in samples]
    assert codec.encode(*samples[2]) == frames[2]  # after other frames: no state carried over
    for i in (3, 0, 2, 1):
        fresh = _codec("sqrt_ac", 64, vocab, samples)
        got_idx, _ = fresh.decode(frames[i], samples[i][2], samples[i][3])
        np.testing.assert_array_equal(np.sort(got_idx, 1), np.sort(samples[i][0], 1))
    results = {}

    def encode_all(name):
        results[name] = [codec.encode(*s) for s in samples for _ in range(3)]

    threads = [threading.Thread(target=encode_all, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == [f for f in frames for _ in range(3)] for r in results.values())


def test_sqrt_ac_tables_and_the_frame_must_match_the_sample(teacher_samples):
    vocab, samples = _topk(teacher_samples, 16)
    codec = _codec("sqrt_ac", 16, vocab, samples)
    idx, logp, input_ids, positions = samples[0]
    frame = codec.encode(idx, logp, input_ids, positions)
    with pytest.raises(CodecError, match=r"frame holds \d+ positions, the sample has 3"):
        codec.decode(frame, input_ids, positions[:3])
    other_tokens = input_ids.copy()
    other_tokens[1:] = input_ids[1:][::-1]
    with pytest.raises(CodecError):
        codec.decode(frame, other_tokens, positions)  # the models follow the tokens: another sample's frame
    with pytest.raises(CodecError):
        make_codec("sqrt_ac", k=16, vocab_size=vocab).decode(frame, input_ids, positions)  # another id_prior
    with pytest.raises(CodecError, match="does not fit its sample"):
        codec.decode(frame, input_ids[:3], positions)


def test_inputs_are_checked():
    for name in LOSSY:
        codec = make_codec(name, k=2, vocab_size=5)
        tokens, pos = np.zeros(4, np.int32), np.arange(3)
        with pytest.raises(ValueError, match=r"shape \[P, 2\]"):
            codec.encode(np.zeros((3, 4), np.int32), np.zeros((3, 4)), tokens, pos)
        with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
            codec.encode(np.array([[1, 5]]), np.log([[0.5, 0.4]]), tokens, pos[:1])
        with pytest.raises(ValueError, match="not NaN"):
            codec.encode(np.array([[1, 2]]), np.array([[np.nan, -1.0]]), tokens, pos[:1])
    codec = make_codec("sqrt_ac", k=2, vocab_size=5)
    with pytest.raises(ValueError, match="row 1: id 3 repeats"):
        codec.encode(np.array([[1, 2], [3, 3]]), np.log([[0.5, 0.4], [0.5, 0.4]]), np.zeros(4, np.int32), [0, 1])
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 2\]"):
        codec.encode(np.array([[1, 2]]), np.log([[0.5, 0.4]]), np.zeros(4, np.int32), [3])
    with pytest.raises(ValueError, match="unknown codec 'zip'; expected one of sqrt_ac, sqrt, raw"):
        make_codec("zip", k=2, vocab_size=5)
    with pytest.raises(ValueError, match="permutation of range"):
        make_codec("sqrt", k=2, vocab_size=5, table=np.array([0, 1, 2, 3, 3]))
    with pytest.raises(ValueError, match=r"id_prior must be 5 integer weights in \[1, 2\^23\]"):
        make_codec("sqrt_ac", k=2, vocab_size=5, table=np.array([1, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="has no parameter"):
        make_codec("sqrt_ac", k=2, vocab_size=5, zstd_level=1)


def test_id_prior_follows_the_counts():
    ids = np.array([[0, 1], [0, 2], [0, 1]])
    prior = learn_id_prior(ids, 5)
    assert prior.dtype == np.int32 and prior[0] > prior[1] > prior[2] > prior[3] == prior[4] >= 1
    assert prior.sum() <= (1 << 22) + 5


@pytest.mark.parametrize("name", LOSSY)
def test_corrupt_frames_raise_codec_error(teacher_samples, name):
    vocab, samples = _topk(teacher_samples, 16)
    codec = _codec(name, 16, vocab, samples)
    idx, logp, input_ids, positions = samples[0]
    frame = codec.encode(idx, logp, input_ids, positions)
    with pytest.raises(CodecError, match="shorter than its 12-byte header"):
        codec.decode(frame[:5], input_ids, positions)
    with pytest.raises(CodecError):
        codec.decode(frame[:-3], input_ids, positions)  # cut short
    with pytest.raises(CodecError, match="frame holds K=16, the store says K=8"):
        make_codec(name, k=8, vocab_size=vocab).decode(frame, input_ids, positions)
    with pytest.raises(CodecError, match="not the 'raw' codec"):
        make_codec("raw", k=16, vocab_size=vocab).decode(frame, input_ids, positions)
    with pytest.raises(CodecError):
        codec.decode(frame[:12] + bytes(len(frame) - 12), input_ids, positions)  # a zeroed body


def test_sqrt_ac_fuzz_damaged_frames_are_refused_or_decode_to_well_formed_rows(teacher_samples):
    """Every cut is refused. A flipped byte or a random body is refused unless it only changes bits the
    coder stores raw (then the rows are still well formed); nothing crashes or reads out of bounds (the
    store's per-sample crc32 catches every damaged frame before it gets here, see test_store)."""
    vocab, samples = _topk(teacher_samples, 16)
    codec = _codec("sqrt_ac", 16, vocab, samples)
    idx, logp, input_ids, positions = samples[1]
    frame = codec.encode(idx, logp, input_ids, positions)
    for n in range(len(frame)):
        with pytest.raises(CodecError):
            codec.decode(frame[:n], input_ids, positions)
    for extra in (bytes(4), b"\x01\x00\x00\x00"):
        with pytest.raises(CodecError):
            codec.decode(frame + extra, input_ids, positions)
    rng = np.random.default_rng(0)
    damaged = []
    for at in range(len(frame)):
        for mask in (0x01, 0x80, int(rng.integers(1, 256))):
            flipped = bytearray(frame)
            flipped[at] ^= mask
            damaged.append(bytes(flipped))
    damaged += [frame[:12] + rng.integers(0, 256, len(frame) - 12, dtype=np.uint8).tobytes() for _ in range(200)]
    refused = 0
    for bad in damaged:
        try:
            got_idx, got_logp = codec.decode(bad, input_ids, positions)
        except CodecError:
            refused += 1
            continue
        assert got_idx.shape == idx.shape and got_idx.min() >= 0 and got_idx.max() < vocab
        assert all(len(set(row)) == 16 for row in got_idx.tolist())
        assert np.isfinite(got_logp).all() and np.exp(got_logp.astype(np.float64)).sum(1).max() < 1
    assert refused >= 0.8 * len(damaged)


def test_sqrt_ac_without_the_extension_says_how_to_build_it(monkeypatch):
    import kdengine

    monkeypatch.delattr(kdengine, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "kdengine._C", None)  # `from kdengine import _C` now fails
    reason = codec_unavailable("sqrt_ac")
    assert "needs the compiled extension kdengine._C" in reason and "pip install --no-build-isolation -e ." in reason
    assert codec_unavailable("sqrt") is None and codec_unavailable("raw") is None
    with pytest.raises(ValueError, match="needs the compiled extension kdengine._C"):
        make_codec("sqrt_ac", k=2, vocab_size=5)


def test_a_sqrt_frame_written_before_sqrt_ac_existed_still_decodes():
    """Stores name their codec; a `sqrt` frame from the previous release (bytes recorded then) reads
    back to its ids and values within the bound."""
    frame = bytes.fromhex("51310400030000002f000000201b3000002f0118073701180000010502480000b0fe66ff1d9c00003a3800000a"
                          "02080106070910000001010100006d88e780")
    order = np.array([3, 0, 1, 2, 19] + [i for i in range(20) if i not in (3, 0, 1, 2, 19)], np.int32)
    codec = make_codec("sqrt", k=4, vocab_size=20, table=order)
    idx, logp = codec.decode(frame, np.zeros(4, np.int32), np.arange(3))
    np.testing.assert_array_equal(idx, [[3, 11, 0, 7], [19, 3, 4, 5], [0, 1, 2, 9]])  # equal levels by rank
    p = np.array([[0.5, 0.3, 0.1, 0.05], [0.9, 0.04, 0.03, 0.001], [0.25, 0.25, 0.25, 0.2]])
    assert np.abs(np.sqrt(np.exp(logp.astype(np.float64))) - np.sqrt(p)).max() <= codec.sqrt_prob_error_bound
