"""The GSM8K extraction cascade, the number grammar and the lm-eval filters: pure functions on strings."""
import time

import pytest

from kdengine.evals.gsm8k import extract_answer, rules, find_numbers, is_correct, parse_number, parse_reference
from kdengine.evals.lm_eval_filters import INVALID, apply_filter, harness_correct


@pytest.mark.parametrize("text, numbers", [
    ("$1,250.50", [1250.5]),
    ("-5", [-5]),
    ("5.", [5]),
    ("3.0 apples", [3]),
    ("1,234,567", [1234567]),
    ("3, 4, 5", [3, 4, 5]),
    ("3,4,5", [3, 4, 5]),  # a group after a comma needs exactly three digits
    ("1,2345", [1, 2345]),
    ("1,234,5678", [1234, 5678]),
    ("10%", [10]),
    ("€20 and £1,000 and ¥7", [20, 1000, 7]),
    ("−7 degrees", [-7]),  # U+2212 MINUS SIGN
    ("-$5", [-5]),
    ("16-3-4=9", [16, 3, 4, 9]),  # a minus right after a digit is subtraction
    ("x=-3, (-2)", [-3, -2]),
    ("5 - 3", [5, 3]),
    ("abc123", [123]),
    ("the 5th day", [5]),
    (".5 cups, 0.25 cups", [0.5, 0.25]),
    ("1.2.3", [1.2, 3]),
    ("+4", [4]),
    ("Total: 1,000.", [1000]),
    ("no digits here", []),
    ("", []),
    ("١٢ full-width １２", []),  # only ASCII digits are digits
])
def test_number_grammar(text, numbers):
    found = list(find_numbers(text))
    assert found == numbers
    assert [type(value) for value in found] == [type(value) for value in numbers]


def test_values_are_ints_when_integral_and_compare_numerically():
    assert parse_number("18") == parse_number("18.0") == parse_number("18.00") == parse_number("$18") == 18
    assert isinstance(parse_number("18.00"), int)
    assert parse_number("0.50") == parse_number(".5") == 0.5
    assert parse_number("18.5") != parse_number("18.05")
    assert parse_number("-0") == 0
    assert parse_number("12345678901234567890123") == 12345678901234567890123  # exact, no float rounding
    assert parse_number("none") is None


@pytest.mark.parametrize("response, expected", [
    # boxed: the first box, nested braces, units and currency inside the box
    ("We compute 3 + 4.\nSo \\boxed{7} apples, 9 left", (7, "boxed")),
    ("\\boxed{\\$1,250} is it", (1250, "boxed")),
    ("\\boxed{\\text{{total}} = 18 \\text{ dollars}}", (18, "boxed")),
    ("\\boxed{\\frac{1}{2}}", (1, "boxed")),
    ("first \\boxed{4}\nthen \\boxed{5}", (4, "boxed")),
    ("\\boxed{-12}", (-12, "boxed")),
    # a box with no number, or never closed, does not match (and later boxes are not looked at)
    ("\\boxed{}\nstep 2\nso \\boxed{5} and 6", (6, "last_number")),
    ("Five\n\\boxed{x} and 3 and 4", (4, "last_number")),
    ("Seven\nso 8 \\boxed{9", (9, "last_number")),
    # first_line: all numbers on it must agree
    ("18\nbecause 9 * 2 = 18", (18, "first_line")),
    ("The answer is: $18.", (18, "first_line")),
    ("$18.00, i.e. 18 dollars\n2 * 9 = 18", (18, "first_line")),
    ("She has 3 then 5\nso the answer is 8.", (8, "answer_phrase")),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.", (18, "last_number")),
    ("\nleading newline: 5", (5, "last_number")),  # the first line is empty
    # answer_phrase: the first phrase, the first number anywhere after it
    ("Let me think.\nThe answer is: $18.\nCheck: 18 + 2 = 20", (18, "answer_phrase")),
    ("Step 1 gives 3.\nTHE FINAL ANSWER IS 42 (not 43)", (42, "answer_phrase")),
    ("Step 1 gives 3.\nSo the correct answer is -7.", (-7, "answer_phrase")),
    ("Step 1 gives 3.\nthe answer is\n\n12 cookies", (12, "answer_phrase")),
    ("Step 1 gives 3.\nThe answer is below.\nIt is 12. Then 13", (12, "answer_phrase")),
    ("Step 1 gives 3.\nThe answer isn't 4; it is 5", (5, "last_number")),  # whole words only
    ("Step one.\nWe get 3; the answer is unclear", (3, "last_number")),
    ("Go.\nBathe answer is 1 no, wait: 2", (2, "last_number")),
    # last_number
    ("Let us see.\nWe have 5 apples and 10% of 1,000.", (1000, "last_number")),
    ("Let us see.\nIt is −5.", (-5, "last_number")),
    # none
    ("", (-1, "none")),
    ("I don't know.", (-1, "none")),
    ("\\boxed{?}\nno digits at all", (-1, "none")),
    # unicode text around the numbers
    ("答案是 42。", (42, "first_line")),
    ("Janet’s ducks… 🦆\nElle vend 9 œufs à 2 € — soit 18 €", (18, "last_number")),
])
@pytest.mark.parametrize("cascade", ["original", "gsm8k"])  # no '####' here: both cascades agree
def test_extract_answer(response, expected, cascade):
    assert extract_answer(response, cascade) == expected


