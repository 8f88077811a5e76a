"""Writing a store: one shard per chunk of samples, written atomically, and a manifest that lists them.

`ShardBuilder` collects one chunk's samples and encodes them (it learns the shard's vocabulary order
from the first positions it sees, then encodes as samples arrive). `StoreWriter` owns one rank's view
of a store directory: it checks that a resumed dump matches the one on disk, writes finished shards
(temporary name, fsync, rename), and keeps the manifest current (see FORMAT.md, "Ranks and the
manifest").
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from kdengine.checksum import sha256_file
from kdengine.durable import fsync_path, remove_stale_temporaries, write_atomic
from kdengine.locks import LockHeld, ProcessLock, hold_lock
from kdengine.store.codec import learn_stored_table, make_codec, stored_table, table_from_stored
from kdengine.store.format import (
    FORMAT_NAME, FORMAT_VERSION, LOCK_FILE, MANIFEST, PARTS_DIR, TARGET_MODES, StoreError, check_section_spec,
    check_shard_entry, dump_json, pack_array, part_name, position_gaps, sample_crc32, section_tensor, shard_name,
)


@dataclass(frozen=True)
class StoreHeader:
    """What the manifest and every shard say about the whole store.

    config: the dump settings a resumed run must repeat exactly (data hash, max length, chunking, ...);
    any key that differs makes `StoreWriter` refuse the directory.
    """

    teacher: str
    tokenizer_fingerprint: str
    vocab_size: int
    k: int
    codec: str
    codec_params: dict
    config: dict
    top_p: float | None = None  # adaptive K: keep the smallest prefix with this mass (at most k entries)
    sections: dict = field(default_factory=dict)  # section name -> spec (FORMAT.md, "Sections")
    targets: str = "topk"


# sqrt_ac: how many of a shard's positions are coded with the ids' cost counted (a log2 per symbol),
# to split the payload into id and value bytes for `kdengine inspect`.
COSTED_POSITIONS = 8192


class ShardBuilder:
    """Encodes one chunk of samples into a shard's tensors.

    Samples may arrive in any order (the dump sorts by length); the shard stores them by corpus index.
    A codec with a per-shard table (`sqrt_ac`: id_prior, `sqrt`: vocab_order) learns it from the
    first `learn_positions` positions added, which are held raw until then.
    """

    def __init__(self, header: StoreHeader, *, learn_positions: int = 32768):
        if header.targets not in TARGET_MODES:
            raise ValueError(f"unknown target mode {header.targets!r}; expected one of {TARGET_MODES}")
        if header.top_p is not None and not 0 < header.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {header.top_p}")
        for name, spec in header.sections.items():
            check_section_spec(name, spec, "StoreHeader.sections")
        self.header = header
        self.learn_positions = learn_positions
        self.table = stored_table(header.codec)  # (tensor name, dtype) or None
        self._stored_table = None
        self.codec = None if self.table else self._make_codec(None)
        self._pending = []  # raw samples waiting for the vocabulary order
        self._pending_positions = 0
        self._done = []  # (index, id, input_ids, positions, frame, sections)
        self._distinct_ids = 0  # sampled targets: distinct ids over all positions added
        self._costed = [0, 0.0, 0]  # positions, id bits and frame bytes of the frames costed so far

    def _make_codec(self, table):
        h = self.header
        return make_codec(h.codec, k=h.k, vocab_size=h.vocab_size, table=table, ragged=h.top_p is not None,
                          **h.codec_params)

    def add(self, index: int, sample_id: str, input_ids, positions, topk_idx, topk_logp, sections=None) -> None:
        """Adds one sample.

        Args:
            index: the sample's index in the corpus.
            sample_id: its id (a string).
            input_ids: int [T] token ids.
            positions: int [P] target positions, each in [0, T-2].
            topk_idx: int [P, K] ids, rows sorted by descending probability.
            topk_logp: float [P, K] full-vocabulary log-probs of those ids. With `top_p`, each row keeps
                its smallest prefix whose mass reaches top_p (at least one entry).
            sections: {name: [P, width] array} for every section of the header (none else).
        """
        input_ids = np.asarray(input_ids, dtype=np.int32)
        positions = np.asarray(positions, dtype=np.int32)
        topk_idx, topk_logp = np.asarray(topk_idx), np.asarray(topk_logp)
        if topk_idx.shape != (positions.shape[0], self.header.k) or topk_logp.shape != topk_idx.shape:
            raise ValueError(f"sample {index}: expected top-k of shape [{positions.shape[0]}, {self.header.k}], "
                             f"got {topk_idx.shape} and {topk_logp.shape}")
        if positions.size and (positions.min() < 0 or positions.max() >= input_ids.shape[0] - 1):
            raise ValueError(f"sample {index}: target positions must lie in [0, {input_ids.shape[0] - 2}]")
        if self.header.targets != "topk":
            raise ValueError(f"sample {index}: a {self.header.targets!r} store takes add_draws(), not top-k rows")
        if positions.size > 1 and np.any(np.diff(positions) <= 0):
            raise ValueError(f"sample {index}: target positions must be strictly increasing")
        rows = self._section_rows(index, sections or {}, positions.shape[0])
        counts = None if self.header.top_p is None else top_p_counts(topk_logp, self.header.top_p)
        item = (int(index), str(sample_id), input_ids, positions, topk_idx, topk_logp, counts, rows)
        if self.codec is None:
            self._pending.append(item)
            self._pending_positions += positions.shape[0]
            if self._pending_positions >= self.learn_positions:
                self._start_codec()
        else:
            self._encode(item)

    def add_draws(self, index: int, sample_id: str, input_ids, positions, draws, sections=None) -> None:
        """Adds one sample of a sampled-target store (targets "sample").

        Args:
            draws: a `kdengine.sampling.TeacherDraws` over the sample's P positions (ids, counts, logp
                [P, K'], log_norm [P]).
            sections: as for `add`.
        """
        if self.header.targets != "sample":
            raise ValueError(f"sample {index}: add_draws() is for a 'sample' store, this one is {self.header.targets!r}")
        input_ids = np.asarray(input_ids, dtype=np.int32)
        positions = np.asarray(positions, dtype=np.int32)
        if draws.ids.shape[0] != positions.shape[0]:
            raise ValueError(f"sample {index}: {draws.ids.shape[0]} rows of draws for {positions.shape[0]} positions")
        if positions.size and (positions.min() < 0 or positions.max() >= input_ids.shape[0] - 1):
            raise ValueError(f"sample {index}: target positions must lie in [0, {input_ids.shape[0] - 2}]")
        rows = self._section_rows(index, sections or {}, positions.shape[0])
        frame = self.codec.encode(np.asarray(draws.ids), np.asarray(draws.counts), np.asarray(draws.logp),
                                  np.asarray(draws.log_norm))
        self._done.append((int(index), str(sample_id), input_ids, positions, frame, rows))
        self._distinct_ids += int((np.asarray(draws.counts) > 0).sum())

    def _section_rows(self, index, sections, n_pos):
        specs = self.header.sections
        if set(sections) != set(specs):
            raise ValueError(f"sample {index}: sections {sorted(sections)} given, the store has {sorted(specs)}")
        rows = {}
        for name, spec in sorted(specs.items()):
            a = np.asarray(sections[name])
            if a.shape != (n_pos, spec["width"]):
                raise ValueError(f"sample {index}: section {name!r} must be [{n_pos}, {spec['width']}], got {a.shape}")
            rows[name] = np.ascontiguousarray(a, dtype=spec["dtype"])
        return rows

    def _start_codec(self) -> None:
        seen = [item[4] if item[6] is None else np.where(np.arange(self.header.k) < item[6][:, None], item[4], -1)
                for item in self._pending]
        ids = np.concatenate(seen) if seen else np.zeros((0, self.header.k), np.int64)
        h = self.header
        self._stored_table = learn_stored_table(h.codec, ids[ids >= 0], h.vocab_size)
        self.codec = self._make_codec(table_from_stored(h.codec, self._stored_table))
        pending, self._pending = self._pending, []
        for item in pending:
            self._encode(item)

    def _encode(self, item) -> None:
        index, sample_id, input_ids, positions, topk_idx, topk_logp, counts, rows = item
        if self.header.codec == "sqrt_ac" and self._costed[0] < COSTED_POSITIONS:
            frame, id_bits = self.codec.encode(topk_idx, topk_logp, input_ids, positions, counts=counts,
                                               with_id_bits=True)
            self._costed = [self._costed[0] + positions.shape[0], self._costed[1] + id_bits,
                            self._costed[2] + len(frame)]
        else:
            frame = self.codec.encode(topk_idx, topk_logp, input_ids, positions, counts=counts)
        self._done.append((index, sample_id, input_ids, positions, frame, rows))

    def __len__(self) -> int:
        return len(self._done) + len(self._pending)

    def finish(self) -> tuple[dict, list[str], dict]:
        """Returns (tensors, sample ids, counts) for the shard; see FORMAT.md for the tensors."""
        if self.codec is None:
            self._start_codec()
        done = sorted(self._done, key=lambda item: item[0])
        tokens = [d[2] for d in done]
        positions = [d[3] for d in done]
        frames = [d[4] for d in done]
        all_positions = _concat(positions, np.int32)
        position_offsets = _offsets(positions)
        tensors = {
            "input_ids.zst": pack_array(_concat(tokens, np.int32), "int32"),
            "token_offsets": _offsets(tokens),
            "position_gaps.zst": pack_array(position_gaps(all_positions, position_offsets), "int32"),
            "position_offsets": position_offsets,
            "payload": np.frombuffer(b"".join(frames), np.uint8).copy(),
            "frame_offsets": _offsets(frames),
            "sample_index": np.array([d[0] for d in done], np.int64),
            "sample_crc32": np.array([sample_crc32(d[2], d[3], d[4], d[5].values()) for d in done], np.uint32),
        }
        for name, spec in sorted(self.header.sections.items()):
            rows = np.concatenate([d[5][name] for d in done]) if done else np.zeros((0, spec["width"]), spec["dtype"])
            tensors[section_tensor(name, spec)] = pack_array(rows, spec["dtype"]) if spec.get("compressed") else rows
        if self.table:
            tensors[self.table[0] + ".zst"] = pack_array(self._stored_table, self.table[1])
        payload = int(tensors["payload"].size)
        counts = {"samples": len(done), "tokens": int(sum(t.size for t in tokens)),
                  "positions": int(all_positions.size), "payload_bytes": payload}
        if self._costed[2]:
            counts["payload_id_bytes"] = round(payload * min(1.0, self._costed[1] / 8 / self._costed[2]))
        if self.header.targets == "sample":
            counts["distinct_ids"] = self._distinct_ids
        return tensors, [d[1] for d in done], counts


def top_p_counts(topk_logp: np.ndarray, top_p: float) -> np.ndarray:
    """int32 [P]: per row (sorted by descending probability) the smallest n with
    sum(exp(logp[:n])) >= top_p, at least 1 and at most K (FORMAT.md, "Adaptive K")."""
    mass = np.cumsum(np.exp(np.asarray(topk_logp, np.float64)), axis=1)
    return (1 + (mass[:, :-1] < top_p).sum(axis=1)).astype(np.int32)


def _concat(arrays, dtype):
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def _offsets(items):
    return np.concatenate([[0], np.cumsum([len(x) for x in items])]).astype(np.int64)


class StoreWriter:
    """One rank's writer for a store directory.

    On creation it takes the rank's lock (DIR/.rank-RRRRR.lock, held until `close()` or the process
    ends: a second process claiming the same rank is refused, naming the first one's pid and host),
    reads every rank's manifest part, refuses a directory written with other settings (naming the
    setting and what to do), removes the rank's own stale temporary files, and records which chunks
    are already complete, so that a re-run continues after them. A full or read-only disk is a
    StoreError naming the directory; the temporary file of a failed write is removed.
    """

    def __init__(self, directory: str | Path, header: StoreHeader, *, rank: int = 0, world_size: int = 1,
                 lock: ProcessLock | None = None):
        """lock: the rank's lock from `claim_rank`, when the caller took it early (before loading a
        teacher); the writer owns it from then on."""
        if not 0 <= rank < world_size:
            raise StoreError(f"rank must be in [0, {world_size}), got {rank}")
        self.directory = Path(directory)
        self.header, self.rank, self.world_size = header, rank, world_size
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"{self.directory}: exists and is not a directory; choose another --out")
        with writing(self.directory, "the store directory"):
            (self.directory / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        self._lock = lock or claim_rank(self.directory, rank)
        try:
            self._open_parts(header)
        except BaseException:
            self.close()
            raise

    def _open_parts(self, header: StoreHeader) -> None:
        rank = self.rank
        if (self.directory / MANIFEST).exists() and not any((self.directory / PARTS_DIR).iterdir()):
            raise StoreError(f"{self.directory}: holds a manifest but no {PARTS_DIR}/ (not written by this "
                             f"kdengine dump, or damaged); use a new --out directory")
        parts = _read_parts(self.directory)
        for part_rank, part in parts.items():
            _check_same_dump(part["header"], _header_dict(header), self.directory / part_name(part_rank))
        mine = parts.get(rank)
        self._part = mine if mine is not None else {"rank": rank, "header": _header_dict(header), "shards": []}
        # A listed shard whose file is gone or has another size is not done: it is written again.
        self.done_chunks = {s["chunk"] for s in self._part["shards"]
                            if (self.directory / s["file"]).is_file()
                            and (self.directory / s["file"]).stat().st_size == s["bytes"]}
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        # Only this rank's own leftovers (its lock is held): another rank may be writing its own now.
        with writing(self.directory, "stale temporary files"):
            for path in self.directory.glob(f".shard-*.tmp-r{self.rank:05d}"):
                path.unlink(missing_ok=True)
            part = self.directory / part_name(self.rank)
            remove_stale_temporaries(part)

    def close(self) -> None:
        """Releases the rank's lock (the process ending does too)."""
        self._lock.release()

    def write_shard(self, chunk: int, builder: ShardBuilder) -> dict:
        """Finishes `builder`, writes it as chunk `chunk`'s shard and updates the manifest.

        Returns:
            the shard's manifest entry.
        """
        tensors, sample_ids, counts = builder.finish()
        name = shard_name(chunk)
        metadata = {
            "format": FORMAT_NAME, "version": str(FORMAT_VERSION), "codec": self.header.codec,
            "codec_params": json.dumps(self.header.codec_params, sort_keys=True), "k": str(self.header.k),
            "vocab_size": str(self.header.vocab_size), "tokenizer_fingerprint": self.header.tokenizer_fingerprint,
            "teacher": self.header.teacher, "chunk": str(chunk), "rank": str(self.rank),
            "samples": str(counts["samples"]), "sample_ids": json.dumps(sample_ids),
            "targets": self.header.targets, "top_p": json.dumps(self.header.top_p),
        }
        tmp = self.directory / f".{name}.tmp-r{self.rank:05d}"
        final = self.directory / name
        with writing(self.directory, f"shard {name}", cleanup=tmp):
            try:
                save_file(tensors, str(tmp), metadata=metadata)
            except Exception as exc:  # safetensors wraps the OS error in its own type
                raise OSError(str(exc).rsplit(": ", 1)[-1]) from None
            digest = sha256_file(tmp)
            fsync_path(tmp)
            os.replace(tmp, final)
            fsync_path(self.directory)
        entry = {"file": name, "chunk": chunk, "rank": self.rank, **counts,
                 "bytes": final.stat().st_size, "sha256": digest}
        self._part["shards"] = [s for s in self._part["shards"] if s["chunk"] != chunk] + [entry]
        self._part["shards"].sort(key=lambda s: s["chunk"])
        self._save_part()
        self.done_chunks.add(chunk)
        return entry

    def finish(self, chunks_total: int) -> dict:
        """Marks this rank's share as done and rewrites the manifest; returns the merged manifest."""
        self._part["finished"] = True
        self._part["chunks_total"] = chunks_total
        return self._save_part()

    def _save_part(self) -> dict:
        with writing(self.directory, f"its manifest part {part_name(self.rank)}"):
            write_atomic(self.directory / part_name(self.rank), dump_json(self._part))
            return merge_manifest(self.directory)


