"""Formats v1 and v2 of the top-k store: names, the manifest schema, checksums (see FORMAT.md).

Everything that the writer, the reader and `verify` must agree on lives here (the crash-safe writes
themselves are in kdengine/durable.py). The writer writes FORMAT_VERSION; readers read every version
in READABLE_VERSIONS.
"""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import zstandard

from kdengine.checksum import sha256_bytes

FORMAT_NAME = "kdengine-topk"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PARTS_DIR = "parts"  # per-rank manifest parts: parts/rank-00003.json
LOCK_FILE = ".manifest.lock"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")

# What a position's targets are (the manifest's `targets`): the teacher's top-k + tail ("topk"), or ids
# drawn from the teacher's distribution with their counts ("sample").
# A reader refuses a store whose target mode it does not know.
TARGET_MODES = ("topk", "sample")  # "sample" stores (RS-KD draws) use codec `sampled`
# Named sections a store may add (FORMAT.md, "Sections"): name -> what it holds. A reader refuses a
# store with a *required* section it does not know; unknown optional sections are checked (crc) and
# passed through as they are.
TEMPERED_LSE = "tempered_lse"
KNOWN_SECTIONS: dict[str, str] = {
    TEMPERED_LSE: "c_T = logsumexp over the full vocabulary of logp / T, per position, one float32 column per "
                  "temperature in params.temperatures (`kdengine dump --temperatures`)",
}

# v1: tensors of a shard (name -> dtype).
SHARD_TENSORS_V1 = {
    "input_ids": "int32",          # [sum T] the samples' token ids, concatenated
    "token_offsets": "int64",      # [S+1] sample s owns input_ids[token_offsets[s]:token_offsets[s+1]]
    "positions": "int32",          # [sum P] target positions t (predicting token t+1), sample-relative
    "position_offsets": "int64",   # [S+1]
    "payload": "uint8",            # [bytes] the codec frames, one per sample, concatenated
    "frame_offsets": "int64",      # [S+1]
    "sample_index": "int64",       # [S] the sample's index in the corpus
    "sample_crc32": "uint32",      # [S] crc32 over the sample's input_ids, positions and frame bytes
}
# v2: the same, with the token ids, the positions and the codec table zstd-compressed ("NAME.zst",
# uint8: one zstd frame of the array's little-endian bytes; positions as gaps, see FORMAT.md).
SHARD_TENSORS_V2 = {
    "input_ids.zst": "uint8",      # int32 [sum T]
    "token_offsets": "int64",
    "position_gaps.zst": "uint8",  # int32 [sum P]: per sample t_0, then t_i - t_(i-1) - 1
    "position_offsets": "int64",
    "payload": "uint8",
    "frame_offsets": "int64",
    "sample_index": "int64",
    "sample_crc32": "uint32",      # [S] crc32 over input_ids, positions, frame, then the sections' rows
}
SHARD_TENSORS = {1: SHARD_TENSORS_V1, 2: SHARD_TENSORS_V2}
# v1: the codec's per-shard table: [V] id weights (codec 'sqrt_ac') or rank -> id (codec 'sqrt'). v2
# stores "id_count_codes.zst" (sqrt_ac) or "vocab_order.zst" (sqrt): see codec.stored_table.
OPTIONAL_TENSORS = {"id_prior": "int32", "vocab_order": "int32"}
SECTION_PREFIX = "section."  # v2: section NAME's rows are the tensor "section.NAME" (or "section.NAME.zst")
SHARD_METADATA_KEYS = ("format", "version", "codec", "codec_params", "k", "vocab_size",
                       "tokenizer_fingerprint", "teacher", "chunk", "rank", "samples", "sample_ids")
SHARD_METADATA_KEYS_V2 = SHARD_METADATA_KEYS + ("targets", "top_p")
SECTION_DTYPES = ("float32", "float16", "int32", "int16", "uint8")
SECTION_KEYS = {"dtype", "width", "required", "compressed", "params"}


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


def disk_bytes(directory: str | Path) -> int:
    """Every byte of a store on disk: the sizes of all files under DIR (shards, manifest, parts)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def sample_crc32(input_ids, positions, frame, section_rows=()) -> int:
    """crc32 over a sample's int32 token ids, int32 positions and frame bytes, then (v2) the bytes of
    its rows of each section, sections in name order (FORMAT.md)."""
    crc = zlib.crc32(np.ascontiguousarray(input_ids, dtype="<i4"))
    crc = zlib.crc32(np.ascontiguousarray(positions, dtype="<i4"), crc)
    crc = zlib.crc32(frame, crc)
    for rows in section_rows:
        crc = zlib.crc32(np.ascontiguousarray(rows), crc)
    return crc


# ---- compressed arrays (v2 "NAME.zst" tensors) ------------------------------------------------------
_ZSTD_LEVEL = 19  # shard-level arrays are written once and read whole: the slow levels pay off


def pack_array(values: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 tensor holding one zstd frame (content size and checksum on) of `values` as little-endian
    `dtype` bytes."""
    data = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    frame = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True, write_content_size=True).compress(data)
    return np.frombuffer(frame, np.uint8).copy()


def unpack_array(packed: np.ndarray, dtype: str, count: int, where: str) -> np.ndarray:
    """Inverse of `pack_array`, expecting exactly `count` values.

    Raises:
        StoreError: not a whole zstd frame of `count` values (corrupt bytes).
    """
    size = count * np.dtype(dtype).itemsize
    try:
        data = zstandard.ZstdDecompressor().decompress(np.asarray(packed, np.uint8).tobytes(), max_output_size=size)
    except zstandard.ZstdError as exc:
        raise StoreError(f"{where}: does not decompress ({exc}); the shard is corrupt, run `kdengine verify` "
                         f"and re-dump it") from None
    if len(data) != size:
        raise StoreError(f"{where}: holds {len(data)} bytes, expected {count} {dtype} values ({size} bytes)")
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype)


