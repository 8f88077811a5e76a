"""A stable hash of everything that decides which ids a tokenizer gives a text.

Two tokenizers with the same fingerprint turn the same text into the same ids, so a student whose
tokenizer matches the store's fingerprint can index the teacher's top-k ids directly.

Version 2 (`v2:<sha256 hex>`, the current one) hashes the fast tokenizer's whole pipeline as
tokenizers serializes it - normalizer, pre-tokenizer, model (vocabulary, merges and their options),
post-processor, added tokens (special or not) - plus the BOS/EOS/UNK ids and the special prefix
kdengine puts before plain text (options set to null or "" count as unset). Left out on purpose: the padding token and padding/truncation
settings (batching choices, often set at load time) and the decoder (ids -> text only). A tokenizer
without a fast backend hashes its sentencepiece model, else its vocabulary.

Version 1 (a bare 64-digit hex, stores dumped before version 2) hashed only the token -> id map, the
special added tokens and BOS/EOS/UNK: a tokenizer that lowercases or adds a prefix space matched it.
`tokenizer_fingerprint(tok, like=stored)` computes the stored fingerprint's version, so a version 1
store still compares exactly as it did; `fingerprint_version` tells callers to warn about it.
"""
from __future__ import annotations

import json
import re

from kdengine.checksum import sha256_bytes

FINGERPRINT_VERSION = 2
_V1 = re.compile(r"^[0-9a-f]{64}$")
_V2 = re.compile(r"^v2:[0-9a-f]{64}$")
_NOT_IDS = ("decoder", "padding", "truncation")  # tokenizer.json keys that do not change text -> ids


def tokenizer_fingerprint(tokenizer, *, like: str | None = None) -> str:
    """The tokenizer's fingerprint, in the current version or, given `like` (a stored fingerprint), in
    that one's version, so the two compare (an unknown `like` gets the current version, which then
    does not match; `fingerprint_version(like)` says why)."""
    version = 1 if like is not None and _V1.match(like) else FINGERPRINT_VERSION
    if version == 1:
        return _v1(tokenizer)
    return "v2:" + sha256_bytes(_canonical(_v2_payload(tokenizer)))


def fingerprint_version(fingerprint: str) -> int:
    """1 or 2.

    Raises:
        ValueError: neither a v1 (64 hex digits) nor a v2 (`v2:` + 64 hex digits) fingerprint.
    """
    if _V2.match(fingerprint):
        return 2
    if _V1.match(fingerprint):
        return 1
    raise ValueError(f"tokenizer fingerprint {fingerprint[:24]!r} is of an unknown version (this kdengine knows "
                     f"1 and {FINGERPRINT_VERSION}); use the kdengine release that wrote it")


V1_NOTE = ("the store's tokenizer fingerprint is version 1, which covers the vocabulary and special tokens "
           "but not the normalizer, pre-tokenizer or post-processor; to have those checked too, re-dump the "
           "store with this kdengine (the same `kdengine dump` command into a new --out)")


def _v2_payload(tokenizer) -> dict:
    from kdengine.teachers.encoding import special_prefix

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = _without_unset({k: v for k, v in json.loads(backend.to_str()).items() if k not in _NOT_IDS})
    elif getattr(tokenizer, "sp_model", None) is not None:
        pipeline = {"sentencepiece": sha256_bytes(tokenizer.sp_model.serialized_model_proto())}
    else:
        pipeline = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    return {"pipeline": pipeline, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id, "special_prefix": special_prefix(tokenizer)}


def _without_unset(value):
    """Drops options set to null or "" (they mean the same: a GGUF-converted tokenizer writes
    continuing_subword_prefix "" where the original has null), recursively."""
    if isinstance(value, dict):
        return {k: _without_unset(v) for k, v in value.items() if v is not None and v != ""}
    if isinstance(value, list):
        return [_without_unset(v) for v in value]
    return value


def _v1(tokenizer) -> str:
    special_added = sorted(
        (int(i), tok.content) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special
    )
    return sha256_bytes(_canonical({
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special_added": special_added,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }, sort_keys=False))


def _canonical(payload, *, sort_keys: bool = True) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys).encode("utf-8")
