"""`kdengine generate`: the teacher writes answers, and its top-k (or, with targets="sample", RS-KD
draws) at every generated position goes into an ordinary store in the same pass.

    summary = generate(GenerateConfig(teacher="teacher/", data="gsm8k_train.jsonl", out="store/", top_k=64,
                                      chat=True, samples_per_prompt=4, temperature=0.7, keep_correct="gsm8k"))

Input lines (an optional "id", string or integer, names the prompt; default: the line number):

    {"prompt": "..."}                          a "response" beside it is ignored
    {"question": "...", "answer": "... #### 18"}   GSM8K: prompted as `kdengine eval gsm8k` prompts it
    {"messages": [..., {"role": "user", ...}]}  the last turn must be the user's

Each prompt gets `samples_per_prompt` responses, decoded by kdengine.decode (greedy, or sampled with a
generator per response seeded from (seed, prompt id, sample number)). A response is one store
sample: input_ids = prompt tokens + response tokens (with its EOS when it ended on one), target
positions = the response tokens (position t holds the teacher's T = 1 top-k predicting token t + 1),
so `kdengine train` reads it like any dump. With targets="sample" position t holds `samples` draws
from the teacher's distribution instead (as `kdengine dump --targets sample` stores them), store
sample i drawing from its own generator seeded by (seed, i) (kdengine.sampling.sample_seed), apart
from the one that picks its tokens: the responses are those of a top-k run with the same settings.
With `keep_correct="gsm8k"` only responses whose answer (the evaluator's extraction) equals the
reference go into the store (rejection sampling). With `choices`, nothing is generated: the teacher
scores each choice as the continuation of the prompt, and the most likely one is the response.

Prompts are cut into chunks of `shard_prompts`; chunk c is one shard, written by rank c mod W, through
the same producer as the dump (producer.py): atomic shards, resume after the last complete one, one
manifest. Beside it, OUT/responses/chunk-NNNNNN.jsonl is written (atomically) before its shard, and
OUT/responses.jsonl, every response in order, once the store is complete.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from kdengine.corpus import ROLES, Sample
from kdengine.decode import SampleCapture, Sampling, TopKCapture, decode_batch, response_generator, topk_targets
from kdengine.checksum import sha256_file
from kdengine.dump import DumpError, resolve_rank, store_targets, temperature_sections
from kdengine.durable import write_atomic
from kdengine.jsonl import read_jsonl
from kdengine.producer import plan_chunks, write_chunks
from kdengine.progress import TokenBar
from kdengine.sampling import draw_targets, sample_seed
from kdengine.store import StoreHeader, StoreWriter
from kdengine.store.codec import DEFAULT_CODEC
from kdengine.store.writer import check_dump_settings, claim_rank
from kdengine.teachers import encode_chat, encode_text, load_teacher, topk_logprobs

RESPONSES = "responses.jsonl"
RESPONSES_DIR = "responses"
KEEP_CORRECT = ("gsm8k",)


class GenerateError(DumpError):
    """Settings or input that `generate` refuses; the message names the file (and line) and the fix."""


@dataclass
class GenerateConfig:
    """Settings of one generation run (the CLI's options; see `kdengine generate --help`)."""

    teacher: str
    data: str
    out: str
    top_k: int
    backend: str = "hf"
    chat: bool = False
    max_new_tokens: int = 256
    samples_per_prompt: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    keep_correct: str | None = None
    choices: list[str] | None = None
    stop: list[str] = field(default_factory=list)
    shard_prompts: int = 256
    device: str | None = None
    dtype: str | None = None
    backend_opts: dict = field(default_factory=dict)
    codec: str = DEFAULT_CODEC
    targets: str = "topk"  # or "sample": `samples` draws per position (RS-KD), codec `sampled`, as for dump
    samples: int = 12
    proposal_temperature: float = 1.0
    exact_top: int = 0  # with targets="sample": the teacher's H most likely ids kept exactly, draws off them
    temperatures: tuple[float, ...] = ()  # store c_T for each (as `kdengine dump --temperatures`); not sampling
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class PromptLine:
    """One input line. kind: "prompt", "gsm8k" or "messages"; `prompt` is the text (the question for
    GSM8K), `messages` the conversation, `answer` the GSM8K reference solution (or None)."""

    line: int
    id: str
    kind: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    answer: str | None = None


@dataclass
class GenerateSummary:
    """What one run of one rank did (`responses`..`payload_bytes`: this run's new shards only)."""

    rank: int
    world_size: int
    prompts: int = 0
    responses: int = 0
    stored: int = 0
    correct: int = 0
    new_tokens: int = 0
    positions: int = 0
    payload_bytes: int = 0
    shards_written: int = 0
    shards_already_done: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    finish: dict = field(default_factory=dict)
    store_complete: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else float("nan")

    @property
    def acceptance(self) -> float:
        return self.stored / self.responses if self.responses else float("nan")

    @property
    def bytes_per_position(self) -> float:
        return self.payload_bytes / self.positions if self.positions else float("nan")


def generate(cfg: GenerateConfig, *, teacher=None) -> GenerateSummary:
    """Runs the generation for this process's rank (see the module docstring).

    Args:
        cfg: the settings.
        teacher: an already loaded teacher for cfg.teacher; default: load it.
    Raises:
        GenerateError: bad settings or a bad input line (file:line), before anything is written.
        kdengine.teachers.TeacherError: the teacher cannot be loaded.
        kdengine.store.StoreError: the output directory holds a different run, or is damaged.
    """
    rank, world_size = resolve_rank(cfg.rank, cfg.world_size)
    _check_settings(cfg)
    codec, k, codec_params = store_targets(cfg.targets, top_k=cfg.top_k, codec=cfg.codec, samples=cfg.samples,
                                           proposal_temperature=cfg.proposal_temperature, seed=cfg.seed,
                                           exact_top=cfg.exact_top,
                                           error=GenerateError)
    sections = temperature_sections(cfg.temperatures, sampled=cfg.targets == "sample", error=GenerateError)
    lines = read_prompts(cfg.data, needs_reference=cfg.keep_correct == "gsm8k")
    config = _config(cfg, sha256_file(cfg.data), world_size)
    check_dump_settings(cfg.out, {"k": k, "codec": codec, "codec_params": codec_params, "sections": sections,
                                  "config": config})
    lock = claim_rank(cfg.out, rank) if Path(cfg.out).is_dir() else None  # refuse a second writer before any work
    try:
        if teacher is None:
            opts = {"max_batch_size": cfg.batch_size, **cfg.backend_opts} if cfg.backend == "exl2" else cfg.backend_opts
            teacher = load_teacher(cfg.teacher, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype, **opts)
        if cfg.targets == "topk" and cfg.top_k > teacher.vocab_size:
            raise GenerateError(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({teacher.vocab_size}); "
                                f"use --top-k {teacher.vocab_size} or less")
        prompt_ids = [_encode_prompt(line, teacher.tokenizer, cfg.chat, cfg.data) for line in lines]
        header = StoreHeader(teacher=teacher.name, tokenizer_fingerprint=teacher.fingerprint,
                             vocab_size=teacher.vocab_size, k=k, codec=codec, codec_params=codec_params,
                             config=config, targets=cfg.targets, sections=sections)
        writer = StoreWriter(cfg.out, header, rank=rank, world_size=world_size, lock=lock)
        try:
            return _write(cfg, writer, header, teacher, lines, prompt_ids, rank, world_size)
        finally:
            writer.close()
    finally:
        if lock is not None:  # idempotent; covers a failure before the writer took the lock over
            lock.release()


def _write(cfg, writer, header, teacher, lines, prompt_ids, rank, world_size) -> GenerateSummary:
    plan = plan_chunks(math.ceil(len(lines) / cfg.shard_prompts), rank, world_size, writer.done_chunks)
    summary = GenerateSummary(rank=rank, world_size=world_size, shards_already_done=plan.already_done)
    todo_prompts = sum(len(_chunk_range(c, cfg.shard_prompts, len(lines))) for c in plan.todo)
    desc = f"generate rank {rank}" if world_size > 1 else "generate"
    if cfg.choices:
        bar = tqdm(total=todo_prompts, unit="prompt", desc=desc, disable=not cfg.progress)
    else:
        bar = TokenBar(todo_prompts * cfg.samples_per_prompt, cfg.max_new_tokens, desc=desc, disable=not cfg.progress)
    run = _Run(cfg, teacher, lines, prompt_ids, summary, bar)
    start = time.perf_counter()
    try:
        produced = write_chunks(writer, header, ((c, run.chunk(c)) for c in plan.todo))
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    summary.positions, summary.payload_bytes = produced.total("positions"), produced.total("payload_bytes")
    summary.shards_written = len(produced.entries)
    summary.store_complete = bool(writer.finish(plan.chunks_total)["complete"])
    if summary.store_complete:
        merge_responses(cfg.out, plan.chunks_total)
    return summary


class _Run:
    """The per-chunk work of one run: decode (or score choices), record responses, yield store samples."""

    def __init__(self, cfg: GenerateConfig, teacher, lines: list[PromptLine], prompt_ids: list[list[int]],
                 summary: GenerateSummary, bar):
        self.cfg, self.teacher, self.lines, self.prompt_ids = cfg, teacher, lines, prompt_ids
        self.summary, self.bar = summary, bar
        self.sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed)
        self.sampled = cfg.targets == "sample"
        self.topk = TopKCapture(cfg.top_k, cfg.temperatures)

    def chunk(self, c: int) -> Iterator[tuple]:
        prompts = _chunk_range(c, self.cfg.shard_prompts, len(self.lines))
        self.summary.prompts += len(prompts)
        records = []
        produce = self._choices if self.cfg.choices else self._decode
        for record, stored in produce(prompts):
            records.append(record)
            self.summary.responses += 1
            self.summary.finish[record["finish"]] = self.summary.finish.get(record["finish"], 0) + 1
            self.summary.correct += bool(record.get("correct"))
            if stored is not None:
                self.summary.stored += 1
                yield stored
        records.sort(key=lambda r: r["_index"])
        body = "".join(json.dumps({k: v for k, v in r.items() if k != "_index"}) + "\n" for r in records)
        directory = Path(self.cfg.out) / RESPONSES_DIR
        directory.mkdir(exist_ok=True)
        write_atomic(directory / responses_part(c), body.encode())  # before the shard: shard => responses

    def _decode(self, prompts: range):
        cfg = self.cfg
        n = cfg.samples_per_prompt
        units = [(p, j) for p in prompts for j in range(n)]
        units.sort(key=lambda u: (-len(self.prompt_ids[u[0]]), u))  # long first: little padding, OOM early
        stop = cfg.stop or self._default_stop()
        for first in range(0, len(units), cfg.batch_size):
            batch = units[first:first + cfg.batch_size]
            generators = [None if self.sampling.greedy else response_generator(cfg.seed, self.lines[p].id, j)
                          for p, j in batch]
            capture = (SampleCapture(cfg.samples, cfg.proposal_temperature,
                                     [sample_seed(cfg.seed, self._index(p, j)) for p, j in batch], cfg.exact_top)
                       if self.sampled else self.topk)
            started = time.perf_counter()
            decoded = decode_batch(self.teacher, [self.prompt_ids[p] for p, _ in batch], generators,
                                   sampling=self.sampling, max_new_tokens=cfg.max_new_tokens, capture=capture,
                                   stop=stop, on_step=self.bar.step)
            self.summary.decode_seconds += time.perf_counter() - started
            self.bar.batch_done(len(batch), sum(d.generated for d in decoded))
            for (p, j), d in zip(batch, decoded):
                self.summary.new_tokens += d.generated
                record, stored = self._record(p, j, d.text, d.tokens, d.finish, d.targets)
                record["new_tokens"] = d.generated
                yield record, stored

    def _default_stop(self) -> list[str]:
        from kdengine.evals.generation import STOP  # plain GSM8K prompts stop where `eval gsm8k` stops

        return list(STOP) if not self.cfg.chat and any(line.kind == "gsm8k" for line in self.lines) else []

    def _index(self, p: int, j: int) -> int:
        """The store index of prompt p's response j."""
        return p * self.cfg.samples_per_prompt + j

    def _record(self, p: int, j: int, text: str, tokens: list[int], finish: str, targets):
        """(its responses.jsonl record, (its store sample, `targets`)); the second is None when not stored."""
        line, index = self.lines[p], self._index(p, j)
        record = {"_index": index, "id": f"{line.id}/{j}", "prompt_id": line.id, "sample": j,
                  "prompt": [dict(role=r, content=c) for r, c in line.messages] if line.kind == "messages"
                  else line.prompt,
                  "response": text, "new_tokens": len(tokens), "finish": finish}
        keep = len(tokens) > 0
        if line.kind == "gsm8k" and line.answer is not None:
            from kdengine.evals.gsm8k import extract_answer, is_correct, parse_reference

            prediction, rule = extract_answer(text)
            record.update(prediction=prediction, rule=rule,
                          correct=is_correct(prediction, rule, parse_reference(line.answer)))
            if self.cfg.keep_correct == "gsm8k":
                keep = keep and record["correct"]
        record["stored"] = keep
        if not keep:
            return record, None
        prompt = self.prompt_ids[p]
        ids = np.asarray(list(prompt) + list(tokens), dtype=np.int32)
        positions = np.arange(len(prompt) - 1, len(ids) - 1, dtype=np.int32)
        return record, (Sample(index=index, id=record["id"], line=line.line, input_ids=ids, positions=positions),
                        targets)

    def _choices(self, prompts: range):
        """Scores every choice as the prompt's continuation (summed log-prob of its tokens, as lm-eval
        scores multiple choice); the argmax is the response, stored with its EOS and the teacher's
        targets at those positions (`_forced_targets`), from the same forward pass."""
        tok = self.teacher.tokenizer
        eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
        delimiter = "" if self.cfg.chat else " "
        conts = [tok(delimiter + c, add_special_tokens=False)["input_ids"] for c in self.cfg.choices]
        for first in range(0, len(prompts), self.cfg.batch_size):
            batch = list(prompts[first:first + self.cfg.batch_size])
            seqs = [(p, c, list(self.prompt_ids[p]) + conts[c] + eos) for p in batch for c in range(len(conts))]
            width = max(len(s) for _, _, s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, (_, _, s) in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s)
            lengths = torch.tensor([len(s) for _, _, s in seqs])
            started = time.perf_counter()
            with torch.inference_mode():
                logits = self.teacher.logits(ids, lengths)
                logp = logits.float().log_softmax(-1)
                targets = ids[:, 1:].to(logp.device)
                token_logp = logp[:, :-1].gather(-1, targets[..., None])[..., 0].cpu()
                for i, p in enumerate(batch):
                    rows = range(i * len(conts), (i + 1) * len(conts))
                    start = len(self.prompt_ids[p]) - 1
                    scores = torch.tensor([float(token_logp[r, start:start + len(cont)].double().sum())
                                           for r, cont in zip(rows, conts)], dtype=torch.float64)
                    probs = torch.softmax(scores, 0).tolist()
                    best = int(np.argmax(probs))
                    row = rows[best]
                    seq = seqs[row][2]
                    targets = self._forced_targets(logits[row, start:len(seq) - 1], self._index(p, 0))
                    record, stored = self._record(p, 0, self.cfg.choices[best], seq[start + 1:], "eos" if eos else
                                                  "length", targets)
                    record["choices"] = dict(zip(self.cfg.choices, probs))
                    record["label"] = self.cfg.choices[best]
                    record["new_tokens"] = 0  # nothing generated: the label's tokens were scored
                    record["finish"] = "choice"
                    yield record, stored
                self.summary.decode_seconds += time.perf_counter() - started
            self.bar.update(len(batch))


    def _forced_targets(self, logits: torch.Tensor, index: int):
        """The targets of store sample `index` from its teacher-forced logits [P, V]: its top-k, or its
        draws from its own generator, as the dump draws a sample's (kdengine.sampling.teacher_draws)."""
        if self.sampled:
            generator = torch.Generator(device=logits.device).manual_seed(sample_seed(self.cfg.seed, index))
            return draw_targets(logits, self.cfg.samples, proposal_temperature=self.cfg.proposal_temperature,
                                exact_top=self.cfg.exact_top, generator=generator)
        top = topk_logprobs(logits, self.cfg.top_k, temperatures=self.cfg.temperatures)
        return topk_targets(top.idx.cpu().numpy(), top.logp.cpu().numpy(),
                            None if top.tempered_lse is None else top.tempered_lse.cpu().numpy())


