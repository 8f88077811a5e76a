"""`kdengine dump`: corpus -> teacher -> top-k store.

    summary = dump(DumpConfig(teacher="model.gguf", data="corpus.jsonl", out="store/", top_k=64))

The corpus is validated before the teacher loads. Its kept samples are cut into chunks of
`shard_samples`; chunk c is one shard, written by rank c mod W (FORMAT.md). Within a chunk, samples
are sorted by length and batched, the teacher's logits are reduced to top-k log-probs on its device
at the target positions only, and the shared producer (producer.py, also behind `kdengine generate`)
encodes and writes shards in a worker thread while the teacher runs the next batch. Re-running the same command skips every chunk already in the store; a run with other
settings is refused before the teacher loads.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from kdengine.checksum import sha256_file
from kdengine.corpus import Sample, check_corpus, padded_batches, tokenize_corpus
from kdengine.producer import plan_chunks, write_chunks
from kdengine.sampling import teacher_draws
from kdengine.store import StoreHeader, StoreWriter, codec_names
from kdengine.store.codec import DEFAULT_CODEC, SAMPLED_CODEC, codec_unavailable, default_params
from kdengine.store.format import TARGET_MODES, TEMPERED_LSE, tempered_lse_spec
from kdengine.store.format import disk_bytes
from kdengine.store.writer import check_dump_settings, claim_rank
from kdengine.teachers import load_teacher, topk_logprobs


@dataclass
class DumpConfig:
    """Settings of one dump (the CLI's options). rank/world_size None: from torchrun's RANK and
    WORLD_SIZE environment variables, else a single rank."""

    teacher: str
    data: str
    out: str
    top_k: int
    backend: str = "hf"
    max_length: int | None = None
    batch_size: int = 8
    shard_samples: int = 1024
    device: str | None = None  # None: the backend's default (hf: cpu; exl2: every visible GPU)
    dtype: str | None = None  # None: the backend's default (hf: fp32; exl2: fp16)
    backend_opts: dict = field(default_factory=dict)  # options only the backend knows (exl2: gpu_split)
    chat: bool = False
    skip_bad_lines: bool = False
    codec: str = DEFAULT_CODEC
    targets: str = "topk"  # or "sample": `samples` draws per position (RS-KD), codec `sampled`
    samples: int = 12
    proposal_temperature: float = 1.0
    exact_top: int = 0  # with targets="sample": the teacher's H most likely ids kept exactly, draws off them
    seed: int = 0
    top_p: float | None = None  # adaptive K: keep the smallest prefix with this mass, at most top_k entries
    temperatures: tuple[float, ...] = ()  # also store c_T per position for each (FORMAT.md, "Section tempered_lse")
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True


@dataclass
class DumpSummary:
    """What one run of one rank did, plus the store's state after it."""

    rank: int
    world_size: int
    samples: int = 0
    tokens: int = 0
    positions: int = 0
    payload_bytes: int = 0
    store_bytes: int = 0  # every file in the store directory after this run
    store_positions: int = 0  # target positions of the whole store after this run
    shards_written: int = 0
    shards_already_done: int = 0
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)
    bad_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    encoder_cpu_seconds: float = 0.0  # CPU time of the encoder thread (encoding + writing shards)
    store_complete: bool = False
    context_length: int | None = None  # the teacher's context: longer samples are refused unless truncated

    @property
    def bytes_per_position(self) -> float:
        """The store's size on disk (every file) per target position: the figure `kdengine inspect` shows."""
        return self.store_bytes / self.store_positions if self.store_positions else float("nan")

    @property
    def payload_bytes_per_position(self) -> float:
        """This run's codec frames alone, per target position."""
        return self.payload_bytes / self.positions if self.positions else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


class DumpError(Exception):
    """A dump that cannot start or go on; the message says why and what to do."""


