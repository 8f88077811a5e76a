"""Per-sample codecs for the teacher's top-k: ids exact, log-probabilities quantized with a stated bound.

A frame holds one sample's targets (P positions x K entries) and decodes on its own, given the
sample's input_ids and target positions (which the shard stores next to it). The byte layout is
specified in store/FORMAT.md; scripts/bench_codec.py measures the variants that were tried.

Values (`sqrt_ac` and `sqrt`). Each position is K+1 buckets: the K entries and the tail (teacher mass
outside the top-k). Each bucket is quantized in square-root-probability space:
level = clamp(round(sqrt(p) / delta), 1, ceil(1 / delta)). KL(p || q) ~ sum (sqrt(p) - sqrt(q))^2 * 2
whatever p is, so a uniform step in sqrt(p) spends the error budget evenly: mean KL ~ (K+1) delta^2 / 6
(9.0e-6 nats at K=64, delta=1/1100), and tiny entries cost few bits. Decoding squares the levels and
renormalizes the K+1 buckets, so sum(exp(topk_logp)) < 1 and the tail 1 - sum is never negative.
Bound, for every entry and the tail: |sqrt(p_decoded) - sqrt(p_true)| <= delta * (1 + sqrt(K+1))
(`sqrt_prob_error_bound`): delta for rounding (delta/2) or the clamp of entries below (delta/2)^2 to
level 1, plus the worst case of the renormalization, which rescales every sqrt(p) by at most
delta*sqrt(K+1) relative (in practice about delta/10). Entries come out sorted by level descending;
among equal levels by id (`sqrt_ac`) or by vocabulary rank (`sqrt`).

`sqrt_ac` (the default) codes the levels and ids with adaptive context models and rANS, in C++
(csrc/topk_codec.cpp, through kdengine._C): the levels as steps down from the largest (context: the
level above and the column), the tail level as a residual from the normalization, and each run of
equal levels as a set of ids drawn from a weight table over the vocabulary that starts, in every
frame, from the shard's learned id frequencies (`id_prior`) and adapts to the sample: ids seen
earlier in the frame, ids of the rows with the same input token, the same two input tokens, and the
row before, and the true next token get more weight. About 87 payload B/position at K=64 (15% below
`sqrt`); the whole store ~90 (scripts/results/codec.md).

`sqrt` codes the same levels as byte streams for zstd's Huffman stage: ids as gaps in a learned
vocabulary order (`vocab_order`), split into a bucket symbol and raw low bits; level steps; per
column group. About 102 payload B/position at K=64. Pure Python + zstd.

`raw`: int32 ids and float32 log-probs as given, zstd level 1 (lossless, about 4x larger).
"""
from __future__ import annotations

import functools
import struct

import numpy as np
import zstandard

_FRAME_HEADER = struct.Struct("<2sHII")  # codec tag, K, positions P, body bytes
_TAG = {"sqrt_ac": b"A1", "sqrt": b"Q1", "raw": b"R1", "sqrt_ac_ragged": b"A2"}  # A2: sqrt_ac, adaptive K
_CODECS = ("sqrt_ac", "sqrt", "raw")
_COLUMN_GROUPS = (0, 1, 4, 16)  # `sqrt`: starts of the column groups; the last one runs to K
_NIBBLE_FROM = 16  # `sqrt`: level steps in columns >= this are small: two per byte
_ID_SUB, _HEAD_SUB = 2, 3  # `sqrt`: leading mantissa bits kept in the bucket symbol
DEFAULT_CODEC = "sqrt_ac"
SAMPLED_CODEC = "sampled"  # `--targets sample` stores: kdengine/store/sampled_codec.py
_EXTENSION_HINT = "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"


class CodecError(ValueError):
    """A frame that does not decode: corrupt, truncated, or written with different parameters."""


def codec_names() -> tuple[str, ...]:
    return _CODECS


def default_params(name: str) -> dict:
    """The parameters a new store records for codec `name` (the manifest's codec params)."""
    return dict(_codec_class(name).DEFAULTS)


def shard_table_name(name: str) -> str | None:
    """The per-shard tensor codec `name` learns and needs ('id_prior', 'vocab_order'), or None."""
    return _codec_class(name).TABLE


def stored_table(name: str) -> tuple[str, str] | None:
    """Format v2: (tensor name, dtype) of the per-shard table codec `name` stores, or None. `sqrt_ac`
    stores its id counts as one-byte codes (`count_codes`), from which the id prior follows;
    `sqrt` its vocabulary order."""
    return {"sqrt_ac": ("id_count_codes", "uint8"), "sqrt": ("vocab_order", "int32")}.get(name)


def learn_stored_table(name: str, topk_idx: np.ndarray, vocab_size: int) -> np.ndarray | None:
    """Format v2: the table codec `name` stores for a shard, learned from the ids of its first
    positions; `table_from_stored` turns it into the codec's table."""
    if name == "sqrt_ac":
        return count_codes(_id_counts(topk_idx, vocab_size))
    return learn_shard_table(name, topk_idx, vocab_size)


def table_from_stored(name: str, stored: np.ndarray) -> np.ndarray:
    """The codec's table (`make_codec(table=...)`) from what a v2 shard stores (`stored_table`)."""
    if name == "sqrt_ac":
        return id_prior_from_counts(counts_from_codes(stored))
    return stored


