"""`kdengine eval gsm8k --responses`: end to end through the CLI, input checks and the report files."""
import json
import re

import pytest
from click.testing import CliRunner

from kdengine.cli import cli

RESPONSES = [
    {"question": "Eggs?", "answer": "16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18", "response": "So \\boxed{18}."},
    {"question": "Bolts?", "answer": "2 / 2 = 1\n#### 3", "response": "It takes 2 + 1 bolts\nthe answer is 3 bolts"},
    {"question": "Profit?", "answer": "#### 70,000", "response": "$70,000.00\nprofit"},
    {"question": "Meters?", "answer": "#### 540", "response": "3 * 3 = 9 sprints\n9 * 60 = 530 meters"},
    {"question": "Cups?", "answer": "#### 20", "response": "I am not sure."},
    {"question": "Cost?", "answer": "#### 64", "response": "Each costs 4 * 16.\nThe final answer is 64.\n#### 64"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _invoke(*args):
    return CliRunner().invoke(cli, ["eval", "gsm8k", *map(str, args)])


@pytest.mark.parametrize("cascade", ["gsm8k", "original", None])
def test_responses_mode_writes_all_reports(tmp_path, cascade):
    responses = _write_jsonl(tmp_path / "outputs.jsonl", RESPONSES)
    result = _invoke("--responses", responses, "--log-dir", tmp_path / "run",
                     *(["--cascade", cascade] if cascade else []))
    assert result.exit_code == 0, result.output
    cascade = cascade or "gsm8k"
    assert f"GSM8K accuracy 66.67% (4/6, cascade {cascade})" in result.output

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (report["accuracy"], report["n"], report["correct"], report["cascade"]) == (4 / 6, 6, 4, cascade)
    marker = {"hash_marker": {"count": 1, "correct": 1}} if cascade == "gsm8k" else {}
    assert report["rules"] == {
        **marker,
        "boxed": {"count": 1, "correct": 1},
        "first_line": {"count": 1, "correct": 1},
        "answer_phrase": {"count": 2 - len(marker), "correct": 2 - len(marker)},
        "last_number": {"count": 1, "correct": 0},
        "none": {"count": 1, "correct": 0},
    }
    assert [set(item) for item in report["items"]] == [
        {"index", "prediction", "reference", "rule", "correct", "response"}] * 6
    assert [(item["index"], item["prediction"], item["reference"], item["rule"], item["correct"])
            for item in report["items"]] == [
        (0, 18, 18, "boxed", True),
        (1, 3, 3, "answer_phrase", True),
        (2, 70000, 70000, "first_line", True),
        (3, 530, 540, "last_number", False),
        (4, -1, 20, "none", False),
        (5, 64, 64, "hash_marker" if cascade == "gsm8k" else "answer_phrase", True),
    ]
    assert report["items"][0]["response"] == RESPONSES[0]["response"]
    # strict-match finds only "#### 64". flexible-extract takes the last number-like run: "18", "3" and
    # "64" are right, "$70,000.00" is wrong there (string match after removing "," and "$"), "530" wrong.
    assert report["lm_eval"]["strict-match"] == {"accuracy": 1 / 6, "correct": 1, "agreement": 3 / 6}
    assert report["lm_eval"]["flexible-extract"] == {"accuracy": 3 / 6, "correct": 3, "agreement": 5 / 6}

    review = [json.loads(line) for line in (tmp_path / "run" / "manual_review.jsonl").read_text().splitlines()]
    assert review == [{"index": 4, "question": "Cups?", "reference": 20, "response": "I am not sure."}]

    markdown = (tmp_path / "run" / "report.md").read_text()
    assert f"**Accuracy: 66.67%** (4 / 6), extraction cascade `{cascade}`" in markdown
    assert f"| answer_phrase | {2 - len(marker)} | {2 - len(marker)} | 100.0% |" in markdown
    assert "### item 4 (reference 20)" in markdown and "I am not sure." in markdown
    assert "### item 3: reference 540, predicted 530 (`last_number`)" in markdown


def test_default_log_dir_is_under_logs_with_file_name_and_utc_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "my outputs.jsonl", RESPONSES[:1])
    result = _invoke("--responses", "my outputs.jsonl")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.startswith("gsm8k-my-outputs-") and run.name.endswith("Z")
    assert sorted(p.name for p in run.iterdir()) == ["manual_review.jsonl", "report.json", "report.md"]
    assert (run / "manual_review.jsonl").read_text() == ""


def test_report_md_quotes_responses_safely(tmp_path):
    tricky = {"question": "q", "answer": "#### 1", "response": "Look:\n```\n| 2 |\n```\n2"}
    _write_jsonl(tmp_path / "r.jsonl", [tricky])
    assert _invoke("--responses", tmp_path / "r.jsonl", "--log-dir", tmp_path / "run").exit_code == 0
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "````text\nLook:\n```\n| 2 |\n```\n2\n````" in markdown


BAD_INPUTS = [
    ('{"question": "q", "answer": "#### 1", "response": "1"}\n{"question": "q", "answer": "#### 1",\n',
     r"bad\.jsonl:2: not valid JSON: Expecting property name enclosed in double quotes at column \d+"),
    ('\n\n{"question": "q", "response": "1"}\n', r"bad\.jsonl:3: missing field 'answer' \(each line needs question, answer, response\)"),
    ('{"question": "q", "answer": "#### 1"}\n', r"bad\.jsonl:1: missing field 'response'"),
    ('{"question": "q", "answer": "so 18", "response": "18"}\n', r"bad\.jsonl:1: the answer has no '####'"),
    ('{"question": "q", "answer": "#### x", "response": "18"}\n', r"bad\.jsonl:1: no number after '####'"),
    ('{"question": "q", "answer": "#### 1", "response": null}\n', r"bad\.jsonl:1: field 'response' must be a string, got NoneType"),
    ('["question", "answer"]\n', r"bad\.jsonl:1: expected a JSON object, got a JSON list"),
    ("\n  \n", r"bad\.jsonl: no problems in the file"),
]


@pytest.mark.parametrize("content, message", BAD_INPUTS)
def test_bad_responses_file_fails_with_file_line_and_writes_nothing(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    result = _invoke("--responses", bad, "--log-dir", tmp_path / "run")
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert "Traceback" not in result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: ")
    assert re.search(message, error), error
    assert not (tmp_path / "run").exists()


def test_not_utf8_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "#### 1", "response": "1"}\n{"question": "\xff"}\n')
    result = _invoke("--responses", bad, "--log-dir", tmp_path / "run")
    assert result.exit_code == 1 and "bad.jsonl:2: not valid UTF-8 (byte 15 of the line)" in result.output
    assert not (tmp_path / "run").exists()


def test_log_dir_with_a_report_is_refused(tmp_path):
    responses = _write_jsonl(tmp_path / "r.jsonl", RESPONSES)
    assert _invoke("--responses", responses, "--log-dir", tmp_path / "run").exit_code == 0
    before = (tmp_path / "run" / "report.json").read_text()
    result = _invoke("--responses", responses, "--log-dir", tmp_path / "run")
    assert result.exit_code == 1
    assert "already holds report.json" in result.output and "pass another --log-dir" in result.output
    assert (tmp_path / "run" / "report.json").read_text() == before


@pytest.mark.parametrize("args, message", [
    ([], "pass exactly one of --responses"),
    (["--responses", "{responses}", "--model", "m"], "pass exactly one of --responses"),
    (["--responses", "{responses}", "--chat"], "--chat only apply with --model"),
    (["--responses", "{responses}", "--limit", "2", "--no-chat"], "--limit, --chat only apply with --model"),
    (["--model", "some/model"], "--model needs --data"),
    (["--responses", "{responses}", "--log-dir", "{responses}"], "is a file"),
])
def test_option_misuse_is_a_usage_error(tmp_path, args, message):
    responses = _write_jsonl(tmp_path / "r.jsonl", RESPONSES)
    result = _invoke(*[arg.format(responses=responses) for arg in args])
    assert result.exit_code == 2
    assert message in result.output


def test_help_explains_every_option():
    result = _invoke("--help")
    assert result.exit_code == 0
    for option in ("--responses", "--model", "--backend", "--data", "--limit", "--batch-size", "--max-new-tokens",
                   "--chat / --no-chat", "--fewshot", "--log-dir", "--device", "--dtype"):
        assert option in result.output
