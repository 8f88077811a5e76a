"""Our lm_eval_filters against lm-evaluation-harness's own gsm8k filters and exact_match (opt-in:
`pip install -e ".[lm-eval]"`; skipped when the harness is not installed)."""
from importlib import resources
from pathlib import Path

import pytest

from kdengine.evals.data import read_problems
from kdengine.evals.lm_eval_filters import FILTERS, apply_filter, harness_correct

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install -e '.[lm-eval]')")

SAMPLE = Path(__file__).resolve().parent / "data" / "gsm8k_test_sample50.jsonl"
RESPONSES = [
    "so she makes 18.\n#### 18", "#### 1,000.", "she makes $18.", "3 and then 4", "-5 degrees", "nothing", "",
    "#### -3.50 dollars", "####18", "#### 12\n#### 13", "The answer is $1,234,567.89.", "1.2.3 and 4..5",
    "$$ 7", "-$5 and -6", "Total: 1,000.\n\nQuestion: next", "answer: 00042", "12, 13, and 14.",
    "\\boxed{72}", "x = -0.5, y = .5", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18",
    "答案是 42。", "It is 5th.", "#### ", "#### ,", "--7", "1,2,3,", "$", "3.14159\n", "10% of 200 is 20",
]


def _harness_config():
    import yaml

    text = (resources.files("lm_eval") / "tasks" / "gsm8k" / "gsm8k.yaml").read_text()
    return yaml.safe_load(text)


def _harness_extract(config, name, responses):
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    steps = next(f["filter"] for f in config["filter_list"] if f["name"] == name)
    assert [s["function"] for s in steps] == ["regex", "take_first"]
    regex = RegexFilter(**{k: v for k, v in steps[0].items() if k != "function"})
    return list(TakeFirstFilter().apply(regex.apply([[r] for r in responses], None), None))


def test_our_filters_extract_what_the_harness_extracts():
    config = _harness_config()
    responses = RESPONSES + [p.answer for p in read_problems(SAMPLE)]
    assert [f["name"] for f in config["filter_list"]] == list(FILTERS)
    for name in FILTERS:
        assert [apply_filter(name, r) for r in responses] == _harness_extract(config, name, responses), name


def test_our_exact_match_is_the_harness_exact_match():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    config = _harness_config()
    metric = next(m for m in config["metric_list"] if m["metric"] == "exact_match")
    options = {k: metric[k] for k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    answers = [p.answer for p in read_problems(SAMPLE)]
    checked = 0
    for name in FILTERS:
        for answer in answers[:10]:
            reference = answer.rsplit("#### ", 1)[1]
            for response in RESPONSES + [answer, f"#### {reference}.", f"${reference}", f"{reference}.00"]:
                extracted = apply_filter(name, response)
                theirs = exact_match_hf_evaluate([extracted], [answer], **options)["exact_match"] == 1.0
                assert harness_correct(extracted, answer) == theirs, (name, response, answer)
                checked += 1
    assert checked > 500
