"""GSM8K answer extraction and scoring: pure functions on strings, no I/O.

Extraction (`extract_answer`) runs one of two cascades (`CASCADES`), trying its rules in order; the
first rule that yields a number wins:

- ``gsm8k`` (the default): ``hash_marker``, then the four rules of ``original``. GSM8K's own worked
  solutions, and the students trained on them, end with "#### N"; the other rules misread such an
  answer when an earlier line holds one number (the first line "First, identify the lowest score,
  which is 71 ..." reads as 71), so all 1319 GSM8K test solutions score right only with this rule.
- ``original``: ``boxed``, ``first_line``, ``answer_phrase``, ``last_number``, exactly as the original
  study ran them; use it to reproduce its published numbers.

0. ``hash_marker`` (``gsm8k`` only): the first "####" that is followed, after optional spaces or tabs,
   by a number (grammar below); that number. A "####" with no number right after it is skipped, and
   when none has one the cascade goes on.
1. ``boxed``: the first ``\\boxed{`` in the response, closed by its matching ``}`` (nested braces
   count). The first number inside it is the answer. A box that holds no number, or that is never
   closed, does not match and the cascade goes on (later boxes are not looked at).
2. ``first_line``: the text up to the first ``\\n``. If it holds one or more numbers and all of them
   have the same value, that value.
3. ``answer_phrase``: the first case-insensitive occurrence of "the answer is", "the final answer
   is" or "the correct answer is" (whole words; any run of whitespace between the words), then
   the first number anywhere after it.
4. ``last_number``: the number that ends closest to the end of the response.
5. ``none``: no number at all; the value is -1 (no GSM8K answer is -1), the item is scored wrong
   and listed for manual review.

Number grammar (ASCII digits only; the same grammar reads references after ``####``)::

    number   := sign? currency? magnitude
    sign     := "-" | "\\u2212"          only when not right after a digit: "16-3" is 16 and 3
    currency := one Unicode currency symbol (category Sc: $ € £ ¥ ...), skipped: "-$5" is -5
    magnitude:= grouped fraction? | digits fraction? | fraction        (tried in that order)
    grouped  := 1-3 digits ("," 3 digits)+, the most groups that are not followed by a digit:
                "1,234,567" is 1234567; "1,234,5678" is 1234 and 5678
    digits   := [0-9]+
    fraction := "." [0-9]+                a bare ".5" only when the dot does not follow a digit

A number never starts inside a run of digits. Consequences, all deliberate: a currency sign before
the number and "%" or a period after it are not part of it ("$1,250.50" is 1250.5, "10%" is 10,
"5." is 5); "3, 4, 5" and "3,4,5" are three numbers (groups after a comma need exactly three
digits); "1,2345" is 1 and 2345; "1.2.3" is 1.2 and 3; digits glued to letters still count ("abc123" holds 123, "5th"
holds 5); spaces or dots as thousands separators ("1 000", "1.000,5") are not understood; a plus sign
is ignored. Every regex here runs in time linear in the length of the response.

Values are Python numbers: an `int` when the number is integral (exact, any size: "18", "18.0" and
"$18.00" are all the int 18) and a `float` otherwise ("0.5"). Two answers are the same when their
values are equal. Both sides come from decimal text, so this is exact for integers and, for decimals,
exact to float precision (15 significant digits); no tolerance is applied, so 33.33 is not 33.333.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Iterator

import regex

CASCADES = {
    "gsm8k": ("hash_marker", "boxed", "first_line", "answer_phrase", "last_number"),
    "original": ("boxed", "first_line", "answer_phrase", "last_number"),
}
DEFAULT_CASCADE = "gsm8k"
NO_ANSWER = -1
Number = int | float

_NUMBER = regex.compile(
    r"""
    (?P<sign>(?<![0-9])[-\u2212])?
    \p{Sc}?
    (?:
        (?<![0-9])(?P<int>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9]) | [0-9]++)(?P<frac>\.[0-9]++)?
      | (?<![0-9])(?P<frac>\.[0-9]++)
    )
    """,
    regex.VERBOSE,
)
_ANSWER_PHRASE = regex.compile(r"\bthe\s++(?:(?:final|correct)\s++)?answer\s++is\b", regex.IGNORECASE)
_BOX_OPEN = "\\boxed{"
_HASH_MARKER = regex.compile(r"####[ \t]*+")


class EvalError(Exception):
    """An expected failure of a GSM8K evaluation (bad input file, unusable log dir or model):
    the message names the file (and line) and what to do."""


def find_numbers(text: str, start: int = 0, end: int | None = None) -> Iterator[Number]:
    """Yields the value of every number in `text[start:end]`, left to right (grammar in the module
    docstring). Characters just outside the window still decide signs and digit-run boundaries."""
    for match in _NUMBER.finditer(text, start, len(text) if end is None else end):
        yield _value(match)


def parse_number(text: str) -> Number | None:
    """The value of the first number in `text`, or None when it holds none."""
    return next(find_numbers(text), None)


def rules(cascade: str) -> tuple[str, ...]:
    """The rules of `cascade` in the order they are tried, then "none" (what a report counts).

    Raises:
        ValueError: an unknown cascade name.
    """
    if cascade not in CASCADES:
        raise ValueError(f"unknown cascade {cascade!r}; expected one of {', '.join(CASCADES)}")
    return (*CASCADES[cascade], "none")


def extract_answer(response: str, cascade: str = DEFAULT_CASCADE) -> tuple[Number, str]:
    """The model's final answer and the rule that found it.

    Args:
        response: the model's output, any length.
        cascade: a name in `CASCADES` ("gsm8k": "#### N" first; "original": the study's four rules).
    Returns:
        (value, rule): value is an int or float; rule is one of `rules(cascade)`. Rule "none" comes
        with -1.
    Raises:
        ValueError: an unknown cascade name.
    """
    for rule in rules(cascade)[:-1]:
        value = _FINDERS[rule](response)
        if value is not None:
            return value, rule
    return NO_ANSWER, "none"


def parse_reference(answer: str) -> Number:
    """The reference value in a GSM8K `answer` field: the first number after the first "####".

    Raises:
        ValueError: no "####", or no number after it.
    """
    marker = answer.find("####")
    if marker < 0:
        raise ValueError("the answer has no '####' before its final number (GSM8K format: '... #### 18')")
    value = next(find_numbers(answer, marker + 4), None)
    if value is None:
        raise ValueError(f"no number after '####' in the answer (got {answer[marker:marker + 40]!r})")
    return value


def is_correct(prediction: Number, rule: str, reference: Number) -> bool:
    """Whether an extracted prediction scores: a found answer equal in value to the reference."""
    return rule != "none" and prediction == reference


def _value(match: regex.Match) -> Number:
    integer = (match.group("int") or "0").replace(",", "")
    exact = Decimal(integer + (match.group("frac") or ""))
    if match.group("sign"):
        exact = -exact
    if exact == exact.to_integral_value():
        return int(exact)
    return float(exact)


def _hash_marker(response: str) -> Number | None:
    for marker in _HASH_MARKER.finditer(response, overlapped=True):  # "##### 9": the marker at 1
        number = _NUMBER.match(response, marker.end())
        if number is not None:
            return _value(number)
    return None


def _boxed(response: str) -> Number | None:
    start = response.find(_BOX_OPEN)
    if start < 0:
        return None
    content_start = start + len(_BOX_OPEN)
    depth = 1
    for pos in range(content_start, len(response)):
        char = response[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return next(find_numbers(response, content_start, pos), None)
    return None


def _first_line(response: str) -> Number | None:
    newline = response.find("\n")
    values = set(find_numbers(response, 0, len(response) if newline < 0 else newline))
    return values.pop() if len(values) == 1 else None


def _answer_phrase(response: str) -> Number | None:
    phrase = _ANSWER_PHRASE.search(response)
    if phrase is None:
        return None
    return next(find_numbers(response, phrase.end()), None)


def _last_number(response: str) -> Number | None:
    last = None
    for last in find_numbers(response):
        pass
    return last


_FINDERS = {"hash_marker": _hash_marker, "boxed": _boxed, "first_line": _first_line,
            "answer_phrase": _answer_phrase, "last_number": _last_number}
