"""Scoring a list of responses and writing the run's reports into its log directory.

A log directory holds three files:
- `report.json`: `accuracy` (a fraction in [0, 1]), `n`, `correct`, `cascade` (the extraction
  cascade's name, gsm8k.CASCADES), `rules` ({rule: {count, correct}} for every rule of that cascade,
  in cascade order, then "none"), `lm_eval` ({filter: {accuracy,
  correct, agreement}}: the harness's scoring of the same responses and the fraction of items on
  which its verdict equals ours), any run settings the caller passes (model mode: model, decoding
  settings, tokens_per_s, wall_s, ...), and `items` (one per input: index, prediction, reference,
  rule, correct, response). An integer too long for JSON readers (over 4300 digits) is written as a
  string.
- `report.md`: the same at a glance, with the items that need manual review and the first wrong ones.
- `manual_review.jsonl`: one line per item where no rule found a number (index, question,
  reference, response); empty when there are none.
"""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Sequence

from kdengine.durable import write_atomic
from kdengine.evals.data import Problem
from kdengine.evals.gsm8k import DEFAULT_CASCADE, EvalError, Number, extract_answer, is_correct, rules
from kdengine.evals.lm_eval_filters import FILTERS, apply_filter, harness_correct

REPORT_FILES = ("report.json", "report.md", "manual_review.jsonl")
_WRONG_SHOWN = 5
_RESPONSE_SHOWN = 1500  # characters of a response quoted in report.md


def build_report(problems: Sequence[Problem], responses: Sequence[str], settings: dict | None = None, *,
                 cascade: str = DEFAULT_CASCADE) -> dict:
    """Scores `responses[i]` against `problems[i]` with our cascade and with the harness's filters.

    Args:
        problems: the items, with their reference values.
        responses: one model output per problem.
        settings: run facts to record (model, decoding settings, timings); placed before `items`.
        cascade: the extraction cascade, a name in gsm8k.CASCADES.
    Returns:
        The report.json content as a dict (layout in the module docstring).
    """
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    items = []
    counts_by_rule = {rule: {"count": 0, "correct": 0} for rule in rules(cascade)}
    harness = {name: {"correct": 0, "agree": 0} for name in FILTERS}
    for index, (problem, response) in enumerate(zip(problems, responses)):
        prediction, rule = extract_answer(response, cascade)
        correct = is_correct(prediction, rule, problem.reference)
        counts_by_rule[rule]["count"] += 1
        counts_by_rule[rule]["correct"] += correct
        for name in FILTERS:
            verdict = harness_correct(apply_filter(name, response), problem.answer)
            harness[name]["correct"] += verdict
            harness[name]["agree"] += verdict == correct
        items.append({"index": index, "prediction": prediction, "reference": problem.reference, "rule": rule,
                      "correct": correct, "response": response})
    n = len(items)
    correct_total = sum(item["correct"] for item in items)
    lm_eval = {name: {"accuracy": counts["correct"] / n, "correct": counts["correct"],
                      "agreement": counts["agree"] / n} for name, counts in harness.items()}
    return {"accuracy": correct_total / n, "n": n, "correct": correct_total, "cascade": cascade,
            "rules": counts_by_rule,
            "lm_eval": lm_eval, **(settings or {}), "items": items}


def check_log_dir(log_dir: Path) -> None:
    """Refuses a log directory that already holds a report, before any work is done.

    Raises:
        EvalError: `log_dir` is a file, or holds one of REPORT_FILES.
    """
    if log_dir.exists() and not log_dir.is_dir():
        raise EvalError(f"{log_dir}: the log dir is a file; pass --log-dir with a directory path")
    taken = [name for name in REPORT_FILES if (log_dir / name).exists()]
    if taken:
        raise EvalError(f"{log_dir}: already holds {', '.join(taken)} from an earlier run; "
                        "pass another --log-dir or remove that directory")