def rank_lock_name(rank: int) -> str:
    """The lock a rank's writer holds while it runs (see kdengine/locks.py)."""
    return f".rank-{rank:05d}.lock"


def claim_rank(directory: str | Path, rank: int) -> ProcessLock:
    """Takes rank `rank`'s writer lock on an existing store directory (held until released or the
    process ends), so that a second writer of the rank is refused before it does any work.

    Raises:
        StoreError: another live process holds it (the message names its pid and host), or the lock
            file cannot be written.
    """
    directory = Path(directory)
    with writing(directory, "its lock file"):
        try:
            return hold_lock(directory / rank_lock_name(rank), f"a dump writing rank {rank}")
        except LockHeld as exc:
            raise StoreError(str(exc)) from None


@contextlib.contextmanager
def writing(directory: Path, what: str, *, cleanup: Path | None = None):
    """Turns an OSError while writing into a one-line StoreError naming the directory and the fix,
    removing `cleanup` (a temporary file) first."""
    try:
        yield
    except OSError as exc:
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        raise StoreError(f"{directory}: cannot write {what} ({reason}); free space on that disk or choose a "
                         f"writable --out, then re-run the same command: it continues after the last "
                         f"complete shard") from None


def drop_shards(directory: str | Path, files: list[str]) -> None:
    """Removes shards from their rank's manifest part and deletes their files, so that re-running the
    dump writes them again (`kdengine verify --drop-bad`).

    Raises:
        StoreError: a dump is writing the directory (a rank's lock is held), or the disk refuses the write.
    """
    directory = Path(directory)
    files = set(files)
    with contextlib.ExitStack() as locks, writing(directory, "its manifest parts"):
        for lock in sorted(directory.glob(rank_lock_name(0).replace("00000", "*"))):
            try:
                locks.enter_context(hold_lock(lock, "a dump writing this directory"))
            except LockHeld as exc:
                raise StoreError(f"{exc}; --drop-bad must wait until no dump writes {directory}") from None
        _drop(directory, _read_parts(directory), files)


