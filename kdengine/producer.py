"""The one producer path into a store, shared by `kdengine dump` and `kdengine generate`.

A front end turns its input into chunks of samples, each sample with the teacher's targets at its
target positions; this module owns everything after that: which chunks this rank writes and which
are done already (`plan_chunks`), and a worker thread that encodes samples with the store's codec and
writes each finished chunk as one shard through the `StoreWriter` (`write_chunks`), so the teacher
never waits on compression or disk.

    plan = plan_chunks(n_chunks, rank, world_size, writer.done_chunks)
    produced = write_chunks(writer, header, ((c, targets_of(c)) for c in plan.todo))
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from kdengine.corpus import Sample
from kdengine.store import ShardBuilder, StoreError, StoreHeader, StoreWriter

# One sample and its targets, P = len(sample.positions): for a top-k store (idx int32 [P, K],
# logp float32 [P, K]); for a sampled-target store a kdengine.sampling.TeacherDraws.
Targets = tuple[Sample, object]


@dataclass(frozen=True)
class ChunkPlan:
    """This rank's share of a store: chunk c belongs to rank c mod W (FORMAT.md)."""

    chunks_total: int
    mine: list[int]
    todo: list[int]  # mine, minus those already complete in the store

    @property
    def already_done(self) -> int:
        return len(self.mine) - len(self.todo)


def plan_chunks(chunks_total: int, rank: int, world_size: int, done: Iterable[int]) -> ChunkPlan:
    done = set(done)
    mine = [c for c in range(chunks_total) if c % world_size == rank]
    return ChunkPlan(chunks_total, mine, [c for c in mine if c not in done])


@dataclass
class Produced:
    """What `write_chunks` wrote: the new shards' manifest entries and the time spent."""

    entries: list[dict]
    seconds: float
    encoder_cpu_seconds: float  # CPU time of the encoder thread (encoding + writing shards)

    def total(self, key: str) -> int:
        return sum(entry[key] for entry in self.entries)


def write_chunks(writer: StoreWriter, header: StoreHeader, chunks: Iterable[tuple[int, Iterable[Targets]]]
                 ) -> Produced:
    """Encodes and writes every chunk: one shard per (chunk, samples) pair, in the order given.

    The samples of a chunk are consumed in the caller's thread (that is where the teacher runs) and
    encoded in a worker thread; a chunk's shard is written once its iterator is exhausted. On any
    error the shard in hand is never published (it is renamed into place only when complete).
    """
    encoder = _ShardEncoder(writer, header)
    start = time.perf_counter()
    try:
        for chunk, samples in chunks:
            encoder.begin(chunk)
            n = 0
            for sample, targets in samples:
                encoder.put(sample, targets)
                n += 1
            encoder.end(chunk, n)
        entries = encoder.close()
    except BaseException:
        encoder.abort()
        raise
    return Produced(entries, time.perf_counter() - start, encoder.cpu_seconds)


class _ShardEncoder:
    """A worker thread that encodes samples and writes finished shards. An error in the worker is
    raised in the caller at its next call."""

    def __init__(self, writer: StoreWriter, header: StoreHeader, max_pending: int = 256):
        self.writer, self.header = writer, header
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._written: list[dict] = []
        self.cpu_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kdengine-shard-encoder", daemon=True)
        self._thread.start()

    def begin(self, chunk: int) -> None:
        self._send(("begin", chunk))

    def put(self, sample: Sample, targets) -> None:
        self._send(("sample", sample, targets))

    def end(self, chunk: int, n_samples: int) -> None:
        self._send(("end", chunk, n_samples))

    def close(self) -> list[dict]:
        """Waits for every queued shard to be written; returns their manifest entries."""
        self._send(None)
        self._thread.join()
        self._raise()
        return self._written

    def abort(self) -> None:
        """Stops after the item in hand; a shard not yet renamed is simply never published."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def _send(self, item) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        builder = None
        start = time.thread_time()
        try:
            while not self._stop.is_set():
                item = self._queue.get()
                if item is None:
                    return
                if item[0] == "begin":
                    builder = ShardBuilder(self.header)
                elif item[0] == "sample":
                    _, s, targets = item
                    if self.header.targets == "sample":
                        builder.add_draws(s.index, s.id, s.input_ids, s.positions, targets)
                    else:
                        builder.add(s.index, s.id, s.input_ids, s.positions, *targets)
                else:
                    _, chunk, expected = item
                    if len(builder) != expected:
                        raise StoreError(f"chunk {chunk}: {len(builder)} samples encoded, expected {expected}")
                    self._written.append(self.writer.write_shard(chunk, builder))
                    builder = None
        except BaseException as exc:  # handed to the teacher's thread
            self._error = exc
        finally:
            self.cpu_seconds = time.thread_time() - start