def test_rule_order_when_every_rule_matches():
    rules_apply = "First line 7\nThe answer is 8.\nSo \\boxed{9}. Finally 10"
    assert extract_answer(rules_apply, "original") == (9, "boxed")
    without_box = rules_apply.replace("\\boxed{9}", "nine")
    assert extract_answer(without_box, "original") == (7, "first_line")
    two_numbers_first = without_box.replace("First line 7", "First 6 then 7")
    assert extract_answer(two_numbers_first, "original") == (8, "answer_phrase")
    no_phrase = two_numbers_first.replace("The answer is 8.", "Maybe 8.")
    assert extract_answer(no_phrase, "original") == (10, "last_number")
    assert rules("original") == ("boxed", "first_line", "answer_phrase", "last_number", "none")
    assert extract_answer(rules_apply + "\n#### 11", "original") == (9, "boxed")
    assert extract_answer(rules_apply + "\n#### 11", "gsm8k") == (11, "hash_marker")


@pytest.mark.parametrize("name, text", [
    ("digits", "7" * 100_000),
    ("digit groups", "1" + ",234" * 25_000 + "5"),
    ("short numbers", "a1,2 " * 20_000),
    ("minus signs", "-" * 100_000),
    ("currency signs", "$" * 100_000),
    ("dots", "1." * 50_000),
    ("unclosed boxes", "\\boxed{" * 14_000),
    ("open braces", "\\boxed{" + "{" * 100_000),
    ("phrase prefixes", "the answer " * 10_000),
    ("whitespace after 'the'", "the" + " " * 100_000),
    ("prose", "Janet has 3 apples and buys 4 more. " * 2_800),
    ("hash markers", "#### " * 20_000),
])
@pytest.mark.parametrize("cascade", ["original", "gsm8k"])
def test_long_responses_take_linear_time(name, text, cascade):
    start = time.process_time()  # CPU time: a busy machine does not inflate it
    extract_answer(text, cascade)
    for filter_name in ("strict-match", "flexible-extract"):
        harness_correct(apply_filter(filter_name, text), "#### 18")
    assert time.process_time() - start < 2.0, f"{name}: {len(text)} characters took too long"


def test_parse_reference():
    assert parse_reference("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18") == 18
    assert parse_reference("#### 1,000") == 1000
    assert parse_reference("2 - 7 = -5\n#### -5") == -5
    with pytest.raises(ValueError, match="no '####'"):
        parse_reference("The answer is 18")
    with pytest.raises(ValueError, match="no number after '####'"):
        parse_reference("so #### eighteen")


def test_is_correct_needs_a_found_answer():
    assert is_correct(18, "last_number", 18)
    assert is_correct(18, "first_line", 18.0)
    assert not is_correct(17, "boxed", 18)
    assert not is_correct(-1, "none", -1)  # -1 means "no answer", never a hit


@pytest.mark.parametrize("response, strict, flexible", [
    ("so she makes 18.\n#### 18", "18", "18"),
    ("#### 1,000.", "1,000.", "1,000."),
    ("she makes $18.", INVALID, "$18."),
    ("3 and then 4", INVALID, "4"),
    ("-5 degrees", INVALID, "-5"),
    ("nothing", INVALID, INVALID),
])
def test_lm_eval_filters_extract(response, strict, flexible):
    assert apply_filter("strict-match", response) == strict
    assert apply_filter("flexible-extract", response) == flexible


def test_lm_eval_exact_match_is_on_normalised_strings():
    answer = "9 * 2 = <<9*2=18>>18\n#### 18"
    assert harness_correct("$18.", answer)
    assert harness_correct("18", answer)
    assert not harness_correct("18.00", answer)  # string comparison: ours counts 18.00 right
    assert not harness_correct(INVALID, answer)
    assert harness_correct("1,000", "#### 1000")
    with pytest.raises(ValueError, match="unknown lm-eval filter"):
        apply_filter("loose", "18")