# sqrt_ac's count codes: q = c for c < 16, else q = 16 + 8 e + i for c in [M_i 2^e, M_(i+1) 2^e), decoded to
# M_i 2^e: counts to within 1/16 relative, in one byte (FORMAT.md, "sqrt_ac").
_CODE_MANTISSA = np.array([16, 17, 19, 21, 22, 24, 26, 29], np.int64)  # ~ 16 * 2^(i/8)
_CODE_VALUES = np.concatenate([np.arange(16), (_CODE_MANTISSA[None, :] << np.arange(30)[:, None]).ravel()])[:256]


def count_codes(counts: np.ndarray) -> np.ndarray:
    """uint8 codes of non-negative counts (largest code value not above the count)."""
    codes = np.searchsorted(_CODE_VALUES, np.asarray(counts, np.int64), side="right") - 1
    return codes.astype(np.uint8)


def counts_from_codes(codes: np.ndarray) -> np.ndarray:
    return _CODE_VALUES[np.asarray(codes, np.int64)]


def learn_shard_table(name: str, topk_idx: np.ndarray, vocab_size: int) -> np.ndarray | None:
    """The per-shard table of codec `name`, learned from the ids of a shard's first positions
    (int [..., K]); None for a codec without one."""
    learn = _codec_class(name).learn_table
    return None if learn is None else learn(topk_idx, vocab_size)


def codec_unavailable(name: str) -> str | None:
    """Why codec `name` cannot run in this installation (its compiled part is missing), or None."""
    if name != "sqrt_ac":
        return None
    try:
        _coder_class()
    except ValueError as exc:
        return str(exc)
    return None


def make_codec(name: str, *, k: int, vocab_size: int, table: np.ndarray | None = None, ragged: bool = False,
               **params):
    """Builds a codec by name ('sqrt_ac', 'sqrt' or 'raw').

    Args:
        name: codec name.
        k: entries per position (K).
        vocab_size: V; every id must be in [0, V).
        table: the codec's per-shard table (`shard_table_name`): int32 [V] id_prior for 'sqrt_ac'
            (flat if None), int32 [V] vocab_order for 'sqrt' (identity if None); None for 'raw'.
        ragged: rows hold a variable number of entries (1..K, adaptive K); only 'sqrt_ac' codes them.
        params: codec parameters as stored in the manifest (`codec.params()`), e.g. delta.
    Raises:
        ValueError: unknown name or parameter, a bad table, ragged rows for a codec without them, or
            (for 'sqrt_ac') no compiled extension.
    """
    cls = _codec_class(name)
    if ragged and name != "sqrt_ac":
        raise ValueError(f"codec {name!r} stores K entries per row; adaptive K (--top-p) needs codec 'sqrt_ac'")
    unknown = set(params) - set(cls.DEFAULTS)
    if unknown:
        takes = ", ".join(cls.DEFAULTS) or "no parameters"
        raise ValueError(f"codec {name!r} has no parameter(s) {sorted(unknown)}; it takes {takes}")
    if cls.TABLE is None:
        if table is not None:
            raise ValueError(f"codec {name!r} takes no per-shard table")
        return cls(k=k, vocab_size=vocab_size, **params)
    if name == "sqrt_ac":
        return cls(k=k, vocab_size=vocab_size, table=table, ragged=ragged, **params)
    return cls(k=k, vocab_size=vocab_size, table=table, **params)


def _codec_class(name: str):
    if name == SAMPLED_CODEC:  # the codec of sampled-target stores (its own module)
        from kdengine.store.sampled_codec import SampledCodec

        return SampledCodec
    codecs = {"sqrt_ac": SqrtAcCodec, "sqrt": SqrtCodec, "raw": RawCodec}
    if name not in codecs:
        raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(codec_names())}")
    return codecs[name]


def learn_vocab_order(topk_idx: np.ndarray, vocab_size: int) -> np.ndarray:
    """Rank -> id, most frequent top-k id first; ids never seen keep their tokenizer order (BPE ids
    are roughly frequency-ordered already).

    Args:
        topk_idx: int [..., K] ids from the first batches of a shard.
    Returns:
        int32 [V], a permutation of range(V).
    """
    return np.argsort(-_id_counts(topk_idx, vocab_size), kind="stable").astype(np.int32)


def learn_id_prior(topk_idx: np.ndarray, vocab_size: int) -> np.ndarray:
    """The `sqrt_ac` weight of each id before a frame starts: proportional to (count + 1/2) over the
    top-k ids of a shard's first positions, scaled to a total of about 2^22, at least 1.

    Args:
        topk_idx: int [..., K] ids from the first batches of a shard.
    Returns:
        int32 [V], each in [1, 2^22], summing to at most 2^22 + V.
    """
    return id_prior_from_counts(_id_counts(topk_idx, vocab_size))


def id_prior_from_counts(counts: np.ndarray) -> np.ndarray:
    """max(1, floor((2 c_i + 1) 2^22 / (2 C + V))), C = sum of the counts c_i (int32 [V])."""
    counts = np.asarray(counts, np.int64)
    scaled = (2 * counts + 1) * (1 << 22) // (2 * int(counts.sum()) + counts.size)
    return np.maximum(scaled, 1).astype(np.int32)