def read_prompts(path: str | Path, *, needs_reference: bool = False) -> list[PromptLine]:
    """Every prompt line of a JSONL file, checked before any model loads (formats: module docstring).

    Raises:
        GenerateError: `file:line: what is wrong; the fix` for the first bad line, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: no such file; --data takes a JSONL file of prompts")
    lines, seen = [], {}
    for lineno, value in read_jsonl(path):
        try:
            if isinstance(value, Exception):
                raise value
            line = _parse_prompt_line(value, lineno, needs_reference)
        except ValueError as e:
            raise GenerateError(f"{path}:{lineno}: {e}") from None
        if line.id in seen:
            raise GenerateError(f'{path}:{lineno}: duplicate id "{line.id}" (first used on line {seen[line.id]}); '
                                "give every line its own id")
        seen[line.id] = lineno
        lines.append(line)
    if not lines:
        raise GenerateError(f"{path}: no prompts: expected one JSON object per line")
    return lines


def _parse_prompt_line(obj, lineno: int, needs_reference: bool) -> PromptLine:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object with \"prompt\", \"question\" or \"messages\"")
    kinds = [k for k in ("prompt", "question", "messages") if k in obj]
    if len(kinds) != 1:
        what = "no prompt field" if not kinds else f"several prompt fields ({', '.join(kinds)})"
        raise ValueError(f'{what}: give exactly one of "prompt", "question" (GSM8K) or "messages" '
                         f"(got keys {sorted(obj)})")
    sample_id = obj.get("id", lineno)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or not str(sample_id).strip():
        raise ValueError('"id" must be a non-empty string or an integer')
    kind = kinds[0]
    if kind == "messages":
        messages = _messages(obj["messages"])
        return PromptLine(lineno, str(sample_id), "messages", messages=messages)
    text = obj[kind]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f'"{kind}" must be a non-empty string')
    answer = obj.get("answer") if kind == "question" else None
    if answer is not None and not isinstance(answer, str):
        raise ValueError('"answer" must be a string (a GSM8K solution ending in "#### N")')
    if needs_reference:
        from kdengine.evals.gsm8k import parse_reference

        if kind != "question" or answer is None:
            raise ValueError('--keep-correct gsm8k needs GSM8K lines: "question" and "answer" ending in "#### N"')
        try:
            parse_reference(answer)
        except ValueError as e:
            raise ValueError(f"{e}; --keep-correct gsm8k needs a reference on every line") from None
    return PromptLine(lineno, str(sample_id), "gsm8k" if kind == "question" else "prompt", prompt=text,
                      answer=answer)


def _messages(value) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('"messages" must be a non-empty array of {"role", "content"} objects')
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f'messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": a string}}')
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "user":
        raise ValueError(f'"messages" ends with a {turns[-1][0]} turn; the teacher answers the last turn, so it must '
                         "be the user's: drop the trailing turns (or use `kdengine dump` to score existing answers)")
    return tuple(turns)


def _encode_prompt(line: PromptLine, tokenizer, chat: bool, path: str) -> list[int]:
    """The token ids the teacher continues: what `kdengine eval gsm8k` and corpus.encode_prompt give."""
    try:
        if line.kind == "messages":
            return encode_chat(tokenizer, [dict(role=r, content=c) for r, c in line.messages],
                               add_generation_prompt=True)
        if line.kind == "gsm8k":
            from kdengine.evals.generation import build_prompts

            (prompt,) = build_prompts([line.prompt], chat=chat, tokenizer=tokenizer)
            return encode_text(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        if chat:
            return encode_chat(tokenizer, [{"role": "user", "content": line.prompt}], add_generation_prompt=True)
        return encode_text(tokenizer, line.prompt)
    except Exception as e:  # a template error, or no template (EvalError/ValueError)
        raise GenerateError(f"{path}:{line.line}: cannot format the prompt: {e}") from None


def _check_settings(cfg: GenerateConfig) -> None:
    checks = [
        (cfg.top_k >= 1, f"--top-k must be at least 1, got {cfg.top_k}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.shard_prompts >= 1, f"--shard-prompts must be at least 1, got {cfg.shard_prompts}"),
        (cfg.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}"),
        (cfg.samples_per_prompt >= 1, f"--samples-per-prompt must be at least 1 (responses per prompt), got "
                                      f"{cfg.samples_per_prompt}"),
        (cfg.temperature >= 0, f"--temperature must be 0 (greedy) or more, got {cfg.temperature}"),
        (0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}"),
        (cfg.samples_per_prompt == 1 or cfg.temperature > 0,
         f"--samples-per-prompt {cfg.samples_per_prompt} with greedy decoding gives the same response each time; "
         "add --temperature (e.g. 0.7)"),
        (cfg.keep_correct in (None, *KEEP_CORRECT), f"--keep-correct takes {', '.join(KEEP_CORRECT)}, "
                                                    f"got {cfg.keep_correct!r}"),
    ]
    if cfg.choices is not None:
        checks += [
            (len(cfg.choices) >= 2 and all(c.strip() for c in cfg.choices) and len(set(cfg.choices)) == len(cfg.choices),
             f"--choices needs two or more distinct, non-empty choices, got {cfg.choices}"),
            (cfg.samples_per_prompt == 1 and cfg.temperature == 0 and cfg.keep_correct is None,
             "--choices scores fixed continuations: drop --samples-per-prompt, --temperature and --keep-correct"),
        ]
    for ok, message in checks:
        if not ok:
            raise GenerateError(message)


def parse_choices(text: str) -> list[str]:
    """`--choices`: "a,b,c", or a file with one choice per line."""
    path = Path(text)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [c.strip() for c in text.split(",")]


def _config(cfg: GenerateConfig, data_sha256: str, world_size: int) -> dict:
    """The settings a resumed run must repeat: everything that changes a shard's contents or owner
    (the batch size included: it decides which rows are padded together)."""
    return {"mode": "generate", "teacher_path": str(Path(cfg.teacher).expanduser().resolve()),
            "data": str(Path(cfg.data).resolve()), "data_sha256": data_sha256, "chat": cfg.chat,
            "max_new_tokens": cfg.max_new_tokens, "samples_per_prompt": cfg.samples_per_prompt,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "keep_correct": cfg.keep_correct, "choices": cfg.choices, "stop": list(cfg.stop),
            "shard_prompts": cfg.shard_prompts, "world_size": world_size, "backend": cfg.backend, "dtype": cfg.dtype}


def _chunk_range(chunk: int, size: int, n: int) -> range:
    return range(chunk * size, min((chunk + 1) * size, n))


def responses_part(chunk: int) -> str:
    return f"chunk-{chunk:06d}.jsonl"


def merge_responses(out: str | Path, chunks_total: int) -> Path:
    """OUT/responses.jsonl: every chunk's responses, in prompt order (written atomically)."""
    out = Path(out)
    body = b"".join((out / RESPONSES_DIR / responses_part(c)).read_bytes() for c in range(chunks_total))
    write_atomic(out / RESPONSES, body)
    return out / RESPONSES


def read_responses(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / RESPONSES).read_text(encoding="utf-8").splitlines()]



def format_summary(s: GenerateSummary, out: str) -> str:
    """The lines `kdengine generate` prints."""
    rank = f" (rank {s.rank} of {s.world_size})" if s.world_size > 1 else ""
    finish = ", ".join(f"{k} {v}" for k, v in sorted(s.finish.items()))
    lines = [f"generate{rank}: {s.prompts} prompts, {s.responses} responses ({finish}), {s.stored} stored "
             f"(acceptance {s.acceptance:.1%}), {s.correct} correct; {s.new_tokens} new tokens at "
             f"{s.tokens_per_second:,.1f} tokens/s; {s.positions} positions in {s.shards_written} new shards "
             f"({s.shards_already_done} already done), {s.bytes_per_position:.1f} bytes/position"]
    lines.append(f"store {out}: " + (f"complete; responses in {Path(out) / RESPONSES}" if s.store_complete else
                                     "incomplete (other ranks still running, or re-run to finish)"))
    return "\n".join(lines)
