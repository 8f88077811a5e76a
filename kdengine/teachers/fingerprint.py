"""A stable hash of what a tokenizer maps text to: the vocabulary and its special tokens.

Two tokenizers with the same fingerprint turn the same text into the same ids, so a student whose
tokenizer matches the store's fingerprint can index the teacher's top-k ids directly. The padding
token is left out on purpose: it is a batching choice (often set to EOS at load time), not part of
the mapping.
"""
import json

from kdengine.checksum import sha256_bytes


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) over the token -> id map, the special added tokens, and the BOS/EOS/UNK ids."""
    special_added = sorted(
        (int(i), tok.content) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special
    )
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special_added": special_added,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return sha256_bytes(blob)