def _id_counts(topk_idx, vocab_size):
    counts = np.bincount(np.asarray(topk_idx, dtype=np.int64).ravel(), minlength=vocab_size)
    if counts.shape[0] != vocab_size:
        raise ValueError(f"top-k ids reach {counts.shape[0] - 1}, outside the vocabulary of {vocab_size}")
    return counts


class RawCodec:
    """Lossless: int32 ids + float32 log-probs, zstd level 1. The sample's tokens are not used."""

    name = "raw"
    DEFAULTS: dict = {}
    TABLE = None
    learn_table = None
    table = None

    def __init__(self, *, k: int, vocab_size: int):
        self.k, self.vocab_size = k, vocab_size
        self._zc = zstandard.ZstdCompressor(level=1, write_checksum=False)
        self._zd = zstandard.ZstdDecompressor()

    def params(self) -> dict:
        return {}

    def encode(self, topk_idx, topk_logp, input_ids=None, positions=None, counts=None):
        _no_counts(self.name, counts)
        idx, logp = _check_inputs(topk_idx, topk_logp, self.k, self.vocab_size)
        body = self._zc.compress(idx.astype("<i4").tobytes() + logp.astype("<f4").tobytes())
        return _pack_frame("raw", idx.shape[0], self.k, body)

    def decode(self, frame, input_ids=None, positions=None):
        n_pos, k, body, _ = _unpack_frame("raw", frame, self.k)
        try:
            data = self._zd.decompress(body, max_output_size=8 * n_pos * k)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd body does not decompress: {exc}") from None
        if len(data) != 8 * n_pos * k:
            raise CodecError(f"expected {8 * n_pos * k} decompressed bytes, got {len(data)}")
        idx = np.frombuffer(data, "<i4", n_pos * k).reshape(n_pos, k).astype(np.int32)
        logp = np.frombuffer(data, "<f4", n_pos * k, offset=4 * n_pos * k).reshape(n_pos, k).astype(np.float32)
        return idx, logp


