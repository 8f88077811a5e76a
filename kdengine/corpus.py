"""The corpus: a JSONL file, one sample per line, turned into the token ids the teacher reads and the
positions whose next-token distribution the store keeps.

Line formats (an optional "id", a string or an integer, names the sample; it defaults to the line
number; other keys are ignored; blank lines are skipped; lines are read by kdengine.jsonl: UTF-8, at
most MAX_LINE_BYTES (1 MiB) each, JSON nested at most 64 deep, no lone surrogates):

    {"text": "..."}                              targets on every position
    {"prompt": "...", "response": "..."}         targets on the response
    {"question": "...", "answer": "..."}         GSM8K: prompt GSM8K_PROMPT, response " " + answer
    {"messages": [{"role": "user", "content": "..."}, ...]}
                                                 rendered by the chat template; targets on assistant turns
                                                 (roles: system, user, assistant)

Alignment (teacher forcing). Position t stores the distribution that predicts token t+1. A target span
of token indices [s, e) therefore gives positions s-1 .. e-2, and for every stored position p the
label is input_ids[p + 1].

Token ids (see kdengine.teachers.encoding for the shared convention):
- text: the tokenizer's special prefix (its BOS, if it adds one) + the text; positions 0 .. T-2.
- prompt/response and question/answer, plain (chat=False): P = special prefix + tokens(prompt), which
  is exactly what `encode_prompt(..., chat=False)` gives the model at evaluation time; then the
  response R, then EOS (if the tokenizer has one), so the student also learns to stop. R is the tail
  of tokens(prompt + response) when tokens(prompt) is a prefix of it (the tokenization the model saw
  in pretraining; the usual case, since pre-tokenizers split before a leading space), else
  tokens(response) alone. Either way P is an exact token prefix. Targets: R and the EOS.
- prompt/response and question/answer with chat=True, and messages always: the conversation (one user
  turn + one assistant turn for the former) is rendered by the chat template and tokenized as
  `apply_chat_template` does. Each assistant turn's span runs from the end of the rendered prompt
  (the conversation before it + the generation prompt: what `encode_prompt(..., chat=True)` gives at
  evaluation time) through the last special token the template writes for that turn (its end-of-turn
  token, e.g. <|im_end|>); glue after it (a newline) is not a target. The rendered prompt must be a token
  prefix of the rendered conversation; a template that breaks this raises CorpusError.

Use `check_corpus` (no tokenizer: fails fast, before a model is loaded), then `tokenize_corpus`; or
`load_corpus` for both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from jinja2 import TemplateError
from tqdm import tqdm

from kdengine.jsonl import JsonlError, read_jsonl
from kdengine.teachers.encoding import encode_chat, encode_text, special_prefix

GSM8K_PROMPT = "Question: {question}\nAnswer:"  # plain-format GSM8K prompt; the response is " " + answer
ROLES = ("system", "user", "assistant")
_FORMATS = (("text",), ("prompt", "response"), ("question", "answer"), ("messages",))


class CorpusError(Exception):
    """A corpus that cannot be used; the message starts with `file:line:` where a line is at fault.

    Attributes:
        bad_lines: every `file:line: reason` found (a whole-file problem leaves it empty).
    """

    def __init__(self, message: str, bad_lines: Sequence[str] = ()):
        super().__init__(message)
        self.bad_lines = list(bad_lines)


@dataclass(frozen=True)
class Record:
    """One well-formed line. kind: "text", "prompt" (prompt/response), "gsm8k" (question/answer) or
    "messages"; the fields of the other kinds stay empty."""

    line: int
    id: str
    kind: str
    text: str = ""
    prompt: str = ""
    response: str = ""
    messages: tuple[tuple[str, str], ...] = ()


@dataclass
class CheckedCorpus:
    """The result of `check_corpus`: the well-formed records in file order and, when skipping, the
    `file:line: reason` of every bad line."""

    path: str
    records: list[Record]
    bad_lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """One sample ready for the teacher.

    index: 0-based, in file order, among the samples kept (those with a target position).
    id: the line's "id" (as a string), or its line number.
    line: 1-based line in the file.
    input_ids: int32 [T], what the teacher reads.
    positions: int32 [P], sorted, each in [0, T-2]: position t stores the distribution predicting input_ids[t+1].
    """

    index: int
    id: str
    line: int
    input_ids: np.ndarray
    positions: np.ndarray


@dataclass
class Corpus:
    """The result of `tokenize_corpus`.

    samples: the samples kept. bad_lines: `file:line: reason` of lines skipped as malformed.
    truncated: how many kept samples were cut to max_length. skipped: `file:line: reason` of samples
    dropped because no target position was left.
    """

    samples: list[Sample]
    bad_lines: list[str]
    truncated: int
    skipped: list[str]


def check_corpus(path: str | Path, *, skip_bad_lines: bool = False) -> CheckedCorpus:
    """Reads and validates a JSONL corpus without a tokenizer (so a bad file fails before any model loads).

    Blank lines are ignored. Everything else must be a JSON object in one of the formats in this
    module's docstring, with non-empty strings and a unique id.

    Args:
        path: the JSONL file.
        skip_bad_lines: collect bad lines in `bad_lines` and go on, instead of raising.
    Raises:
        CorpusError: no such file, an empty file, a bad line (unless skipping; the message is the
            first one's `file:line: reason` and how many there are), or no good line at all.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    records: list[Record] = []
    bad: list[str] = []
    first_line_of_id: dict[str, int] = {}
    nonblank = 0
    try:
        for lineno, value in read_jsonl(path):
            nonblank += 1
            try:
                if isinstance(value, JsonlError):
                    raise _BadLine(str(value))
                record = _record(value, lineno)
                if record.id in first_line_of_id:
                    raise _BadLine(f'duplicate id "{record.id}" (first used on line {first_line_of_id[record.id]})')
            except _BadLine as e:
                bad.append(f"{path}:{lineno}: {e}")
                continue
            first_line_of_id[record.id] = lineno
            records.append(record)
    except OSError as e:
        raise CorpusError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if nonblank == 0:
        raise CorpusError(f"{path}: empty file: expected one JSON object per line")
    if bad and not skip_bad_lines:
        more = f"\n({len(bad)} bad lines in all; fix them or skip them with --skip-bad-lines)" if len(bad) > 1 else ""
        raise CorpusError(bad[0] + more, bad)
    if not records:
        raise CorpusError(f"{path}: no usable sample: all {len(bad)} lines are bad; the first: {bad[0]}", bad)
    return CheckedCorpus(path=str(path), records=records, bad_lines=bad)


def tokenize_corpus(checked: CheckedCorpus, tokenizer, *, chat: bool = False, max_length: int | None = None,
                    context_length: int | None = None, skip_bad_lines: bool = False,
                    progress: bool = False) -> Corpus:
    """Token ids and target positions for every record (see the module docstring for the conventions).

    Args:
        checked: from `check_corpus`.
        tokenizer: the teacher's tokenizer.
        chat: render prompt/response and question/answer through the chat template (one user turn, one
            assistant turn) instead of concatenating them; messages always use the template, text
            never does.
        max_length: keep at most this many tokens of each sample (the start); positions whose target
            falls outside are dropped. None keeps everything.
        context_length: the teacher's context (max_position_embeddings): a sample longer than it is
            refused (its targets past the context would be garbage) unless max_length cuts it;
            max_length may not exceed it. None: no bound.
        skip_bad_lines: a line the chat template cannot render consistently, or a sample longer than
            the context, goes to `bad_lines` instead of raising.
        progress: show a tqdm bar.
    Raises:
        CorpusError: max_length < 2 or above context_length, chat formatting without a chat template,
            or a line whose chat rendering fails or that is longer than the context (unless skipping).
    """
    if max_length is not None and max_length < 2:
        raise CorpusError(f"max_length must be at least 2 (one token and the next to predict), got {max_length}")
    if max_length is not None and context_length is not None and max_length > context_length:
        raise CorpusError(f"--max-length {max_length} is longer than the teacher's context of {context_length} "
                          f"tokens (max_position_embeddings); use --max-length {context_length} or less")
    needs_template = next((r for r in checked.records if r.kind == "messages" or (chat and r.kind != "text")), None)
    if needs_template is not None and not getattr(tokenizer, "chat_template", None):
        raise CorpusError(f"{checked.path}:{needs_template.line}: chat formatting needs the tokenizer's chat "
                          "template, but the tokenizer has none; use a tokenizer with a template, or plain "
                          "formatting (no --chat; messages lines always need a template)")
    prefix = special_prefix(tokenizer)
    samples: list[Sample] = []
    bad = list(checked.bad_lines)
    skipped: list[str] = []
    truncated = 0
    for record in tqdm(checked.records, desc="tokenizing", unit="sample", disable=not progress):
        where = f"{checked.path}:{record.line}"
        try:
            ids, positions = _encode(record, tokenizer, prefix, chat)
            if max_length is None and context_length is not None and len(ids) > context_length:
                raise _BadLine(f"{len(ids)} tokens, longer than the teacher's context of {context_length} "
                               f"(max_position_embeddings): its targets past the context would be garbage; "
                               f"pass --max-length {context_length} to keep the first {context_length} "
                               f"tokens of long samples, or shorten it")
        except _BadLine as e:
            if not skip_bad_lines:
                raise CorpusError(f"{where}: {e}", [f"{where}: {e}"]) from None
            bad.append(f"{where}: {e}")
            continue
        cut = max_length is not None and len(ids) > max_length
        if cut:
            ids = ids[:max_length]
            kept = positions[positions < max_length - 1]
        else:
            kept = positions
        if len(kept) == 0:
            reason = (f"no target position within the first {max_length} tokens (the first needs "
                      f"{int(positions[0]) + 2})" if cut and len(positions) else
                      f"no target position: {len(ids)} token(s) leave nothing to predict")
            skipped.append(f"{where}: {reason}")
            continue
        truncated += cut
        samples.append(Sample(index=len(samples), id=record.id, line=record.line,
                              input_ids=np.asarray(ids, dtype=np.int32), positions=kept.astype(np.int32)))
    return Corpus(samples=samples, bad_lines=bad, truncated=truncated, skipped=skipped)


def load_corpus(path: str | Path, tokenizer, *, chat: bool = False, max_length: int | None = None,
                skip_bad_lines: bool = False, progress: bool = False) -> Corpus:
    """`check_corpus` then `tokenize_corpus`, with the same options."""
    checked = check_corpus(path, skip_bad_lines=skip_bad_lines)
    return tokenize_corpus(checked, tokenizer, chat=chat, max_length=max_length,
                           skip_bad_lines=skip_bad_lines, progress=progress)


@dataclass(frozen=True)
class PaddedBatch:
    """Samples as one right-padded teacher input.

    input_ids: int64 [B, T], padded with 0; lengths: int64 [B];
    rows, cols: int64 [P], the (row, column) of every target position, sample by sample.
    """

    samples: list[Sample]
    input_ids: torch.Tensor
    lengths: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def padded_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[PaddedBatch]:
    """`samples` sorted by length (longest first, ties in order) and cut into right-padded batches of
    `batch_size`, so each batch pads little."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    for start in range(0, len(order), batch_size):
        batch = [samples[i] for i in order[start:start + batch_size]]
        lengths = torch.tensor([len(s.input_ids) for s in batch], dtype=torch.long)
        ids = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, :len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
        rows = torch.cat([torch.full((len(s.positions),), r, dtype=torch.long) for r, s in enumerate(batch)])
        cols = torch.cat([torch.from_numpy(s.positions.astype(np.int64)) for s in batch])
        yield PaddedBatch(batch, ids, lengths, rows, cols)


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """The token ids a model is asked to continue for `prompt` at evaluation time: exactly the prefix
    the corpus gives a prompt/response sample's response (plain: special prefix + prompt tokens; chat:
    one user turn + the generation prompt)."""
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return encode_text(tokenizer, prompt)


class _BadLine(Exception):
    """What is wrong with one line (the caller adds `file:line:`)."""


def _record(obj, lineno: int) -> Record:
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, got {_json_type(obj)}")
    present = [fmt for fmt in _FORMATS if any(key in obj for key in fmt)]
    if not present:
        raise _BadLine('no sample fields: expected "text", "prompt"+"response", "question"+"answer" or '
                       f'"messages"; got keys {sorted(obj)}')
    if len(present) > 1:
        names = ", ".join("+".join(f'"{k}"' for k in fmt) for fmt in present)
        raise _BadLine(f"ambiguous sample: it has fields of several formats ({names}); keep one format per line")
    fmt = present[0]
    for key in fmt:
        if key not in obj:
            other = next(k for k in fmt if k != key)
            raise _BadLine(f'has "{other}" but no "{key}"')
    sample_id = _sample_id(obj, lineno)
    if fmt == ("messages",):
        return Record(line=lineno, id=sample_id, kind="messages", messages=_messages(obj["messages"]))
    values = [_string(obj, key) for key in fmt]
    if fmt == ("text",):
        return Record(line=lineno, id=sample_id, kind="text", text=values[0])
    kind = "prompt" if fmt == ("prompt", "response") else "gsm8k"
    return Record(line=lineno, id=sample_id, kind=kind, prompt=values[0], response=values[1])


def _sample_id(obj: dict, lineno: int) -> str:
    if "id" not in obj:
        return str(lineno)
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadLine(f'"id" must be a string or an integer, got {_json_type(value)}')
    if isinstance(value, str) and not value.strip():
        raise _BadLine('"id" is empty')
    return str(value)


def _string(obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _BadLine(f'"{key}" must be a string, got {_json_type(value)}')
    if not value.strip():
        raise _BadLine(f'"{key}" is empty')
    return value


def _messages(value) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        got = "an empty array" if isinstance(value, list) else _json_type(value)
        raise _BadLine(f'"messages" must be a non-empty array of {{"role", "content"}} objects, got {got}')
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _BadLine(f'messages[{i}] must be an object with "role" and "content", got {_json_type(message)}')
        role = message.get("role")
        if role not in ROLES:
            raise _BadLine(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {json.dumps(role)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise _BadLine(f"messages[{i}].content must be a string, got {_json_type(content)}")
        if not content.strip():
            raise _BadLine(f"messages[{i}].content is empty")
        turns.append((role, content))
    if turns[0][0] == "assistant":
        raise _BadLine('messages[0] is an assistant turn; an assistant turn needs a system or user turn before it')
    if not any(role == "assistant" for role, _ in turns):
        raise _BadLine('"messages" has no assistant turn, so it has no target to learn')
    return tuple(turns)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _encode(record: Record, tokenizer, prefix: list[int], chat: bool) -> tuple[list[int], np.ndarray]:
    """(input_ids, positions) of one record."""
    if record.kind == "text":
        ids = prefix + tokenizer(record.text, add_special_tokens=False)["input_ids"]
        return ids, np.arange(len(ids) - 1)
    if record.kind == "messages":
        return _encode_chat(tokenizer, [{"role": r, "content": c} for r, c in record.messages])
    if chat:  # the user turn is the bare prompt (or question), the assistant turn the bare response
        turns = [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.response}]
        return _encode_chat(tokenizer, turns)
    prompt, response = _plain_prompt_response(record)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    if joint[:len(prompt_ids)] == prompt_ids:
        response_ids = joint[len(prompt_ids):]
    else:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = prefix + prompt_ids + response_ids + eos
    return ids, np.arange(len(prefix) + len(prompt_ids) - 1, len(ids) - 1)


def _plain_prompt_response(record: Record) -> tuple[str, str]:
    """The (prompt, response) texts of a plain-format sample: GSM8K gets its question/answer framing."""
    if record.kind == "gsm8k":
        return GSM8K_PROMPT.format(question=record.prompt), " " + record.response
    return record.prompt, record.response


def _encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], np.ndarray]:
    """(input_ids, positions) of a conversation; targets are the assistant turns (see module docstring)."""
    try:
        full = encode_chat(tokenizer, messages)
        special = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special
        }
        positions = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = encode_chat(tokenizer, messages[:turn], add_generation_prompt=True)
            through = full if turn == len(messages) - 1 else encode_chat(tokenizer, messages[:turn + 1])
            start, end = len(prompt), _turn_end(through, len(prompt), special)
            if full[:start] != prompt or through[:start] != prompt or full[:end] != through[:end]:
                raise _BadLine(
                    f"the chat template does not render assistant turn messages[{turn}] consistently: the "
                    "conversation before it plus the generation prompt is not a token prefix of the whole "
                    "conversation (the template rewrites earlier turns, e.g. drops their reasoning), so the "
                    "turn has no exact token span; use a template that renders history unchanged"
                )
            positions.extend(range(max(start, 1) - 1, end - 1))
    except (TemplateError, ValueError) as e:  # e.g. a template's raise_exception("roles must alternate")
        raise _BadLine(f"the chat template cannot render this conversation: {e}") from None
    return full, np.asarray(positions, dtype=np.int64)


def _turn_end(through: list[int], start: int, special: set[int]) -> int:
    """End (exclusive) of an assistant turn starting at `start` in `through`: just past the last special
    token the template wrote for the turn (its end-of-turn marker), else the end of the rendering."""
    for i in range(len(through) - 1, start - 1, -1):
        if through[i] in special:
            return i + 1
    return len(through)