def write_report(log_dir: Path, report: dict, problems: Sequence[Problem]) -> None:
    """Writes report.json, report.md and manual_review.jsonl into `log_dir` (created if needed).
    Each file appears complete or not at all (written under a temporary name, then renamed)."""
    check_log_dir(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    review = [{"index": item["index"], "question": problems[item["index"]].question,
               "reference": _json_number(item["reference"]), "response": item["response"]}
              for item in report["items"] if item["rule"] == "none"]
    json_report = {**report, "items": [{**item, "prediction": _json_number(item["prediction"]),
                                        "reference": _json_number(item["reference"])}
                                       for item in report["items"]]}
    texts = {"report.json": json.dumps(json_report, indent=2, ensure_ascii=False) + "\n",
             "manual_review.jsonl": "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in review),
             "report.md": render_markdown(report)}
    for name, text in texts.items():
        write_atomic(log_dir / name, text.encode("utf-8"))


def render_markdown(report: dict) -> str:
    """report.md: headline accuracy, run settings, the rule table, the harness comparison, the items
    that need manual review, the first few wrong items and (model mode) the first prompt."""
    items = report["items"]
    lines = [f"# GSM8K: {report.get('model') or report.get('responses_file', 'responses')}", "",
             f"**Accuracy: {report['accuracy']:.2%}** ({report['correct']} / {report['n']}), "
             f"extraction cascade `{report['cascade']}`", ""]
    settings = {k: v for k, v in report.items()
                if k not in ("accuracy", "n", "correct", "cascade", "rules", "lm_eval", "items", "first_prompt")}
    if settings:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in settings.items()]
        lines.append("")
    lines += [f"## Extraction rules (cascade `{report['cascade']}`, tried in this order)", "", "| rule | count | correct | accuracy |", "|---|---:|---:|---:|"]
    for rule, counts in report["rules"].items():
        share = f"{counts['correct'] / counts['count']:.1%}" if counts["count"] else "-"
        lines.append(f"| {rule} | {counts['count']} | {counts['correct']} | {share} |")
    lines += ["", "## lm-evaluation-harness filters (same responses)", "",
              "| filter | accuracy | correct | agreement with ours |", "|---|---:|---:|---:|"]
    for name, scores in report["lm_eval"].items():
        lines.append(f"| {name} | {scores['accuracy']:.2%} | {scores['correct']} | {scores['agreement']:.1%} |")
    review = [item for item in items if item["rule"] == "none"]
    lines += ["", f"## Manual review ({len(review)} items: no number found, scored wrong)", ""]
    if not review:
        lines += ["None.", ""]
    for item in review:
        lines += [f"### item {item['index']} (reference {_text(item['reference'])})", "", *_quote(item["response"])]
    wrong = [item for item in items if not item["correct"] and item["rule"] != "none"][:_WRONG_SHOWN]
    lines += [f"## First wrong items ({len(wrong)} shown)", ""]
    if not wrong:
        lines += ["None.", ""]
    for item in wrong:
        lines += [f"### item {item['index']}: reference {_text(item['reference'])}, "
                  f"predicted {_text(item['prediction'])} (`{item['rule']}`)", "", *_quote(item["response"])]
    if "first_prompt" in report:
        lines += ["## Prompt of item 0", "", *_quote(report["first_prompt"])]
    return "\n".join(lines)


def _quote(response: str) -> list[str]:
    """A fenced block that shows `response` verbatim (truncated), whatever backticks it holds."""
    shown = response if len(response) <= _RESPONSE_SHOWN else response[:_RESPONSE_SHOWN] + " [...]"
    longest_run = run = 0
    for char in shown:
        run = run + 1 if char == "`" else 0
        longest_run = max(longest_run, run)
    fence = "`" * max(3, longest_run + 1)
    return [fence + "text", shown, fence, ""]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        value = ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", "\\n")


def _json_number(value: Number) -> Number | str:
    return str(Decimal(value)) if isinstance(value, int) and value.bit_length() > 14000 else value


def _text(value: Number) -> str:
    return str(_json_number(value))
