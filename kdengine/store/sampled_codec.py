"""The `sampled` codec: per-sample frames of sampled teacher targets (RS-KD).

Per position the dump drew M ids from the teacher's distribution tempered by tau (the proposal) and
keeps the distinct ids (ascending) with their counts and the teacher's log-probability at T = 1;
with tau != 1 also ln sum_v p_v^(1/tau), the proposal's normaliser, so that the loss can form
log r = logp / tau - log_norm (see kdengine/sampling.py and kdengine/losses/sampled_reference.py).
Ids and counts are exact; log-probs are quantized to a step of 1/1024 nats (|error| <= 1/2048 nats;
they enter the estimator's importance weight exp(log p^T - log r) and its loss value, not the
counts). Byte layout: store/FORMAT.md, "`sampled`".
"""
from __future__ import annotations

import struct

import numpy as np
import zstandard

from .codec import CodecError

TAG = b"S1"
HEAD_TAG = b"S2"  # frames of a store with an exact head (exact_top > 0)
FRAME_HEADER = struct.Struct("<2sHII")  # tag, K (most distinct ids in a row of the frame), P, body bytes
LOGP_STEP = 1.0 / 1024
_MAX_LEVEL = 65535  # -logp quantized to uint16: -64 nats is the floor


class SampledCodec:
    """Encodes and decodes one sample's sampled targets.

    k: the store's K, the most slots a position can have: M, plus H with an exact head.
    Params (the manifest's codec params): `samples` (M, draws per position, 1..255),
    `proposal_temperature` (tau > 0), `seed` (the dump's base seed), `zstd_level`, and, only when
    H > 0, `exact_top` (H, the teacher's most likely ids kept exactly; needs tau = 1; frames `S2`).
    """

    name = "sampled"
    DEFAULTS = {"samples": 12, "proposal_temperature": 1.0, "seed": 0, "zstd_level": 3, "exact_top": 0}
    TABLE = None  # no per-shard table
    learn_table = None

    def __init__(self, *, k: int, vocab_size: int, samples: int = 12, proposal_temperature: float = 1.0,
                 seed: int = 0, zstd_level: int = 3, exact_top: int = 0):
        if not (isinstance(samples, int) and 1 <= samples <= 255):
            raise ValueError(f"samples must be an int in [1, 255], got {samples!r}")
        if not (isinstance(exact_top, int) and 0 <= exact_top <= 255):
            raise ValueError(f"exact_top must be an int in [0, 255], got {exact_top!r}")
        if k != samples + exact_top:
            raise ValueError(f"a sampled store's k is its samples per position ({samples}) plus its exact head "
                             f"({exact_top}), got k = {k}")
        if not (isinstance(proposal_temperature, (int, float)) and 0 < proposal_temperature < float("inf")):
            raise ValueError(f"proposal_temperature must be a finite number > 0, got {proposal_temperature!r}")
        if exact_top and proposal_temperature != 1:
            raise ValueError(f"an exact head (exact_top {exact_top}) needs proposal_temperature 1, "
                             f"got {proposal_temperature}")
        self.vocab_size, self.samples, self.exact_top = int(vocab_size), samples, exact_top
        self.proposal_temperature, self.seed, self.zstd_level = float(proposal_temperature), int(seed), int(zstd_level)
        self._id_dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
        self._zc = zstandard.ZstdCompressor(level=self.zstd_level)

    @property
    def params(self) -> dict:
        params = {"samples": self.samples, "proposal_temperature": self.proposal_temperature, "seed": self.seed,
                  "zstd_level": self.zstd_level}
        return {**params, "exact_top": self.exact_top} if self.exact_top else params

    @property
    def has_log_norm(self) -> bool:
        return self.proposal_temperature != 1.0 or self.exact_top > 0

    def encode(self, ids, counts, logp, log_norm) -> bytes:
        """ids, counts int [P, K], logp float [P, K] (slots with count 0 are padding), log_norm float [P].
        With an exact head of H ids, slots [0, H) are the head (count 1 each) and the draws follow."""
        ids, counts, logp = np.asarray(ids), np.asarray(counts), np.asarray(logp)
        log_norm = np.asarray(log_norm, dtype=np.float32)
        n_pos, h = ids.shape[0], self.exact_top
        if ids.ndim != 2 or counts.shape != ids.shape or logp.shape != ids.shape or log_norm.shape != (n_pos,):
            raise ValueError(f"expected ids/counts/logp [P, K] and log_norm [P], got {ids.shape}, {counts.shape}, "
                             f"{logp.shape}, {log_norm.shape}")
        if ids.shape[1] <= h and n_pos:
            raise ValueError(f"expected the exact head's {h} slots and at least one drawn slot, got K = {ids.shape[1]}")
        streams: list[bytes] = []
        if h:
            if (counts[:, :h] != 1).any():
                raise ValueError(f"the exact head's {h} slots must each have count 1")
            head = ids[:, :h].astype(np.int64)
            if head.size and (head.min() < 0 or head.max() >= self.vocab_size):
                raise ValueError(f"the exact head's ids must be in [0, {self.vocab_size})")
            if n_pos and (np.diff(head, axis=1) <= 0).any():
                raise ValueError("the exact head's ids must be distinct and ascending")
            tail_ids = np.where(counts[:, h:] > 0, ids[:, h:], -1)
            if (tail_ids[:, :, None] == head[:, None, :]).any():
                raise ValueError("a drawn id repeats one of the exact head's ids")
            streams += [_planes(_gaps(head, np.ones_like(head, dtype=bool)).astype(self._id_dtype)),
                        _planes(_levels(logp[:, :h]))]
            ids, counts, logp = ids[:, h:], counts[:, h:], logp[:, h:]
        streams += self._encode_draws(ids, counts, logp)
        if self.has_log_norm:
            streams.append(log_norm.astype("<f4").tobytes())
        body = self._zc.compress(b"".join(streams))
        k = h + max(int((counts > 0).sum(axis=1).max(initial=0)), 1)
        return FRAME_HEADER.pack(HEAD_TAG if h else TAG, k, n_pos, len(body)) + body

    def _encode_draws(self, ids, counts, logp) -> list[bytes]:
        n_pos = ids.shape[0]
        drawn = counts > 0
        distinct = drawn.sum(axis=1)
        if n_pos and (counts.sum(axis=1) != self.samples).any():
            raise ValueError(f"every position needs counts summing to samples = {self.samples}")
        sel_ids = ids[drawn].astype(np.int64)  # row-major: each row's drawn slots in column order
        if sel_ids.size and (sel_ids.min() < 0 or sel_ids.max() >= self.vocab_size):
            raise ValueError(f"sampled ids must be in [0, {self.vocab_size})")
        ids = ids.astype(np.int64)
        order = np.argsort(np.where(drawn, ids, np.iinfo(np.int64).max), axis=1, kind="stable")
        ids_s, counts_s, logp_s = (np.take_along_axis(a, order, 1)[:, :max(int(distinct.max(initial=0)), 1)]
                                   for a in (ids, counts, logp))
        drawn_s = counts_s > 0
        gaps = _gaps(ids_s, drawn_s)
        if gaps.size and gaps.min() < 0:
            raise ValueError("sampled ids must be distinct within a position")
        return [distinct.astype(np.uint8).tobytes(), _planes(gaps.astype(self._id_dtype)),
                (counts_s[drawn_s] - 1).astype(np.uint8).tobytes(), _planes(_levels(logp_s[drawn_s]))]

    def decode(self, frame):
        """frame -> (ids int32 [P, K], counts int32 [P, K], logp float32 [P, K], log_norm float32 [P]);
        the exact head first (slots [0, H), ascending, count 1), then the drawn ids ascending, padded
        with 0 / 0 / 0. Raises CodecError on a malformed frame."""
        frame = memoryview(frame).cast("B")
        if len(frame) < FRAME_HEADER.size:
            raise CodecError(f"frame is {len(frame)} bytes, shorter than its {FRAME_HEADER.size}-byte header")
        tag, k, n_pos, body_len = FRAME_HEADER.unpack_from(frame)
        expected_tag = HEAD_TAG if self.exact_top else TAG
        if tag != expected_tag:
            raise CodecError(f"frame tag {bytes(tag)!r} is not the 'sampled' codec's {expected_tag!r} "
                             f"(for exact_top {self.exact_top})")
        if FRAME_HEADER.size + body_len != len(frame):
            raise CodecError(f"frame is {len(frame)} bytes, its header says {FRAME_HEADER.size + body_len}")
        try:
            raw = zstandard.ZstdDecompressor().decompress(bytes(frame[FRAME_HEADER.size:]))
        except zstandard.ZstdError as exc:
            raise CodecError(f"frame body does not decompress ({exc})") from None
        data = np.frombuffer(raw, np.uint8)
        h, isz = self.exact_top, self._id_dtype.itemsize
        if k <= h:
            raise CodecError(f"frame's K = {k} leaves no drawn slot after the exact head's {h}")
        head_bytes = n_pos * h * (isz + 2)
        if data.size < head_bytes + n_pos:
            raise CodecError(f"frame body is {data.size} bytes, too short for {n_pos} positions")
        parts = []
        if h:
            head_gaps = _unplanes(data[:n_pos * h * isz], self._id_dtype).astype(np.int64).reshape(n_pos, h)
            levels = _unplanes(data[n_pos * h * isz:head_bytes], np.dtype("<u2")).reshape(n_pos, h)
            head_ids = np.cumsum(head_gaps + np.concatenate([np.zeros((n_pos, 1), np.int64),
                                                             np.ones((n_pos, h - 1), np.int64)], axis=1), axis=1)
            parts.append((head_ids, np.ones((n_pos, h), np.int32), -levels.astype(np.float32) * np.float32(LOGP_STEP)))
        ids, counts, logp, off = self._decode_draws(data, head_bytes, n_pos, k - h)
        parts.append((ids, counts, logp))
        log_norm = (data[off:off + 4 * n_pos].view("<f4").astype(np.float32) if self.has_log_norm
                    else np.zeros(n_pos, np.float32))
        if data.size != off + (4 * n_pos if self.has_log_norm else 0):
            raise CodecError(f"frame body is {data.size} bytes, {off + 4 * n_pos * self.has_log_norm} expected")
        ids, counts, logp = (np.concatenate(a, axis=1) for a in zip(*parts))
        if ids.size and ids.max() >= self.vocab_size:
            raise CodecError(f"frame decodes ids outside [0, {self.vocab_size})")
        if h and n_pos and ((ids[:, :h, None] == np.where(counts[:, h:] > 0, ids[:, h:], -1)[:, None, :]).any()
                            or (np.diff(ids[:, :h], axis=1) <= 0).any()):
            raise CodecError("frame's exact head repeats an id")
        return ids.astype(np.int32), counts.astype(np.int32), logp.astype(np.float32), log_norm

    def _decode_draws(self, data, off: int, n_pos: int, k: int):
        distinct = data[off:off + n_pos].astype(np.int64)
        if distinct.size != n_pos or (n_pos and (distinct.min() < 1 or distinct.max() != k)):
            raise CodecError(f"frame's distinct-id counts do not match P = {n_pos}, K = {k}")
        total = int(distinct.sum())
        isz = self._id_dtype.itemsize
        off += n_pos
        if data.size < off + total * (isz + 1 + 2):
            raise CodecError(f"frame body is {data.size} bytes, too short for {total} drawn ids")
        gaps = _unplanes(data[off:off + total * isz], self._id_dtype).astype(np.int64)
        off += total * isz
        cnt = data[off:off + total].astype(np.int32) + 1
        off += total
        levels = _unplanes(data[off:off + 2 * total], np.dtype("<u2"))
        off += 2 * total
        slot = np.arange(k)[None, :] < distinct[:, None]
        g = np.zeros((n_pos, k), np.int64)
        g[slot] = gaps
        first_col = np.zeros((n_pos, k), np.int64)
        first_col[:, 0] = 1
        ids = np.cumsum(g + (1 - first_col), axis=1) * slot  # id_j = id_{j-1} + gap + 1
        counts = np.zeros((n_pos, k), np.int32)
        counts[slot] = cnt
        if n_pos and (counts.sum(axis=1) != self.samples).any():
            raise CodecError(f"frame's counts do not sum to samples = {self.samples} per position")
        logp = np.zeros((n_pos, k), np.float32)
        logp[slot] = -levels.astype(np.float32) * np.float32(LOGP_STEP)
        return ids, counts, logp, off


def _gaps(ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row, the valid ids (ascending, leading) as the first id then `id_j - id_{j-1} - 1`."""
    first = np.zeros_like(valid)
    first[:, 0] = True
    prev = np.concatenate([np.zeros((ids.shape[0], 1), np.int64), ids[:, :-1]], axis=1)
    return np.where(first, ids, ids - prev - 1)[valid]


def _levels(logp: np.ndarray) -> np.ndarray:
    """Log-probs as uint16 levels of LOGP_STEP below 0; refuses NaN and positive values."""
    lp = np.asarray(logp, dtype=np.float64)
    if lp.size and (np.isnan(lp).any() or lp.max() > 1e-3):
        raise ValueError(f"sampled log-probs must be <= 0 and not NaN, got max {lp.max()}")
    return np.clip(np.rint(-np.minimum(lp, 0) / LOGP_STEP), 0, _MAX_LEVEL).astype("<u2").reshape(-1)


def _planes(a: np.ndarray) -> bytes:
    """Little-endian values as byte planes (all low bytes, then the next...): zstd sees runs of alike bytes."""
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T).tobytes()


def _unplanes(b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(b.reshape(dtype.itemsize, -1).T).view(dtype).reshape(-1)
