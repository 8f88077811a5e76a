"""Format v1 of the top-k store: names, the manifest schema, checksums (see FORMAT.md).

Everything that the writer, the reader and `verify` must agree on lives here (the crash-safe writes
themselves are in kdengine/durable.py).
"""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np

from kdengine.checksum import sha256_bytes

FORMAT_NAME = "kdengine-topk"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"  # per-rank manifest parts: parts/rank-00003.json
LOCK_FILE = ".manifest.lock"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")

# Tensors of a shard (name -> dtype) and its required __metadata__ keys.
SHARD_TENSORS = {
    "input_ids": "int32",          # [sum T] the samples' token ids, concatenated
    "token_offsets": "int64",      # [S+1] sample s owns input_ids[token_offsets[s]:token_offsets[s+1]]
    "positions": "int32",          # [sum P] target positions t (predicting token t+1), sample-relative
    "position_offsets": "int64",   # [S+1]
    "payload": "uint8",            # [bytes] the codec frames, one per sample, concatenated
    "frame_offsets": "int64",      # [S+1]
    "sample_index": "int64",       # [S] the sample's index in the corpus
    "sample_crc32": "uint32",      # [S] crc32 over the sample's input_ids, positions and frame bytes
}
# The codec's per-shard table: [V] id weights (codec 'sqrt_ac') or rank -> id (codec 'sqrt').
OPTIONAL_TENSORS = {"id_prior": "int32", "vocab_order": "int32"}
TARGET_MODES = ("topk", "sample")  # the manifest's `targets`; "sample" stores use codec `sampled`
SHARD_METADATA_KEYS = ("format", "version", "codec", "codec_params", "k", "vocab_size",
                       "tokenizer_fingerprint", "teacher", "chunk", "rank", "samples", "sample_ids")


class StoreError(Exception):
    """Anything wrong with a store on disk or with how it is used. The message names the file, shard,
    sample or key at fault, what was expected and what was found, and what to do next."""


def shard_name(chunk: int) -> str:
    """Chunk c holds corpus samples [c*S, (c+1)*S) (S = --shard-samples); exactly one rank writes it."""
    return f"shard-{chunk:06d}.safetensors"


def part_name(rank: int) -> str:
    return f"{PARTS_DIR}/rank-{rank:05d}.json"


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


def sample_crc32(input_ids, positions, frame) -> int:
    """crc32 over a sample's int32 token ids, int32 positions and frame bytes (FORMAT.md)."""
    crc = zlib.crc32(np.ascontiguousarray(input_ids, dtype="<i4"))
    crc = zlib.crc32(np.ascontiguousarray(positions, dtype="<i4"), crc)
    return zlib.crc32(frame, crc)


def store_identity(manifest: dict) -> str:
    """The store's identity: sha256 (hex) over its shards' (chunk, sha256) pairs in chunk order.

    Two stores with the same identity hold byte-identical shards, so the same samples in the same
    order with the same targets; any rewritten, added or dropped shard changes it. A resumed training
    run compares it to refuse a store that is not the one it started on.
    """
    pairs = sorted((int(s["chunk"]), str(s["sha256"])) for s in manifest["shards"])
    return sha256_bytes("\n".join(f"{chunk}:{digest}" for chunk, digest in pairs).encode("ascii"))