def _drop(directory: Path, parts: dict, files: set) -> None:
    for part_rank, part in parts.items():
        keep = [s for s in part["shards"] if s["file"] not in files]
        if len(keep) != len(part["shards"]):
            part["shards"] = keep
            part.pop("finished", None)
            write_atomic(directory / part_name(part_rank), dump_json(part))
    for name in files:
        (directory / name).unlink(missing_ok=True)
    if parts:
        merge_manifest(directory)


def merge_manifest(directory: str | Path) -> dict:
    """Rebuilds manifest.json from every rank's part, under an exclusive lock on DIR/.manifest.lock.

    Each rank rewrites only its own part and then merges; the merge re-reads all parts while holding
    the lock, so the last merge to run sees every part written before it and no entry is lost.
    """
    directory = Path(directory)
    with open(directory / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            remove_stale_temporaries(directory / MANIFEST)  # the merge lock is held: nobody writes it now
            parts = _read_parts(directory)
            manifest = _merged(parts)
            write_atomic(directory / MANIFEST, dump_json(manifest))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return manifest


def _merged(parts: dict) -> dict:
    header = next(iter(parts.values()))["header"]
    for rank, part in parts.items():
        if part["header"] != header:
            raise StoreError(f"{part_name(rank)} was written by a dump with other settings than "
                             f"{part_name(next(iter(parts)))}; two different dumps wrote this directory at "
                             f"once; delete it and dump again")
    shards = sorted((s for part in parts.values() for s in part["shards"]), key=lambda s: s["chunk"])
    chunks = [s["chunk"] for s in shards]
    if len(set(chunks)) != len(chunks):
        dup = sorted({c for c in chunks if chunks.count(c) > 1})
        raise StoreError(f"chunks {dup} are listed by more than one rank part in {PARTS_DIR}/; two dumps "
                         f"wrote this directory at once; delete it and dump again")
    totals = {p.get("chunks_total") for p in parts.values() if p.get("finished")}
    chunks_total = totals.pop() if len(totals) == 1 else None
    complete = chunks_total is not None and chunks == list(range(chunks_total))
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "teacher": header["teacher"], "tokenizer_fingerprint": header["tokenizer_fingerprint"],
        "vocab_size": header["vocab_size"], "k": header["k"],
        "targets": header.get("targets", "topk"), "top_p": header.get("top_p"), "sections": header.get("sections", {}),
        "codec": {"name": header["codec"], "params": header["codec_params"]},
        "dump": header["config"],
        "complete": complete,
        "chunks_total": chunks_total,
        "ranks_finished": sorted(r for r, p in parts.items() if p.get("finished")),
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "positions": sum(s["positions"] for s in shards),
        "payload_bytes": sum(s["payload_bytes"] for s in shards),
        "shards": shards,
    }