def dump(cfg: DumpConfig, *, teacher=None) -> DumpSummary:
    """Runs the dump for this process's rank.

    Args:
        cfg: the settings.
        teacher: an already loaded teacher for cfg.teacher (e.g. to time several runs); default: load it.

    Raises:
        DumpError: bad settings (rank, sizes).
        kdengine.corpus.CorpusError: a malformed corpus (file:line).
        kdengine.teachers.TeacherError: the teacher cannot be loaded.
        kdengine.store.StoreError: the output directory holds a different dump, is damaged, is being
            written by another process for this rank, or its disk is full or read-only.
    """
    rank, world_size = resolve_rank(cfg.rank, cfg.world_size)
    for name in ("top_k", "batch_size", "shard_samples"):
        if getattr(cfg, name) < 1:
            raise DumpError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    sampled = cfg.targets == "sample"
    codec, k, codec_params = store_targets(cfg.targets, top_k=cfg.top_k, codec=cfg.codec, samples=cfg.samples,
                                           proposal_temperature=cfg.proposal_temperature, seed=cfg.seed,
                                           exact_top=cfg.exact_top, error=DumpError)
    if cfg.top_p is not None:
        if not 0 < cfg.top_p <= 1:
            raise DumpError(f"--top-p must be in (0, 1], got {cfg.top_p}")
        if sampled:
            raise DumpError("--top-p (adaptive K) is for top-k targets; --targets sample draws --samples ids instead")
        if cfg.codec != "sqrt_ac":
            raise DumpError(f"--top-p (adaptive K) needs --codec sqrt_ac; codec {cfg.codec!r} stores K entries per row")
    sections = temperature_sections(cfg.temperatures, sampled=sampled, error=DumpError)
    checked = check_corpus(cfg.data, skip_bad_lines=cfg.skip_bad_lines)  # fail fast, before the model loads
    config = _config(cfg, sha256_file(cfg.data), world_size)
    check_dump_settings(cfg.out, {"k": k, "codec": codec, "codec_params": codec_params, "top_p": cfg.top_p,
                                  "sections": sections, "config": config})
    lock = claim_rank(cfg.out, rank) if Path(cfg.out).is_dir() else None  # refuse a second writer before any work
    try:
        device = cfg.device
        if device == "cuda" and world_size > 1 and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        if teacher is None:
            teacher = load_teacher(cfg.teacher, backend=cfg.backend, device=device, dtype=cfg.dtype, **cfg.backend_opts)
        context_length = getattr(teacher, "context_length", None)
        corpus = tokenize_corpus(checked, teacher.tokenizer, chat=cfg.chat, max_length=cfg.max_length,
                                 context_length=context_length, skip_bad_lines=cfg.skip_bad_lines,
                                 progress=cfg.progress and rank == 0)
        if not corpus.samples:
            reasons = corpus.skipped + corpus.bad_lines
            raise DumpError(f"{cfg.data}: no sample has a target position, so there is nothing to store "
                            f"({len(reasons)} skipped; the first: {reasons[0] if reasons else 'none'}); a store "
                            f"needs at least one target")
        header = StoreHeader(teacher=teacher.name, tokenizer_fingerprint=teacher.fingerprint,
                             vocab_size=teacher.vocab_size, k=k, codec=codec, codec_params=codec_params,
                             config=config, targets=cfg.targets, top_p=cfg.top_p, sections=sections)
        if not sampled and cfg.top_k > teacher.vocab_size:
            raise DumpError(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({teacher.vocab_size})")
        writer = StoreWriter(cfg.out, header, rank=rank, world_size=world_size, lock=lock)
        try:
            return _write(cfg, writer, teacher, header, corpus, rank, world_size, context_length)
        finally:
            writer.close()
    finally:
        if lock is not None:  # idempotent; covers a failure before the writer took the lock over
            lock.release()


def _write(cfg, writer, teacher, header, corpus, rank, world_size, context_length) -> DumpSummary:
    sampled = cfg.targets == "sample"
    samples = corpus.samples
    plan = plan_chunks(math.ceil(len(samples) / cfg.shard_samples), rank, world_size, writer.done_chunks)
    summary = DumpSummary(rank=rank, world_size=world_size, truncated=corpus.truncated, skipped=corpus.skipped,
                          bad_lines=corpus.bad_lines, shards_already_done=plan.already_done,
                          context_length=context_length)
    chunk_samples = {c: samples[c * cfg.shard_samples:(c + 1) * cfg.shard_samples] for c in plan.todo}
    total_tokens = sum(len(s.input_ids) for c in plan.todo for s in chunk_samples[c])
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"dump rank {rank}" if world_size > 1 else "dump",
               disable=not cfg.progress, smoothing=0.1)

    def targets(chunk):
        if sampled:
            items = teacher_draws(teacher, chunk_samples[chunk], cfg.samples, cfg.batch_size,
                                  proposal_temperature=cfg.proposal_temperature, exact_top=cfg.exact_top,
                                  seed=cfg.seed)
        else:
            items = teacher_topk(teacher, chunk_samples[chunk], cfg.top_k, cfg.batch_size,
                                 temperatures=cfg.temperatures)
        for sample, target in items:
            bar.update(len(sample.input_ids))
            yield sample, target

    try:
        produced = write_chunks(writer, header, ((c, targets(c)) for c in plan.todo))
    finally:
        bar.close()
    summary.seconds = produced.seconds
    summary.encoder_cpu_seconds = produced.encoder_cpu_seconds
    for key in ("samples", "tokens", "positions", "payload_bytes"):
        setattr(summary, key, produced.total(key))
    summary.shards_written = len(produced.entries)
    manifest = writer.finish(plan.chunks_total)
    summary.store_complete = bool(manifest["complete"])
    summary.store_bytes = disk_bytes(cfg.out)
    summary.store_positions = manifest["positions"]
    return summary