def load_manifest(directory: str | Path) -> dict:
    """Reads and checks DIR/manifest.json.

    Raises:
        StoreError: missing or unparsable manifest, another format, an unknown version, a missing key,
            or a shard entry that does not name a plain shard file inside DIR.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise StoreError(f"{directory}: no such directory (expected a store written by `kdengine dump`)")
    if not path.is_file():
        raise StoreError(f"{path}: missing; {directory} is not a store (write one with `kdengine dump`)")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}); the manifest is rebuilt from {PARTS_DIR}/ "
                         f"when the dump is re-run") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest, path) -> None:
    """Checks every key's type and range, the shard list (one entry per chunk, in chunk order) and the
    totals against the entries; raises StoreError naming the key, what it holds and what it must hold."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{path}: format is {got!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(f"{path}: format version {manifest.get('version')!r}, this kdengine reads version "
                         f"{FORMAT_VERSION}; use the kdengine release that wrote the store")
    for key, kind in (("teacher", str), ("tokenizer_fingerprint", str), ("codec", dict), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"{path}: key {key!r} is {_shown(manifest.get(key))}, expected {_KIND_NAMES[kind]}"
                             f"{_REDUMP}")
    targets = manifest.get("targets", "topk")
    if targets not in TARGET_MODES:
        raise StoreError(f"{path}: targets is {targets!r}, this kdengine knows {', '.join(TARGET_MODES)}; use the "
                         f"kdengine release that wrote the store")
    if (targets == "sample") != (manifest["codec"].get("name") == "sampled"):
        raise StoreError(f"{path}: targets {targets!r} with codec {manifest['codec'].get('name')!r}; a 'sample' "
                         f"store uses codec 'sampled' and only it")
    vocab = _count(manifest, "vocab_size", path, minimum=1)
    k = _count(manifest, "k", path, minimum=1)
    if k > vocab:
        raise StoreError(f"{path}: k is {k}, larger than vocab_size {vocab}{_REDUMP}")
    codec = manifest["codec"]
    if not isinstance(codec.get("name"), str) or not isinstance(codec.get("params", {}), dict):
        raise StoreError(f"{path}: codec is {_shown(codec)}, expected {{\"name\": str, \"params\": object}}{_REDUMP}")
    for key, kinds in (("complete", (bool,)), ("dump", (dict,)), ("ranks_finished", (list,))):
        if key in manifest and not isinstance(manifest[key], kinds):
            raise StoreError(f"{path}: key {key!r} is {_shown(manifest[key])}, expected "
                             f"{_KIND_NAMES[kinds[0]]}{_REDUMP}")
    if manifest.get("chunks_total") is not None:
        _count(manifest, "chunks_total", path)
    chunks = []
    for i, shard in enumerate(manifest["shards"]):
        check_shard_entry(shard, f"{path}: shard entry {i}")
        if chunks and shard["chunk"] <= chunks[-1]:
            kind = "listed twice" if shard["chunk"] in chunks else "out of chunk order"
            raise StoreError(f"{path}: shard entry {i} ({shard['file']}): chunk {shard['chunk']} is {kind}; "
                             f"each chunk must appear once, in order{_REDUMP}")
        chunks.append(shard["chunk"])
    for key in TOTAL_KEYS:
        if key in manifest:
            total = sum(s[key] for s in manifest["shards"])
            if _count(manifest, key, path) != total:
                raise StoreError(f"{path}: {key} is {manifest[key]}, but its shard entries add up to {total}"
                                 f"{_REDUMP}")


TOTAL_KEYS = ("samples", "tokens", "positions", "payload_bytes")  # manifest totals = sums over shards
_ENTRY_COUNTS = ("chunk", "rank", "samples", "tokens", "positions", "payload_bytes", "bytes")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KIND_NAMES = {str: "a string", dict: "an object", list: "an array", bool: "true or false"}
_REDUMP = ("; the manifest was edited or damaged: re-run the dump command (it rebuilds manifest.json "
           "from parts/), then `kdengine verify`")


def check_shard_entry(shard, where) -> None:
    if not isinstance(shard, dict):
        raise StoreError(f"{where}: expected an object, got {type(shard).__name__}")
    name = shard.get("file")
    if not isinstance(name, str) or not SHARD_RE.match(name):
        raise StoreError(f"{where}: file {name!r} is not a shard file name inside the store directory "
                         f"(expected shard-NNNNNN.safetensors; paths are refused)")
    for key in (*_ENTRY_COUNTS, "sha256"):
        if key not in shard:
            raise StoreError(f"{where} ({name}): key {key!r} is missing")
    for key in _ENTRY_COUNTS:
        _count(shard, key, f"{where} ({name})", minimum=1 if key == "samples" else 0)
    if name != shard_name(shard["chunk"]):
        raise StoreError(f"{where} ({name}): chunk {shard['chunk']} is stored as {shard_name(shard['chunk'])}, "
                         f"not {name}{_REDUMP}")
    if not isinstance(shard["sha256"], str) or not _SHA256_RE.match(shard["sha256"]):
        raise StoreError(f"{where} ({name}): sha256 is {_shown(shard['sha256'])}, expected 64 lowercase hex "
                         f"digits{_REDUMP}")


def _count(obj: dict, key: str, where, *, minimum: int = 0) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"{where}: {key} is {_shown(value)}, expected an integer{_REDUMP}")
    if value < minimum:
        raise StoreError(f"{where}: {key} is {value}, expected at least {minimum}{_REDUMP}")
    return value


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
