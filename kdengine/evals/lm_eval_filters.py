"""lm-evaluation-harness's two GSM8K scorings (task `gsm8k`, version 3), so a report can be set next
to published numbers.

The harness extracts a string with a regex filter, then scores it with `exact_match` against the
raw `answer` field after removing, in order, every ",", every "$", everything up to the last
"#### ", and a final "."; case is ignored. Comparison is on strings, so "18.00" is wrong against
"18" there while our cascade counts it right.

- strict-match: the first match of `#### (\\-?[0-9\\.\\,]+)`.
- flexible-extract: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (the non-empty group).

A response with no match gets "[invalid]", which never equals a reference.
"""
from __future__ import annotations

import re

FILTERS = ("strict-match", "flexible-extract")
INVALID = "[invalid]"

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_FINAL_PERIOD = re.compile(r"\.$")


def apply_filter(name: str, response: str) -> str:
    """The string the harness's filter `name` (one of FILTERS) extracts from `response`."""
    if name == "strict-match":
        match = _STRICT.search(response)
        return match.group(1).strip() if match else INVALID
    if name == "flexible-extract":
        last = None
        for last in _FLEXIBLE.finditer(response):
            pass
        return (last.group(1) or last.group(2)).strip() if last else INVALID
    raise ValueError(f"unknown lm-eval filter {name!r}; expected one of {FILTERS}")


def harness_correct(extracted: str, answer: str) -> bool:
    """The harness's exact_match between a filter's output and the raw GSM8K `answer` text."""
    return _normalise(extracted) == _normalise(answer)


def _normalise(text: str) -> str:
    text = text.replace(",", "").replace("$", "")
    # the harness removes the regex "(?s).*#### "; the greedy match ends at the last "#### " and
    # cutting there by hand keeps this linear on long strings
    marker = text.rfind("#### ")
    if marker >= 0:
        text = text[marker + len("#### "):]
    return _FINAL_PERIOD.sub("", text).lower()
