import re

from kdengine.demo.problems import TEMPLATES, generate_problems, split_problems


def _reference(answer: str) -> int:
    return int(answer.rsplit("####", 1)[1])


def test_worked_answers_are_arithmetic_that_checks_out():
    for problem in generate_problems(240, seed=3):
        for a, op, b, result in re.findall(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", problem.answer):
            assert eval(f"{a} {op} {b}") == int(result), problem.answer
        last_line_value = int(re.findall(r"= \$?(\d+)", problem.answer)[-1])
        assert _reference(problem.answer) == last_line_value >= 0


def test_splits_are_disjoint_seeded_and_cover_every_template():
    train, test = split_problems(120, 36, seed=7)
    assert not {p.question for p in train} & {p.question for p in test}
    assert [p.question for p in split_problems(120, 36, seed=7)[1]] == [p.question for p in test]
    assert [p.question for p in split_problems(120, 36, seed=8)[1]] != [p.question for p in test]
    assert [p.question for p in split_problems(480, 36, seed=7)[1]] == [p.question for p in test]
    assert len(test) == 36 >= len(TEMPLATES)
