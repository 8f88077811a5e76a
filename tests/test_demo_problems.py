import operator
import re
from fractions import Fraction

from kdengine.demo.problems import TEMPLATES, generate_problems, split_problems
from kdengine.evals.gsm8k import find_numbers, parse_reference

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": Fraction}
_STEP = re.compile(r"(-?\d+(?:\.\d+)?) ([-+*/]) (-?\d+(?:\.\d+)?) = \$?(-?\d+(?:\.\d+)?)")


def test_every_answer_is_possible_over_many_seeds():
    """Property: for 150 seeds x 48 problems (every template 4 times a seed), each worked step's
    arithmetic is right and yields a whole positive number, subtractions never go below zero,
    divisions come out even, every number in the question is a whole positive number, and the
    reference after '####' is the last step's result."""
    checked = 0
    for seed in range(150):
        for problem in generate_problems(48, seed=seed):
            steps = _STEP.findall(problem.answer)
            assert steps, problem.answer
            for a, op, b, result in steps:
                value = _OPS[op](Fraction(a), Fraction(b))
                assert value == Fraction(result), problem.answer
                assert value.denominator == 1 and value > 0, f"seed {seed}: impossible step {a} {op} {b}\n{problem}"
            numbers = list(find_numbers(problem.question))
            assert numbers and all(isinstance(n, int) and n > 0 for n in numbers), problem.question
            reference = parse_reference(problem.answer)
            assert isinstance(reference, int) and reference == int(steps[-1][3]) > 0, problem.answer
            checked += 1
    assert checked == 150 * 48


def test_splits_are_disjoint_seeded_and_cover_every_template():
    train, test = split_problems(120, 36, seed=7)
    assert not {p.question for p in train} & {p.question for p in test}
    assert [p.question for p in split_problems(120, 36, seed=7)[1]] == [p.question for p in test]
    assert [p.question for p in split_problems(120, 36, seed=8)[1]] != [p.question for p in test]
    assert [p.question for p in split_problems(480, 36, seed=7)[1]] == [p.question for p in test]
    assert len(test) == 36 >= len(TEMPLATES)
