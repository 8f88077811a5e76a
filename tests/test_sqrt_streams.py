"""The `sqrt` codec's C++ integer encode and decode (csrc/sqrt_streams.cpp) against their numpy
references (SqrtCodec.encode_streams, .decode_integers): the same bytes and the same arrays on random
frames of many shapes (ties, escaped steps in byte and nibble groups, large vocabularies), the same
error on corrupted streams, and log-probs equal to FORMAT.md's formula computed directly."""
import numpy as np
import pytest

from kdengine.store import codec as codec_module
from kdengine.store.codec import CodecError, _unpack_frame, learn_vocab_order, make_codec

pytestmark = pytest.mark.skipif(codec_module._sqrt_streams_decoder() is None
                                or codec_module._sqrt_streams_encoder() is None,
                                reason="needs the compiled extension kdengine._C")


def _rows(rng, n_pos, k, vocab, *, peaked):
    """Sorted top-k rows: random logits, some rows with one dominant entry (steps >= 255 right after
    it) and many near-equal small ones (ties, small steps in the nibble columns)."""
    logits = rng.normal(size=(n_pos, vocab)) * rng.choice([0.5, 2.0, 6.0], size=(n_pos, 1))
    if peaked:
        logits[rng.random(n_pos) < 0.5, rng.integers(0, vocab)] += 12.0
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    idx = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(logp, idx, 1).astype(np.float32)


def _frames(seed, shapes, vocab=500):
    rng = np.random.default_rng(seed)
    for n_pos, k in shapes:
        idx, logp = _rows(rng, n_pos, k, vocab, peaked=bool(rng.integers(2)))
        order = learn_vocab_order(idx, vocab) if n_pos else np.arange(vocab, dtype=np.int32)
        codec = make_codec("sqrt", k=k, vocab_size=vocab, table=order)
        yield codec, codec.encode(idx, logp), idx, logp


def _streams(codec, frame):
    n_pos, k, body, bits = _unpack_frame("sqrt", frame, codec.k)
    return codec._zd.decompress(body), bytes(bits), n_pos, k


def _cpp(codec, data, bits, n_pos, k):
    return codec_module._sqrt_streams_decoder()(data, bits, n_pos, k, codec._escape_bits, codec.max_level,
                                                codec.vocab_order)


SHAPES = [(0, 4), (1, 1), (1, 64), (7, 2), (9, 3), (5, 4), (11, 5), (13, 15), (8, 16), (6, 17), (40, 33),
          (30, 64), (3, 100), (2, 250)]


@pytest.mark.parametrize("seed", range(3))
def test_cpp_decode_equals_the_numpy_reference(seed):
    escaped = 0
    for codec, frame, idx, _ in _frames(seed, SHAPES):
        data, bits, n_pos, k = _streams(codec, frame)
        want = codec.decode_integers(data, bits, n_pos, k)
        got = _cpp(codec, data, bits, n_pos, k)
        for name, w, g in zip(("ids", "levels", "tail levels"), want, got):
            np.testing.assert_array_equal(g, w, err_msg=f"{name}, P={n_pos}, K={k}")
        assert got[0].dtype == np.int32
        np.testing.assert_array_equal(np.sort(got[0], 1), np.sort(idx, 1))
        steps = -np.diff(want[1], axis=1)
        escaped += int((steps[:, :15] >= 255).sum() + (steps[:, 15:] >= 15).sum())
    assert escaped > 0  # the escape paths ran


def test_large_vocabulary_and_wide_rows():
    for codec, frame, _, _ in _frames(7, [(20, 64), (4, 300)], vocab=70_000):
        data, bits, n_pos, k = _streams(codec, frame)
        for w, g in zip(codec.decode_integers(data, bits, n_pos, k), _cpp(codec, data, bits, n_pos, k)):
            np.testing.assert_array_equal(g, w)


def _outcome(fn):
    try:
        return fn()
    except CodecError as exc:
        return str(exc)


