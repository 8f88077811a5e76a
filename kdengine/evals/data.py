"""Reading GSM8K-format JSONL files, checked line by line before any model work.

Every non-blank line is a JSON object with string fields `question` and `answer` (a worked solution
ending in "#### <number>", as in GSM8K), plus `response` for a file of model outputs. Other fields
are ignored. Lines are read by kdengine.jsonl (the corpus's reader: same limits, same messages). The first bad line stops the read with `EvalError("FILE:LINE: what is wrong")`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdengine.evals.gsm8k import EvalError, Number, parse_reference
from kdengine.jsonl import JsonlError, read_jsonl


@dataclass(frozen=True)
class Problem:
    """One GSM8K item: the question, the worked `answer` text, its parsed `reference` value and, in
    responses mode, the model's `response`."""

    question: str
    answer: str
    reference: Number
    response: str | None = None


def read_problems(path: str | Path, *, with_response: bool = False) -> list[Problem]:
    """All problems in a JSONL file, in file order.

    Args:
        path: the JSONL file.
        with_response: also require a string `response` on every line.
    Returns:
        One Problem per non-blank line.
    Raises:
        EvalError: unreadable file, a line that is not UTF-8 or not a JSON object, a missing or
            non-string field, an answer without "####" and a number; or no problems at all.
    """
    fields = ("question", "answer", "response") if with_response else ("question", "answer")
    problems = []
    try:
        for lineno, record in read_jsonl(path):
            where = f"{path}:{lineno}"
            if isinstance(record, JsonlError):
                raise EvalError(f"{where}: {record}")
            if not isinstance(record, dict):
                raise EvalError(f"{where}: expected a JSON object, got a JSON {type(record).__name__}")
            for field in fields:
                if field not in record:
                    raise EvalError(f"{where}: missing field '{field}' (each line needs {', '.join(fields)})")
                if not isinstance(record[field], str):
                    raise EvalError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}")
            try:
                reference = parse_reference(record["answer"])
            except ValueError as e:
                raise EvalError(f"{where}: {e}") from None
            problems.append(Problem(record["question"], record["answer"], reference, record.get("response")))
    except OSError as e:
        raise EvalError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if not problems:
        raise EvalError(f"{path}: no problems in the file (expected one JSON object per line)")
    return problems