class SqrtCodec:
    """Square-root-probability levels, rank-coded ids, zstd byte streams (see the module docstring).
    The sample's tokens are not used."""

    name = "sqrt"
    DEFAULTS = {"delta": 1 / 1100, "zstd_level": 1}
    TABLE = "vocab_order"
    learn_table = staticmethod(learn_vocab_order)

    def __init__(self, *, k: int, vocab_size: int, delta: float = 1 / 1100, zstd_level: int = 1,
                 table: np.ndarray | None = None):
        self.k, self.vocab_size, self.delta, self.zstd_level = k, vocab_size, _check_delta(delta), int(zstd_level)
        self.max_level = int(np.ceil(1 / self.delta))
        self._escape_bits = int(self.max_level).bit_length()
        vocab_order = np.arange(vocab_size, dtype=np.int32) if table is None else np.asarray(table)
        if vocab_order.shape != (vocab_size,) or not np.array_equal(np.sort(vocab_order), np.arange(vocab_size)):
            raise ValueError(f"vocab_order must be a permutation of range({vocab_size})")
        self.vocab_order = vocab_order.astype(np.int32)
        self._rank = np.empty(vocab_size, np.int64)
        self._rank[self.vocab_order] = np.arange(vocab_size)
        self._groups = [(a, min(b, k)) for a, b in zip(_COLUMN_GROUPS, _COLUMN_GROUPS[1:] + (k,)) if a < k]
        params = zstandard.ZstdCompressionParameters.from_level(
            self.zstd_level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_checksum=0, write_dict_id=0)
        self._zc = zstandard.ZstdCompressor(compression_params=params)
        self._zd = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        scaled = np.arange(self.max_level + 1).astype(np.float64) * self.delta  # level 0 is never decoded
        self._square_of_level = scaled * scaled
        with np.errstate(divide="ignore"):
            self._two_log_of_level = 2.0 * np.log(scaled)

    @property
    def table(self) -> np.ndarray:
        return self.vocab_order

    def params(self) -> dict:
        return {"delta": self.delta, "zstd_level": self.zstd_level}

    @property
    def sqrt_prob_error_bound(self) -> float:
        """Max |sqrt(p_decoded) - sqrt(p_true)| over stored entries and the tail (worst case)."""
        return self.delta * (1.0 + np.sqrt(self.k + 1))

    def _predicted_tail_level(self, level):
        """round(sqrt(ceil(1/delta)^2 - sum of squared levels)), from integers: encoder and decoder agree."""
        room = self.max_level ** 2 - (level * level).sum(axis=1)
        return np.rint(np.sqrt(np.maximum(room, 0).astype(np.float64))).astype(np.int64)

    # ---- encode -------------------------------------------------------------------------------
    def encode(self, topk_idx, topk_logp, input_ids=None, positions=None, counts=None) -> bytes:
        """Encodes one sample.

        Args:
            topk_idx: int [P, K] ids, each row sorted by descending probability.
            topk_logp: float [P, K] full-vocab log-probs (natural log) of those ids.
            input_ids, positions: the sample's tokens and target positions (not used by this codec).
            counts: must be None (fixed K).
        Returns:
            the frame (bytes).
        Raises:
            ValueError: wrong shapes, ids outside [0, V), or NaN/positive log-probs.
        """
        _no_counts(self.name, counts)
        idx, logp = _check_inputs(topk_idx, topk_logp, self.k, self.vocab_size)
        n_pos, k = idx.shape
        level, tail_level = _sqrt_levels(logp, self.delta, self.max_level)
        rank = self._rank[idx]
        encoder = _sqrt_streams_encoder()
        if encoder is None:
            streams, bits = self.encode_streams(level, rank, tail_level)
        else:
            streams, bits = encoder(level.astype(np.int32), rank.astype(np.int32), tail_level.astype(np.int32),
                                    self._escape_bits, self.max_level)
        return _pack_frame("sqrt", n_pos, k, self._compress(streams), bits)

    def encode_streams(self, level, rank, tail_level):
        """The reference (numpy) integer encode: levels and id ranks [P, K] (any order in a row), tail
        levels [P] -> (the symbol streams as a list of bytes, each its own zstd block; the low bits).
        `encode` uses csrc/sqrt_streams.cpp instead when the extension is built; both give the same bytes."""
        n_pos, k = level.shape
        order = np.argsort(-level * self.vocab_size + rank, axis=1, kind="stable")
        level = np.take_along_axis(level, order, 1)
        rank = np.take_along_axis(rank, order, 1)

        step = level[:, :-1] - level[:, 1:]  # >= 0
        tie_start = np.ones((n_pos, k), bool)
        tie_start[:, 1:] = step > 0
        value = rank.copy()
        value[:, 1:] = np.where(tie_start[:, 1:], rank[:, 1:], rank[:, 1:] - rank[:, :-1] - 1)

        # Heads: the smallest level (the steps give the others), and the tail level as its difference
        # from what normalization predicts (sum of all K+1 squared levels ~ 1/delta^2).
        tail_residual = tail_level - self._predicted_tail_level(level)
        heads = np.stack([level[:, -1] - 1, np.where(tail_residual >= 0, 2 * tail_residual, -2 * tail_residual - 1)], 1)
        streams, fields = [], []
        sym, nbits, low = _bucket(heads.ravel(), _HEAD_SUB)
        streams.append(sym)
        fields.append((low, nbits))
        for lo, hi in self._groups:
            if hi - max(lo, 1) > 0:
                s = step[:, max(lo, 1) - 1:hi - 1]
                if lo >= _NIBBLE_FROM:
                    capped = np.minimum(s, 15)
                    if capped.shape[1] % 2:
                        capped = np.concatenate([capped, np.zeros((n_pos, 1), np.int64)], 1)
                    streams.append(capped[:, 0::2] * 16 + capped[:, 1::2])
                    esc = s[s >= 15] - 15
                else:
                    streams.append(np.minimum(s, 255))
                    esc = s[s >= 255] - 255
                fields.append((esc, np.full(esc.shape, self._escape_bits)))
            for mask in (tie_start[:, lo:hi], ~tie_start[:, lo:hi]):
                sym, nbits, low = _bucket(value[:, lo:hi][mask], _ID_SUB)
                streams.append(sym)
                fields.append((low, nbits))

        bits = _pack_bits(np.concatenate([f[0] for f in fields]), np.concatenate([f[1] for f in fields]))
        return [s.astype(np.uint8).ravel().tobytes() for s in streams], bits

    def _compress(self, chunks: list[bytes]) -> bytes:
        obj = self._zc.compressobj(size=sum(len(c) for c in chunks))
        out = []
        for c in chunks:
            out.append(obj.compress(c))
            out.append(obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        out.append(obj.flush())
        return b"".join(out)

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, frame, input_ids=None, positions=None):
        """Decodes one sample's frame.

        Args:
            frame: bytes-like, as returned by `encode`.
            input_ids, positions: the sample's tokens and target positions (not used by this codec).
        Returns:
            (idx int32 [P, K], logp float32 [P, K]) sorted by descending probability.
        Raises:
            CodecError: the frame is corrupt, truncated, or was written with another K.
        """
        n_pos, k, body, bits = _unpack_frame("sqrt", frame, self.k)
        try:
            data = self._zd.decompress(body)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd body does not decompress: {exc}") from None
        decoder = _sqrt_streams_decoder()
        if decoder is None:
            ids, level, tail_level = self.decode_integers(data, bits, n_pos, k)
        else:
            try:
                ids, level, tail_level = decoder(data, bits, n_pos, k, self._escape_bits, self.max_level,
                                                 self.vocab_order)
            except _coder_error() as exc:
                raise CodecError(str(exc)) from None

        # logp = 2 log(level * delta) - log(sum (level * delta)^2 + (tail * delta)^2), each per-level
        # term looked up in a table of the same float64 operations on every level.
        log_z = np.log(self._square_of_level[level].sum(axis=1) + self._square_of_level[tail_level])
        logp = self._two_log_of_level[level] - log_z[:, None]
        return ids, logp.astype(np.float32)

    def decode_integers(self, data, bits, n_pos, k):
        """The reference (numpy) integer decode: decompressed streams + low bits -> (ids int32 [P, K],
        levels int64 [P, K], tail levels int64 [P]). `decode` uses csrc/sqrt_streams.cpp instead when the
        extension is built; the two give the same arrays and raise CodecError with the same messages."""
        reader = _ByteReader(np.frombuffer(data, np.uint8))
        # Pass 1: read every symbol stream; each part knows how many low bits its symbols carry.
        parts = []  # (kind, where, symbols, low-bit counts), in the encoder's order
        head_sym = reader.take(2 * n_pos)
        parts.append(("head", None, head_sym, _bucket_nbits(head_sym, _HEAD_SUB)))
        step = np.zeros((n_pos, max(k - 1, 0)), np.int64)
        for lo, hi in self._groups:
            a = max(lo, 1)
            if hi - a > 0:
                width = hi - a
                if lo >= _NIBBLE_FROM:
                    packed = reader.take(n_pos * ((width + 1) // 2)).reshape(n_pos, (width + 1) // 2).astype(np.int64)
                    s = np.stack([packed >> 4, packed & 15], 2).reshape(n_pos, -1)[:, :width]
                    cap = 15
                else:
                    s = reader.take(n_pos * width).reshape(n_pos, width).astype(np.int64)
                    cap = 255
                step[:, a - 1:hi - 1] = s
                escaped = s == cap
                parts.append(("escape", (a - 1, hi - 1, escaped, cap), None,
                              np.full(int(escaped.sum()), self._escape_bits)))
            tie_start = np.ones((n_pos, hi - lo), bool)
            if lo > 0:
                tie_start = step[:, lo - 1:hi - 1] > 0  # escaped steps are > 0 too
            for mask in (tie_start, ~tie_start):
                sym = reader.take(int(mask.sum()))
                parts.append(("id", (lo, hi, mask), sym, _bucket_nbits(sym, _ID_SUB)))
        if reader.remaining:
            raise CodecError(f"{reader.remaining} bytes left over after the last stream")

        # Pass 2: unpack all low bits at once and finish each part.
        low = _unpack_bits(bits, np.concatenate([part[3] for part in parts]))
        value = np.zeros((n_pos, k), np.int64)
        cursor = 0
        for kind, where, sym, nbits in parts:
            part_low = low[cursor:cursor + nbits.size]
            cursor += nbits.size
            if kind == "head":
                heads = _unbucket(sym, part_low, _HEAD_SUB).reshape(n_pos, 2)
            elif kind == "escape":
                c0, c1, escaped, cap = where
                block = step[:, c0:c1]
                block[escaped] = cap + part_low
            else:
                lo, hi, mask = where
                value[:, lo:hi][mask] = _unbucket(sym, part_low, _ID_SUB)

        level = np.empty((n_pos, k), np.int64)
        level[:, -1] = heads[:, 0] + 1
        if k > 1:
            level[:, :-1] = level[:, -1:] + np.cumsum(step[:, ::-1], axis=1)[:, ::-1]
        residual = np.where(heads[:, 1] % 2 == 0, heads[:, 1] // 2, -(heads[:, 1] + 1) // 2)
        tail_level = self._predicted_tail_level(level) + residual
        if n_pos and (level[:, 0].max() > self.max_level or level[:, -1].min() < 1 or tail_level.min() < 1
                      or tail_level.max() > self.max_level):
            raise CodecError("decoded levels fall outside [1, ceil(1/delta)]")
        tie_start = np.ones((n_pos, k), bool)
        tie_start[:, 1:] = step > 0

        rank = _undo_gaps(value, tie_start)
        if n_pos and rank.max() >= self.vocab_size:
            raise CodecError(f"a decoded rank is >= the vocabulary size {self.vocab_size}")
        if n_pos and rank.min() < 0:
            raise CodecError("a decoded rank is negative")
        return self.vocab_order[rank].astype(np.int32), level, tail_level


class SqrtAcCodec:
    """Square-root-probability levels, coded with adaptive context models and rANS in C++ (see the
    module docstring and FORMAT.md, "sqrt_ac"). Needs the compiled extension kdengine._C."""

    name = "sqrt_ac"
    DEFAULTS = {"delta": 1 / 1100}
    TABLE = "id_prior"
    learn_table = staticmethod(learn_id_prior)

    def __init__(self, *, k: int, vocab_size: int, delta: float = 1 / 1100, table: np.ndarray | None = None,
                 ragged: bool = False):
        if not 1 <= k <= 65535 or not k <= vocab_size <= 1 << 23:
            raise ValueError(f"codec 'sqrt_ac' needs 1 <= K <= 65535 and K <= V <= 2^23, got K={k}, V={vocab_size}")
        self.k, self.vocab_size, self.delta = k, vocab_size, _check_delta(delta)
        self.ragged = bool(ragged)
        self._tag = "sqrt_ac_ragged" if self.ragged else "sqrt_ac"
        self.max_level = int(np.ceil(1 / self.delta))
        prior = learn_id_prior(np.zeros(0, np.int64), vocab_size) if table is None else np.asarray(table)
        if (prior.shape != (vocab_size,) or not np.issubdtype(prior.dtype, np.integer) or prior.min() < 1
                or prior.max() > 1 << 23 or int(prior.sum(dtype=np.int64)) > 1 << 24):
            raise ValueError(f"id_prior must be {vocab_size} integer weights in [1, 2^23] summing to at most 2^24")
        self.id_prior = prior.astype(np.int32)
        self._coder = _coder_class()(k, vocab_size, self.max_level, self.id_prior.astype(np.uint32), self.ragged)
        self._log_level = np.concatenate([[-np.inf], 2 * np.log(np.arange(1, self.max_level + 1, dtype=np.float64))])

    @property
    def table(self) -> np.ndarray:
        return self.id_prior

    def params(self) -> dict:
        return {"delta": self.delta}

    @property
    def sqrt_prob_error_bound(self) -> float:
        """Max |sqrt(p_decoded) - sqrt(p_true)| over stored entries and the tail (worst case)."""
        return self.delta * (1.0 + np.sqrt(self.k + 1))

    def encode(self, topk_idx, topk_logp, input_ids, positions, counts=None, *, with_id_bits=False):
        """Encodes one sample.

        Args:
            topk_idx: int [P, K] ids, each row sorted by descending probability.
            topk_logp: float [P, K] full-vocab log-probs (natural log) of those ids.
            input_ids: int [T] the sample's tokens; positions: int [P] its target positions, each in
                [0, T-2] (the decoder is given the same two arrays).
            counts: ragged codecs only (and required): int [P], row r keeps its first counts[r]
                entries (1..K); the tail is the mass outside them.
            with_id_bits: also return the information content (bits) of the ids in the body.
        Returns:
            the frame (bytes), or (frame, id bits).
        Raises:
            ValueError: wrong shapes, ids outside [0, V) or repeated in a row, NaN/positive log-probs,
                positions outside the sample, or counts given to a fixed-K codec (or missing).
        """
        idx, logp = _check_inputs(topk_idx, topk_logp, self.k, self.vocab_size)
        context = _token_context(input_ids, positions, idx.shape[0])
        args = ()
        if self.ragged:
            if counts is None:
                raise ValueError("an adaptive-K (ragged) sqrt_ac codec needs the per-row counts")
            counts = np.asarray(counts)
            if counts.shape != (idx.shape[0],) or (counts.size and (counts.min() < 1 or counts.max() > self.k)):
                raise ValueError(f"counts must be [{idx.shape[0]}] values in [1, {self.k}]")
            logp = np.where(np.arange(self.k) < counts[:, None], logp, -np.inf)
            args = (counts.astype(np.int32),)
        else:
            _no_counts(self.name, counts)
        level, tail_level = _sqrt_levels(logp, self.delta, self.max_level)
        out = self._coder.encode(idx.astype(np.int32), level.astype(np.int32), tail_level.astype(np.int32), *context,
                                 *args, with_id_bits=with_id_bits)
        body, id_bits = out if with_id_bits else (out, None)
        frame = _pack_frame(self._tag, idx.shape[0], self.k, body)
        return (frame, id_bits) if with_id_bits else frame

    def decode(self, frame, input_ids, positions):
        """Decodes one sample's frame.

        Args:
            frame: bytes-like, as returned by `encode`.
            input_ids, positions: the sample's tokens and target positions, as given to `encode`.
        Returns:
            (idx int32 [P, K], logp float32 [P, K]) sorted by descending probability. Ragged codecs:
            [P, K'] with K' the largest count in the frame (1 if P = 0), shorter rows padded with id -1
            and log-prob -inf.
        Raises:
            CodecError: the frame is corrupt or truncated, was written with another K, id_prior or
                delta, or does not belong to these tokens and positions.
        """
        n_pos, _, body, rest = _unpack_frame(self._tag, frame, self.k)
        if len(rest):
            raise CodecError(f"{len(rest)} bytes after the body")
        if len(positions) != n_pos:
            raise CodecError(f"frame holds {n_pos} positions, the sample has {len(positions)}")
        try:
            context = _token_context(input_ids, positions, n_pos)
        except ValueError as exc:
            raise CodecError(f"the frame does not fit its sample: {exc}") from None
        try:
            ids, level, tail_level, counts = self._coder.decode(body, *context)
        except _coder_error() as exc:
            raise CodecError(str(exc)) from None
        logp = self._dequantize(level, tail_level)
        if counts is not None:
            width = int(counts.max()) if n_pos else 1
            ids, logp = ids[:, :width], logp[:, :width]
        return np.ascontiguousarray(ids), np.ascontiguousarray(logp)


    def decode_many(self, payload, frame_offsets, input_ids, token_offsets, positions, position_offsets):
        """Decodes many samples' frames in one call (the loader's batch path; same results as `decode`).

        Args:
            payload: bytes-like holding the frames; frame j is payload[frame_offsets[j]:frame_offsets[j+1]].
            input_ids: int32 tokens of the samples, concatenated (sample j: token_offsets[j]..[j+1]).
            positions: their target positions, concatenated (sample j: position_offsets[j]..[j+1]).
        Returns:
            (idx int32 [R, K], logp float32 [R, K], counts int32 [R] or None), R = all positions;
            rows of a ragged codec are padded with id -1 and log-prob -inf to K.
        Raises:
            CodecError: as `decode`; the message starts with "frame j:".
        """
        tokens, pos = np.asarray(input_ids), np.asarray(positions, np.int64)
        token_offsets, position_offsets = np.asarray(token_offsets, np.int64), np.asarray(position_offsets, np.int64)
        per_sample = np.diff(position_offsets)
        base = np.repeat(token_offsets[:-1], per_sample)
        if pos.size and (pos.min() < 0 or np.any(pos > np.repeat(np.diff(token_offsets), per_sample) - 2)):
            raise CodecError("a target position lies outside its sample")
        at = base + pos
        context = tokens[at].astype(np.int32)
        previous = np.where(pos > 0, tokens[np.maximum(at - 1, 0)], -1).astype(np.int32)
        following = tokens[np.minimum(at + 1, max(tokens.size - 1, 0))].astype(np.int32) if pos.size else context
        try:
            ids, level, tail_level, counts = self._coder.decode_frames(
                payload, _TAG[self._tag], np.asarray(frame_offsets, np.int64), position_offsets, context, previous,
                following)
        except _coder_error() as exc:
            raise CodecError(str(exc)) from None
        return ids, self._dequantize(level, tail_level), counts

    def _dequantize(self, level, tail_level):
        """float32 log-probs of decoded levels: log(level^2 / (sum of the row's squared levels + tail^2))."""
        return self._coder.dequantize_levels(level, tail_level, self._log_level)


def _coder_class():
    """kdengine._C.TopKCoder; ValueError saying how to build it when the extension is missing."""
    try:
        import torch  # noqa: F401  (kdengine._C links against torch's libraries, which torch loads)

        from kdengine import _C
    except ImportError as exc:
        raise ValueError(f"codec 'sqrt_ac' needs the compiled extension kdengine._C, which does not import "
                         f"({exc}); {_EXTENSION_HINT}, or dump with --codec sqrt") from None
    if not hasattr(getattr(_C, "TopKCoder", None), "dequantize_levels"):
        raise ValueError(f"kdengine._C ({_C.__file__}) was built from older sources than this checkout's "
                         f"codec 'sqrt_ac'; rebuild it: {_EXTENSION_HINT}")
    return _C.TopKCoder


def _coder_error():
    from kdengine import _C

    return _C.TopKCodecError


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    """kdengine._C.<name>, or None without the extension (or with one built from older sources)."""
    try:
        import torch  # noqa: F401  (kdengine._C links against torch's libraries, which torch loads)

        from kdengine import _C
    except ImportError:
        return None
    return getattr(_C, name, None)


def _sqrt_streams_decoder():
    """The C++ `sqrt` stream decoder, or None: `sqrt` then decodes with its numpy reference, to the
    same arrays."""
    return _compiled("sqrt_decode_streams")


def _sqrt_streams_encoder():
    """The C++ `sqrt` stream encoder, or None: `sqrt` then encodes with its numpy reference, to the
    same bytes."""
    return _compiled("sqrt_encode_streams")


# ---- helpers ----------------------------------------------------------------------------------
def _no_counts(name, counts):
    if counts is not None:
        raise ValueError(f"codec {name!r} stores K entries per row; per-row counts (adaptive K) need 'sqrt_ac'")


def _check_delta(delta) -> float:
    if not 1e-6 <= delta <= 0.25:
        raise ValueError(f"delta must be in [1e-6, 0.25], got {delta}")
    return float(delta)


def _sqrt_levels(logp, delta, max_level):
    """(level int64 [P, K], tail_level int64 [P]): clamp(round(sqrt(p) / delta), 1, max_level) of each
    entry and of the tail mass 1 - sum p."""
    p = np.exp(logp.astype(np.float64))
    tail = np.maximum(1.0 - p.sum(axis=1), 0.0)
    level = np.clip(np.rint(np.sqrt(p) / delta), 1, max_level).astype(np.int64)
    tail_level = np.clip(np.rint(np.sqrt(tail) / delta), 1, max_level).astype(np.int64)
    return level, tail_level


def _token_context(input_ids, positions, n_pos):
    """int32 [P] arrays input_ids[t], input_ids[t-1] (-1 at t = 0) and input_ids[t+1] for each target
    position t."""
    tokens = np.asarray(input_ids)
    pos = np.asarray(positions)
    if tokens.ndim != 1 or pos.shape != (n_pos,):
        raise ValueError(f"expected input_ids [T] and positions [{n_pos}], got {tokens.shape} and {pos.shape}")
    if n_pos and (pos.min() < 0 or pos.max() > tokens.shape[0] - 2):
        raise ValueError(f"target positions must lie in [0, {tokens.shape[0] - 2}], got [{pos.min()}, {pos.max()}]")
    if tokens.size and (tokens.min() < -(1 << 31) or tokens.max() >= 1 << 31):
        raise ValueError("input_ids must fit in int32")
    pos = pos.astype(np.int64)
    tokens = tokens.astype(np.int32)
    previous = np.where(pos > 0, tokens[np.maximum(pos - 1, 0)], -1).astype(np.int32)
    return tokens[pos], previous, tokens[pos + 1]


def _check_inputs(topk_idx, topk_logp, k, vocab_size):
    idx = np.asarray(topk_idx)
    logp = np.asarray(topk_logp)
    if idx.ndim != 2 or idx.shape[1] != k or logp.shape != idx.shape:
        raise ValueError(f"expected topk_idx and topk_logp of shape [P, {k}], got {idx.shape} and {logp.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"top-k ids must be in [0, {vocab_size}), got [{idx.min()}, {idx.max()}]")
    if logp.size and (np.isnan(logp).any() or logp.max() > 1e-3):
        raise ValueError(f"top-k log-probs must be <= 0 and not NaN, got max {logp.max()}")
    return idx.astype(np.int64), logp


def _pack_frame(codec, n_pos, k, body, bits=b"") -> bytes:
    return _FRAME_HEADER.pack(_TAG[codec], k, n_pos, len(body)) + body + bits


def _unpack_frame(codec, frame, k):
    frame = memoryview(frame).cast("B")
    if len(frame) < _FRAME_HEADER.size:
        raise CodecError(f"frame is {len(frame)} bytes, shorter than its {_FRAME_HEADER.size}-byte header")
    tag, frame_k, n_pos, body_len = _FRAME_HEADER.unpack_from(frame)
    if tag != _TAG[codec]:
        raise CodecError(f"frame tag {bytes(tag)!r} is not the '{codec}' codec's {_TAG[codec]!r}")
    if frame_k != k:
        raise CodecError(f"frame holds K={frame_k}, the store says K={k}")
    if _FRAME_HEADER.size + body_len > len(frame):
        raise CodecError("frame is shorter than its header says")
    body = frame[_FRAME_HEADER.size:_FRAME_HEADER.size + body_len]
    return n_pos, frame_k, body, frame[_FRAME_HEADER.size + body_len:]


class _ByteReader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > self.data.size:
            raise CodecError(f"stream ends at byte {self.data.size}, needed {self.pos + n}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def remaining(self):
        return self.data.size - self.pos


def _bucket(values, sub):
    """Splits non-negative ints into a small symbol (magnitude class + `sub` leading mantissa bits)
    and raw low bits. Returns (symbol int64, low-bit count int64, low bits int64)."""
    a = np.asarray(values, dtype=np.int64) + 1
    exp = np.frexp(a.astype(np.float64))[1] - 1  # floor(log2(a)); exact for a < 2**53
    nbits = np.maximum(exp - sub, 0)
    top = a >> nbits
    sym = np.where(exp > sub, ((exp - sub) << sub) + top, a)
    return sym, nbits, a - (top << nbits)


def _symbol_tables(sub):
    """For every byte symbol: how many low bits follow it, and the value's leading bits."""
    sym = np.arange(256, dtype=np.int64)
    nbits = np.where(sym < (2 << sub), 0, (sym >> sub) - 1)
    top = np.where(sym < (2 << sub), sym, (sym & ((1 << sub) - 1)) | (1 << sub))
    return nbits, top


_TABLES = {sub: _symbol_tables(sub) for sub in (_ID_SUB, _HEAD_SUB)}


def _bucket_nbits(sym, sub):
    return _TABLES[sub][0][sym]


def _unbucket(sym, low, sub):
    nbits, top = _TABLES[sub]
    return ((top[sym] << nbits[sym]) | low) - 1


def _pack_bits(values, nbits) -> bytes:
    nbits = np.asarray(nbits, dtype=np.int64)
    total = int(nbits.sum())
    if total == 0:
        return b""
    owner = np.repeat(np.arange(nbits.size), nbits)
    ends = np.cumsum(nbits)
    shift = ends[owner] - 1 - np.arange(total)
    return np.packbits(((np.asarray(values, dtype=np.int64)[owner] >> shift) & 1).astype(np.uint8)).tobytes()


def _unpack_bits(buf, nbits):
    """Inverse of _pack_bits: reads each field through an 8-byte big-endian window at its first byte
    (fields are at most 57 bits wide)."""
    nbits = np.asarray(nbits, dtype=np.int64)
    total = int(nbits.sum())
    raw = np.frombuffer(buf, np.uint8)
    if raw.size != (total + 7) // 8:
        raise CodecError(f"expected {(total + 7) // 8} bytes of low bits, got {raw.size}")
    if total == 0:
        return np.zeros(nbits.size, np.int64)
    if nbits.max() > 57:
        raise CodecError("a low-bit field is wider than 57 bits")
    starts = np.cumsum(nbits) - nbits
    padded = np.concatenate([raw, np.zeros(8, np.uint8)])
    windows = np.lib.stride_tricks.as_strided(padded, shape=(raw.size + 1, 8), strides=(1, 1))
    words = windows[starts >> 3].view(">u8").ravel()
    shift = (64 - (starts & 7) - nbits).astype(np.uint64)
    mask = (np.uint64(1) << nbits.astype(np.uint64)) - np.uint64(1)
    return ((words >> shift) & mask).astype(np.int64)


def _undo_gaps(value, tie_start):
    """Inverse of the id coding: within a tie group the first entry holds its rank and each later
    entry the gap to the previous one (rank difference - 1). value, tie_start: [P, K]."""
    w = np.where(tie_start, value, value + 1)
    csum = np.cumsum(w, axis=1)
    col = np.where(tie_start, np.arange(value.shape[1]), 0)
    start_col = np.maximum.accumulate(col, axis=1)
    before = np.take_along_axis(csum - w, start_col, 1)
    return csum - before
