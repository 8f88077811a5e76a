"""The `sqrt_ac` coder against frames stored by the coder of commit 41310ea (tests/fixtures/coder_v2):
every change to the coder's speed must decode exactly the same rows and encode byte-identical bodies."""
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (kdengine._C links against torch's libraries)
from safetensors import safe_open

from conftest import rows_digest
from kdengine import _C
from kdengine.store.codec import _FRAME_HEADER, _TAG

FRAMES = Path(__file__).parent / "fixtures" / "coder_v2" / "frames.safetensors"


def _fixture():
    with safe_open(str(FRAMES), framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


TENSORS, META = _fixture()
CASES = sorted({name.split("/")[0] for name in TENSORS})


def _coder(case):
    k, vocab, ragged = (int(META[f"{case}/{key}"]) for key in ("k", "vocab", "ragged"))
    prior = TENSORS[f"{case}/prior"].astype(np.uint32)
    return _C.TopKCoder(k, vocab, int(META["max_level"]), prior, bool(ragged))


def _frames(case):
    for j in range(int(META[f"{case}/frames"])):
        tokens = TENSORS[f"{case}/{j}/tokens"]
        prev = tokens[:-2].copy()
        prev[0] = -1
        yield j, TENSORS[f"{case}/{j}/body"].tobytes(), (tokens[1:-1], prev, tokens[2:])


def test_the_fixture_covers_what_it_says():
    assert set(CASES) == {"fixed", "ragged", "k1_v16", "halving"}
    rows = TENSORS["halving/0/tokens"].size - 2
    assert rows * 64 * 1024 + TENSORS["halving/prior"].sum() > 1 << 29  # the weight table is halved


@pytest.mark.parametrize("case", CASES)
def test_stored_frames_decode_to_the_same_rows(case):
    coder = _coder(case)
    for j, body, context in _frames(case):
        assert rows_digest(*coder.decode(body, *context)) == META[f"{case}/{j}/decoded_sha256"], f"{case} frame {j}"


@pytest.mark.parametrize("case", CASES)
def test_the_decoded_rows_encode_to_the_stored_bytes(case):
    coder = _coder(case)
    for j, body, context in _frames(case):
        ids, levels, tail, counts = coder.decode(body, *context)
        again = coder.encode(ids, levels, tail, *context, counts)
        assert again == body, f"{case} frame {j}: the body differs from the stored one"


@pytest.mark.parametrize("case", CASES)
def test_the_batch_decoder_gives_the_same_rows(case):
    coder = _coder(case)
    frames = list(_frames(case))
    tag = _TAG["sqrt_ac_ragged" if coder.ragged else "sqrt_ac"]
    payload, frame_offsets, row_offsets = b"", [0], [0]
    contexts = [[], [], []]
    for _, body, context in frames:
        rows = context[0].size
        payload += _FRAME_HEADER.pack(tag, int(META[f"{case}/k"]), rows, len(body)) + body
        frame_offsets.append(len(payload))
        row_offsets.append(row_offsets[-1] + rows)
        for c, part in zip(contexts, context):
            c.append(part)
    ids, levels, tail, counts = coder.decode_frames(
        np.frombuffer(payload, np.uint8), tag, np.array(frame_offsets, np.int64), np.array(row_offsets, np.int64),
        *(np.concatenate(c).astype(np.int32) for c in contexts))
    for (j, _, _), a, b in zip(frames, row_offsets[:-1], row_offsets[1:]):
        part = (ids[a:b], levels[a:b], tail[a:b], None if counts is None else counts[a:b])
        assert rows_digest(*part) == META[f"{case}/{j}/decoded_sha256"], f"{case} frame {j}"


@pytest.mark.parametrize("case", CASES)
def test_dequantize_levels_matches_the_numpy_formula(case):
    log_level = np.concatenate([[-np.inf], 2 * np.log(np.arange(1, int(META["max_level"]) + 1, dtype=np.float64))])
    coder = _coder(case)
    for j, body, context in _frames(case):
        ids, levels, tail, _ = coder.decode(body, *context)
        squares = (levels.astype(np.int64) ** 2).sum(axis=1) + tail.astype(np.int64) ** 2
        want = (log_level[levels] - np.log(squares.astype(np.float64))[:, None]).astype(np.float32)
        got = _C.TopKCoder.dequantize_levels(levels, tail, log_level)
        assert got.dtype == np.float32 and np.array_equal(got, want), f"{case} frame {j}"


def test_dequantize_levels_rejects_levels_outside_the_table():
    log_level = np.zeros(4)
    with pytest.raises(ValueError, match="outside the table"):
        _C.TopKCoder.dequantize_levels(np.array([[1, 4]], np.int32), np.array([1], np.int32), log_level)
    with pytest.raises(ValueError, match="tail"):
        _C.TopKCoder.dequantize_levels(np.array([[1, 2]], np.int32), np.array([1, 1], np.int32), log_level)