def _read_parts(directory: Path) -> dict[int, dict]:
    parts = {}
    for path in sorted((directory / PARTS_DIR).glob("rank-*.json")):
        try:
            part = json.loads(path.read_bytes())
            rank = int(part["rank"])
            for i, shard in enumerate(part["shards"]):
                check_shard_entry(shard, f"{path}: shard entry {i}")
            part["header"]["config"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path}: unreadable manifest part ({type(exc).__name__}: {exc}); the store is "
                             f"damaged, dump again into a new --out directory") from None
        parts[rank] = part
    return parts


def _header_dict(header: StoreHeader) -> dict:
    return {"format_version": FORMAT_VERSION, "teacher": header.teacher, "tokenizer_fingerprint": header.tokenizer_fingerprint,
            "vocab_size": header.vocab_size, "k": header.k, "codec": header.codec,
            "codec_params": header.codec_params, "config": header.config, "targets": header.targets,
            "top_p": header.top_p, "sections": header.sections}


def check_dump_settings(directory: str | Path, settings: dict) -> None:
    """Refuses early (before a teacher loads) a directory dumped with other settings.

    Args:
        settings: a subset of the header keys (teacher, k, codec, ..., config); only these are compared.
    Raises:
        StoreError: a key differs (the message names it, both values and what to do), or the
            directory's parts are unreadable.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"{directory}: exists and is not a directory; choose another --out")
    if not (directory / PARTS_DIR).is_dir():
        return
    for part_rank, part in _read_parts(directory).items():
        _check_same_dump(part["header"], settings, directory / part_name(part_rank), only_given=True)


def _check_same_dump(old: dict, new: dict, where: Path, *, only_given: bool = False) -> None:
    flat_old = {**{k: v for k, v in old.items() if k != "config"}, **old.get("config", {})}
    flat_new = {**{k: v for k, v in new.items() if k != "config"}, **new.get("config", {})}
    keys = set(flat_new) if only_given else set(flat_old) | set(flat_new)
    for key in sorted(keys):
        if flat_old.get(key) != flat_new.get(key):
            raise StoreError(
                f"{where.parent.parent} was dumped with {key}={flat_old.get(key)!r}, this run has "
                f"{key}={flat_new.get(key)!r} ({where} records the first). To continue that dump, re-run it "
                f"with the same settings; to start a new one, use another --out directory.")
