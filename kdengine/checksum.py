"""The one sha256 helper: store shards, corpus files, tokenizer fingerprints and store identities all
hash through here."""
from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 22


def sha256_bytes(data: bytes) -> str:
    """sha256 of `data`, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, lowercase hex, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