def position_gaps(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per sample (positions[offsets[s]:offsets[s+1]], sorted): t_0, then t_i - t_(i-1) - 1."""
    pos = np.asarray(positions, np.int64)
    previous = np.concatenate([[-1], pos[:-1]])
    starts = np.asarray(offsets[:-1], np.int64)
    starts = starts[starts < pos.size]
    previous[starts] = -1
    return (pos - previous - 1).astype(np.int32)


def positions_from_gaps(gaps: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of `position_gaps`: t = cumsum(gap + 1) - 1 within each sample."""
    total = np.cumsum(np.asarray(gaps, np.int64) + 1)
    before = np.concatenate([[0], total])[np.asarray(offsets[:-1], np.int64)]
    return (total - np.repeat(before, np.diff(offsets)) - 1).astype(np.int32)


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
        StoreError: missing or unparsable manifest, another format, an unknown version, target mode or
            required section, a missing key, or a shard entry that does not name a plain shard file
            inside DIR.
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
    if manifest.get("version") not in READABLE_VERSIONS:
        raise StoreError(f"{path}: format version {manifest.get('version')!r}, this kdengine reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; use the kdengine release that wrote the store")
    for key, kind in (("teacher", str), ("tokenizer_fingerprint", str), ("codec", dict), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"{path}: key {key!r} is {_shown(manifest.get(key))}, expected {_KIND_NAMES[kind]}"
                             f"{_REDUMP}")
    if manifest["version"] >= 2:
        check_targets(manifest, path)
    elif manifest.get("targets", "topk") not in TARGET_MODES:
        raise StoreError(f"{path}: targets is {manifest.get('targets')!r}, this kdengine knows "
                         f"{', '.join(TARGET_MODES)}; use the kdengine release that wrote the store")
    targets = manifest.get("targets", "topk")
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


def targets_of(manifest: dict) -> tuple[str, float | None, dict]:
    """(target mode, top_p or None, sections) of a manifest; v1 stores are fixed-K top-k, no sections."""
    if manifest.get("version") == 1:
        return manifest.get("targets", "topk"), None, {}
    return manifest["targets"], manifest.get("top_p"), manifest.get("sections", {})


def check_targets(manifest: dict, where) -> None:
    """The v2 target description: a known target mode, top_p in (0, 1] or null, and sections each
    with a valid spec; a required section this kdengine does not know is refused."""
    mode = manifest.get("targets")
    if mode not in TARGET_MODES:
        raise StoreError(f"{where}: target mode {mode!r} is not one this kdengine reads ({', '.join(TARGET_MODES)}); "
                         f"use a kdengine release that knows it")
    top_p = manifest.get("top_p")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise StoreError(f"{where}: top_p must be null or in (0, 1], got {top_p!r}")
    sections = manifest.get("sections", {})
    if not isinstance(sections, dict):
        raise StoreError(f"{where}: sections must be an object, got {type(sections).__name__}")
    for name, spec in sections.items():
        check_section_spec(name, spec, where)


def check_section_spec(name, spec, where) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise StoreError(f"{where}: section name {name!r} must match [a-z][a-z0-9_]*")
    if not isinstance(spec, dict) or set(spec) - SECTION_KEYS or not {"dtype", "width", "required"} <= set(spec):
        raise StoreError(f"{where}: section {name!r} must be an object with dtype, width, required "
                         f"(and optionally compressed, params), got {spec!r}")
    if spec["dtype"] not in SECTION_DTYPES or not isinstance(spec["width"], int) or spec["width"] < 1:
        raise StoreError(f"{where}: section {name!r}: dtype must be one of {SECTION_DTYPES} and width >= 1, "
                         f"got {spec['dtype']!r}, {spec['width']!r}")
    if spec["required"] and name not in KNOWN_SECTIONS:
        raise StoreError(f"{where}: the store requires section {name!r}, which this kdengine does not know "
                         f"(it knows {sorted(KNOWN_SECTIONS) or 'none'}); use the kdengine release that wrote it")
    if name == TEMPERED_LSE:
        temps = spec.get("params", {}).get("temperatures")
        if (spec["dtype"] != "float32" or not isinstance(temps, list) or len(temps) != spec["width"]
                or not all(isinstance(t, (int, float)) and 0 < t < float("inf") for t in temps)
                or len(set(temps)) != len(temps)):
            raise StoreError(f"{where}: section {TEMPERED_LSE!r} must be float32 with params.temperatures a list "
                             f"of width distinct finite temperatures > 0, got {spec!r}")


def tempered_lse_spec(temperatures) -> dict:
    """The manifest entry of the c_T section for these temperatures (FORMAT.md, "Section tempered_lse")."""
    return {"dtype": "float32", "width": len(temperatures), "required": False,
            "params": {"temperatures": [float(t) for t in temperatures]}}


def tempered_lse_column(sections: dict, temperature: float) -> int | None:
    """Which column of a store's c_T section holds `temperature` (exactly as given), or None."""
    temps = sections.get(TEMPERED_LSE, {}).get("params", {}).get("temperatures", [])
    return temps.index(float(temperature)) if float(temperature) in temps else None


def section_tensor(name: str, spec: dict) -> str:
    return SECTION_PREFIX + name + (".zst" if spec.get("compressed") else "")


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
        _count(shard, key, f"{where} ({name})")  # 0 samples: a `generate --keep-correct` chunk that kept none
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