def test_corrupted_streams_fail_the_same_way():
    rng = np.random.default_rng(3)
    frames = list(_frames(11, [(12, 20), (6, 64), (3, 5)]))
    kinds = set()
    for trial in range(600):
        codec, frame, _, _ = frames[trial % len(frames)]
        data, bits, n_pos, k = _streams(codec, frame)
        data, bits = bytearray(data), bytearray(bits)
        target = data if (trial % 3 or not bits) else bits
        cut = trial % 7 == 0
        if cut:
            del target[rng.integers(len(target)):]
        else:
            target[rng.integers(len(target))] = rng.integers(256)
        data, bits = bytes(data), bytes(bits)
        want = _outcome(lambda: codec.decode_integers(data, bits, n_pos, k))
        got = _outcome(lambda: _cpp_checked(codec, data, bits, n_pos, k))
        if isinstance(want, str):
            assert got == want, f"trial {trial}"
            kinds.add(want.split(" ")[0])
        else:
            for w, g in zip(want, got):
                np.testing.assert_array_equal(g, w)
    assert len(kinds) >= 3, kinds  # several kinds of damage were seen


def _cpp_checked(codec, data, bits, n_pos, k):
    try:
        return _cpp(codec, data, bits, n_pos, k)
    except codec_module._coder_error() as exc:
        raise CodecError(str(exc)) from None


def test_log_probs_are_the_formula_computed_directly():
    for codec, frame, _, _ in _frames(5, SHAPES):
        data, bits, n_pos, k = _streams(codec, frame)
        ids, level, tail = codec.decode_integers(data, bits, n_pos, k)
        sq = level.astype(np.float64) * codec.delta
        tail_sq = tail.astype(np.float64) * codec.delta
        with np.errstate(divide="ignore"):
            want = (2.0 * np.log(sq) - np.log((sq * sq).sum(axis=1) + tail_sq * tail_sq)[:, None]).astype(np.float32)
        got_ids, got = codec.decode(frame)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got, want)


def test_without_the_extension_sqrt_decodes_with_numpy_to_the_same_arrays(monkeypatch):
    frames = list(_frames(9, SHAPES[:6]))
    with_cpp = [codec.decode(frame) for codec, frame, _, _ in frames]
    monkeypatch.setattr(codec_module, "_sqrt_streams_decoder", lambda: None)
    for (codec, frame, _, _), (ids, logp) in zip(frames, with_cpp):
        got_ids, got_logp = codec.decode(frame)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_logp, logp)


def test_a_row_count_the_streams_cannot_hold_is_refused_before_anything_is_allocated():
    codec, frame, _, _ = next(_frames(1, [(5, 64)]))
    data, bits, _, k = _streams(codec, frame)
    with pytest.raises(codec_module._coder_error(), match=f"stream ends at byte {len(data)}, needed 8000000000"):
        _cpp(codec, data, bits, 4_000_000_000, k)


@pytest.mark.parametrize("seed", range(3))
def test_cpp_encode_writes_the_numpy_reference_bytes(seed, monkeypatch):
    rng = np.random.default_rng(100 + seed)
    shapes = SHAPES + [(5, 64)]
    frames = list(_frames(seed, shapes))
    for codec, frame, idx, logp in frames:
        level, tail = codec_module._sqrt_levels(logp, codec.delta, codec.max_level)
        shuffle = np.argsort(rng.random(idx.shape), axis=1)  # a row's entries may come in any order
        level, rank = np.take_along_axis(level, shuffle, 1), np.take_along_axis(codec._rank[idx], shuffle, 1)
        want = codec.encode_streams(level, rank, tail)
        got = codec_module._sqrt_streams_encoder()(level.astype(np.int32), rank.astype(np.int32),
                                                     tail.astype(np.int32), codec._escape_bits, codec.max_level)
        assert list(got[0]) == want[0] and got[1] == want[1], idx.shape
    monkeypatch.setattr(codec_module, "_sqrt_streams_encoder", lambda: None)
    for codec, frame, idx, logp in frames:
        assert codec.encode(idx, logp) == frame  # the numpy fallback writes the same frames
