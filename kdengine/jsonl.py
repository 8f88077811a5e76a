"""The one JSONL reader: every corpus, prompt file and GSM8K file goes through `read_jsonl`.

A line is split on b"\\n" only (a "\\r" before it is JSON whitespace), decoded as UTF-8 (a UTF-8 BOM
is accepted at the start of the file), parsed as one JSON value, and refused - as a `JsonlError`
whose message says what is wrong with the line - when it is:
- longer than MAX_LINE_BYTES (read in bounded pieces, so a huge line never sits in memory whole);
- not UTF-8 (the message gives the 1-based byte of the line where decoding failed);
- not JSON;
- nested deeper than MAX_DEPTH arrays/objects;
- holding a string with a lone surrogate (e.g. "\\ud800": valid JSON escape, but no Unicode text).
Blank lines (only whitespace) are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

MAX_LINE_BYTES = 1 << 20  # 1 MiB; far above any sample a teacher context holds (8k tokens ~ 40 KB of text)
MAX_DEPTH = 64  # nested arrays/objects; a corpus line needs 3 (object > messages > message)

_BOM = b"\xef\xbb\xbf"


class JsonlError(ValueError):
    """One bad line; str() is the reason (the caller adds `file:line:`)."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yields (1-based line number, parsed value) for each non-blank line, or (line number, JsonlError)
    for a bad one, so the caller decides whether to stop or to collect it.

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as f:
        for lineno, raw in _lines(f):
            if raw is None:
                yield lineno, JsonlError(f"line longer than {MAX_LINE_BYTES:,} bytes (the limit for one "
                                         f"sample); split it or shorten it")
                continue
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            try:
                yield lineno, parse_line(raw)
            except JsonlError as e:
                yield lineno, e


def parse_line(raw: bytes) -> object:
    """One line's JSON value (see the module docstring for what is refused).

    Raises:
        JsonlError: the reason.
    """
    if len(raw) > MAX_LINE_BYTES:
        raise JsonlError(f"line longer than {MAX_LINE_BYTES:,} bytes (the limit for one sample)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonlError(f"not valid UTF-8 (byte {e.start + 1} of the line)") from None
    if text.count("[") + text.count("{") > MAX_DEPTH:  # cheap bound first; scan only when it could be deep
        depth = _max_depth(text)
        if depth > MAX_DEPTH:
            raise JsonlError(f"JSON nested {depth} levels deep; at most {MAX_DEPTH} are accepted")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonlError(f"not valid JSON: {e.msg} at column {e.colno}") from None
    _check_text(value)
    return value


def _lines(f) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the newline) per line, or (line number, None) for a line over
    MAX_LINE_BYTES, which is skipped in bounded reads."""
    lineno = 0
    while True:
        piece = f.readline(MAX_LINE_BYTES + 1)
        if not piece:
            return
        lineno += 1
        if len(piece) > MAX_LINE_BYTES and not piece.endswith(b"\n"):
            while piece and not piece.endswith(b"\n"):
                piece = f.readline(MAX_LINE_BYTES)
            yield lineno, None
            continue
        yield lineno, piece.rstrip(b"\n")


def _max_depth(text: str) -> int:
    """The deepest [ / { nesting outside strings, counted without recursion (json.loads would hit
    Python's recursion limit on a 100k-deep line)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_text(value) -> None:
    """Refuses a string (key or value) holding a lone surrogate; iterative, the depth is bounded."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for key, item in v.items():
                _check_string(key)
                stack.append(item)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            _check_string(v)


def _check_string(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise JsonlError(f"string {s[max(0, e.start - 20):e.start]!r}... holds a lone surrogate "
                         f"(\\u{ord(s[e.start]):04x}), which is not Unicode text; fix the escape") from None