def teacher_topk(teacher, samples: Sequence[Sample], k: int, batch_size: int, *,
                 temperatures: Sequence[float] = ()) -> Iterator[tuple[Sample, tuple]]:
    """The teacher's top-k at every target position of every sample, batched by length.

    Samples are sorted by length (longest first) and cut into batches of `batch_size`; the top-k is
    taken on the teacher's device at the target rows only, and only K ids and log-probs per position
    (and c_T per asked temperature) are copied to the CPU.

    Yields:
        (sample, (idx int32 [P, K], logp float32 [P, K])) per sample, in batch order; with
        `temperatures`, (sample, (idx, logp, {"tempered_lse": float32 [P, len(temperatures)]})).
    """
    for b in padded_batches(samples, batch_size):
        with torch.inference_mode():
            logits = teacher.logits(b.input_ids, b.lengths)
            top = topk_logprobs(logits[b.rows.to(logits.device), b.cols.to(logits.device)], k,
                                temperatures=temperatures)
            idx, logp = top.idx.cpu().numpy(), top.logp.cpu().numpy()
            lse = top.tempered_lse.cpu().numpy() if temperatures else None
        at = 0
        for s in b.samples:
            n = len(s.positions)
            rows = slice(at, at + n)
            yield s, (idx[rows], logp[rows]) + (({TEMPERED_LSE: lse[rows]},) if temperatures else ())
            at += n


def store_targets(targets: str, *, top_k: int, codec: str, samples: int, proposal_temperature: float, seed: int,
                  error: type[Exception], exact_top: int = 0) -> tuple[str, int, dict]:
    """(codec, k, codec params) of a new store with `--targets` `targets`, after checking the options
    (dump's and generate's one definition): topk keeps `top_k` entries with `codec`; sample keeps
    `samples` draws per position (after an exact head of `exact_top` ids) with the sampled codec, whose
    params record the draws' settings."""
    if exact_top and targets != "sample":
        raise error(f"--exact-top applies to --targets sample only, got --targets {targets}")
    if targets not in TARGET_MODES:
        raise error(f"--targets must be one of {', '.join(TARGET_MODES)}, got {targets!r}")
    if targets == "sample":
        if not 1 <= samples <= 255:
            raise error(f"--samples must be in [1, 255], got {samples}")
        if not 0 < proposal_temperature < float("inf"):
            raise error(f"--proposal-temperature must be a finite number > 0, got {proposal_temperature}")
        if not 0 <= exact_top <= 255 or (exact_top and proposal_temperature != 1):
            raise error(f"--exact-top must be in [0, 255] and needs --proposal-temperature 1, got {exact_top} "
                        f"with --proposal-temperature {proposal_temperature}")
        codec, k = SAMPLED_CODEC, samples + exact_top
        params = {"samples": samples, "proposal_temperature": float(proposal_temperature), "seed": int(seed),
                  "zstd_level": 3, **({"exact_top": exact_top} if exact_top else {})}
    elif codec not in codec_names():
        raise error(f"unknown codec {codec!r}; choose one of {', '.join(codec_names())}")
    else:
        k, params = top_k, default_params(codec)
    unavailable = codec_unavailable(codec)
    if unavailable:
        raise error(unavailable)
    return codec, k, params


def temperature_sections(temperatures: Sequence[float], *, sampled: bool, error: type[Exception]) -> dict:
    """The store's sections for `--temperatures` (none without it), after checking the list."""
    if not temperatures:
        return {}
    if sampled:
        raise error("--temperatures is for top-k targets; a sampled-target store trains at its proposal "
                    "temperature (or at 1) without a normaliser")
    bad = [t for t in temperatures if not 0 < t < float("inf")]
    if bad or len(set(temperatures)) != len(temperatures):
        raise error(f"--temperatures must be distinct finite numbers > 0, got {','.join(map(str, temperatures))}")
    return {TEMPERED_LSE: tempered_lse_spec(temperatures)}


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the options if given, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise DumpError("give both --rank and --world-size, or neither (torchrun sets RANK and WORLD_SIZE)")
    if rank is None:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise DumpError(f"rank must be in [0, world size), got rank {rank} of world size {world_size}")
    return rank, world_size


def _config(cfg: DumpConfig, data_sha256: str, world_size: int) -> dict:
    """The settings a resumed dump must repeat (FORMAT.md): what changes a shard's contents or owner."""
    return {"teacher_path": str(Path(cfg.teacher).expanduser().resolve()), "data": str(Path(cfg.data).resolve()),
            "data_sha256": data_sha256, "max_length": cfg.max_length,
            "chat": cfg.chat, "skip_bad_lines": cfg.skip_bad_lines, "shard_samples": cfg.shard_samples,
            "world_size": world_size, "backend": cfg.backend, "dtype": cfg.dtype}

