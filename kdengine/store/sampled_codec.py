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
FRAME_HEADER = struct.Struct("<2sHII")  # tag, K (most distinct ids in a row of the frame), P, body bytes
LOGP_STEP = 1.0 / 1024
_MAX_LEVEL = 65535  # -logp quantized to uint16: -64 nats is the floor


class SampledCodec:
    """Encodes and decodes one sample's sampled targets.

    k: the store's K, which for sampled targets is M (the most distinct ids a position can have).
    Params (the manifest's codec params): `samples` (M, draws per position, 1..255),
    `proposal_temperature` (tau > 0), `seed` (the dump's base seed), `zstd_level`.
    """

    name = "sampled"
    DEFAULTS = {"samples": 12, "proposal_temperature": 1.0, "seed": 0, "zstd_level": 3}
    TABLE = None  # no per-shard table
    learn_table = None

    def __init__(self, *, k: int, vocab_size: int, samples: int = 12, proposal_temperature: float = 1.0,
                 seed: int = 0, zstd_level: int = 3):
        if not (isinstance(samples, int) and 1 <= samples <= 255):
            raise ValueError(f"samples must be an int in [1, 255], got {samples!r}")
        if k != samples:
            raise ValueError(f"a sampled store's k is its samples per position ({samples}), got k = {k}")
        if not (isinstance(proposal_temperature, (int, float)) and 0 < proposal_temperature < float("inf")):
            raise ValueError(f"proposal_temperature must be a finite number > 0, got {proposal_temperature!r}")
        self.vocab_size, self.samples = int(vocab_size), samples
        self.proposal_temperature, self.seed, self.zstd_level = float(proposal_temperature), int(seed), int(zstd_level)
        self._id_dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
        self._zc = zstandard.ZstdCompressor(level=self.zstd_level)

    @property
    def params(self) -> dict:
        return {"samples": self.samples, "proposal_temperature": self.proposal_temperature, "seed": self.seed,
                "zstd_level": self.zstd_level}

    @property
    def has_log_norm(self) -> bool:
        return self.proposal_temperature != 1.0

    def encode(self, ids, counts, logp, log_norm) -> bytes:
        """ids, counts int [P, K], logp float [P, K] (slots with count 0 are padding), log_norm float [P]."""
        ids, counts, logp = np.asarray(ids), np.asarray(counts), np.asarray(logp)
        log_norm = np.asarray(log_norm, dtype=np.float32)
        n_pos = ids.shape[0]
        if ids.ndim != 2 or counts.shape != ids.shape or logp.shape != ids.shape or log_norm.shape != (n_pos,):
            raise ValueError(f"expected ids/counts/logp [P, K] and log_norm [P], got {ids.shape}, {counts.shape}, "
                             f"{logp.shape}, {log_norm.shape}")
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
        first = np.zeros_like(drawn_s)
        first[:, 0] = True
        prev = np.concatenate([np.zeros((n_pos, 1), np.int64), ids_s[:, :-1]], axis=1)
        gaps = np.where(first, ids_s, ids_s - prev - 1)[drawn_s]  # ascending and distinct: gaps >= 0
        if gaps.size and gaps.min() < 0:
            raise ValueError("sampled ids must be distinct within a position")
        lp = logp_s[drawn_s].astype(np.float64)
        if lp.size and (np.isnan(lp).any() or lp.max() > 1e-3):
            raise ValueError(f"sampled log-probs must be <= 0 and not NaN, got max {lp.max()}")
        levels = np.clip(np.rint(-np.minimum(lp, 0) / LOGP_STEP), 0, _MAX_LEVEL).astype("<u2")
        streams = [distinct.astype(np.uint8).tobytes(), _planes(gaps.astype(self._id_dtype)),
                   (counts_s[drawn_s] - 1).astype(np.uint8).tobytes(), _planes(levels)]
        if self.has_log_norm:
            streams.append(log_norm.astype("<f4").tobytes())
        body = self._zc.compress(b"".join(streams))
        k = ids_s.shape[1]
        return FRAME_HEADER.pack(TAG, k, n_pos, len(body)) + body

    def decode(self, frame):
        """frame -> (ids int32 [P, K], counts int32 [P, K], logp float32 [P, K], log_norm float32 [P]);
        rows ascending by id, padding slots 0 / 0 / 0. Raises CodecError on a malformed frame."""
        frame = memoryview(frame).cast("B")
        if len(frame) < FRAME_HEADER.size:
            raise CodecError(f"frame is {len(frame)} bytes, shorter than its {FRAME_HEADER.size}-byte header")
        tag, k, n_pos, body_len = FRAME_HEADER.unpack_from(frame)
        if tag != TAG:
            raise CodecError(f"frame tag {bytes(tag)!r} is not the 'sampled' codec's {TAG!r}")
        if FRAME_HEADER.size + body_len != len(frame):
            raise CodecError(f"frame is {len(frame)} bytes, its header says {FRAME_HEADER.size + body_len}")
        try:
            raw = zstandard.ZstdDecompressor().decompress(bytes(frame[FRAME_HEADER.size:]))
        except zstandard.ZstdError as exc:
            raise CodecError(f"frame body does not decompress ({exc})") from None
        data = np.frombuffer(raw, np.uint8)
        distinct = data[:n_pos].astype(np.int64)
        if distinct.size != n_pos or (n_pos and (distinct.min() < 1 or distinct.max() != k)):
            raise CodecError(f"frame's distinct-id counts do not match P = {n_pos}, K = {k}")
        total = int(distinct.sum())
        isz = self._id_dtype.itemsize
        need = n_pos + total * (isz + 1 + 2) + (4 * n_pos if self.has_log_norm else 0)
        if data.size != need:
            raise CodecError(f"frame body is {data.size} bytes, {need} expected for {total} ids")
        off = n_pos
        gaps = _unplanes(data[off:off + total * isz], self._id_dtype).astype(np.int64)
        off += total * isz
        cnt = data[off:off + total].astype(np.int32) + 1
        off += total
        levels = _unplanes(data[off:off + 2 * total], np.dtype("<u2"))
        off += 2 * total
        log_norm = (data[off:off + 4 * n_pos].view("<f4").astype(np.float32) if self.has_log_norm
                    else np.zeros(n_pos, np.float32))
        slot = np.arange(k)[None, :] < distinct[:, None]
        g = np.zeros((n_pos, k), np.int64)
        g[slot] = gaps
        first_col = np.zeros((n_pos, k), np.int64)
        first_col[:, 0] = 1
        ids = np.cumsum(g + (1 - first_col), axis=1) * slot  # id_j = id_{j-1} + gap + 1
        if ids.size and ids.max() >= self.vocab_size:
            raise CodecError(f"frame decodes ids outside [0, {self.vocab_size})")
        counts = np.zeros((n_pos, k), np.int32)
        counts[slot] = cnt
        if n_pos and (counts.sum(axis=1) != self.samples).any():
            raise CodecError(f"frame's counts do not sum to samples = {self.samples} per position")
        logp = np.zeros((n_pos, k), np.float32)
        logp[slot] = -levels.astype(np.float32) * np.float32(LOGP_STEP)
        return ids.astype(np.int32), counts, logp, log_norm


def _planes(a: np.ndarray) -> bytes:
    """Little-endian values as byte planes (all low bytes, then the next...): zstd sees runs of alike bytes."""
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T).tobytes()


def _unplanes(b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(b.reshape(dtype.itemsize, -1).T).view(dtype).reshape(-1)
