"""Model mode: prompt formats, and `kdengine eval gsm8k --model` end to end on the tiny random Llama."""
import json

import pytest
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.evals.data import Problem
from kdengine.evals.generation import build_prompts
from kdengine.evals.gsm8k import EvalError

SHOTS = [Problem("Tom has 2 apples and buys 3. How many?", "2 + 3 = 5\n#### 5", 5),
         Problem("Ann has 4 pens and loses 1. How many?", "4 - 1 = 3\n#### 3", 3)]


def test_plain_prompts_follow_the_harness_format():
    prompts = build_prompts(["How many eggs?", "How many bolts?"], SHOTS)
    assert prompts[0] == ("Question: Tom has 2 apples and buys 3. How many?\nAnswer: 2 + 3 = 5\n#### 5\n\n"
                          "Question: Ann has 4 pens and loses 1. How many?\nAnswer: 4 - 1 = 3\n#### 3\n\n"
                          "Question: How many eggs?\nAnswer:")
    assert build_prompts(["How many bolts?"]) == ["Question: How many bolts?\nAnswer:"]


def test_chat_prompts_use_the_template_with_fewshot_turns(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    (prompt,) = build_prompts(["How many eggs?"], SHOTS[:1], chat=True, tokenizer=tokenizer)
    assert prompt == ("<|im_start|>user\nQuestion: Tom has 2 apples and buys 3. How many?\nAnswer:<|im_end|>\n"
                      "<|im_start|>assistant\n2 + 3 = 5\n#### 5<|im_end|>\n"
                      "<|im_start|>user\nQuestion: How many eggs?\nAnswer:<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_chat_without_a_template_is_an_actionable_error(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = None
    with pytest.raises(EvalError, match="run with --no-chat"):
        build_prompts(["q"], chat=True, tokenizer=tokenizer)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_inputs_are_checked_before_the_model_is_loaded(tmp_path):
    data = _write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
    good = _write_jsonl(tmp_path / "good.jsonl", [{"question": "q", "answer": "#### 1"}])
    shots = _write_jsonl(tmp_path / "shots.jsonl", [{"question": "q", "answer": "no marker"}])
    missing_model = str(tmp_path / "no-such-model")
    runner = CliRunner()

    result = runner.invoke(cli, ["eval", "gsm8k", "--model", missing_model, "--data", str(data),
                                 "--log-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and "data.jsonl:2: missing field 'answer'" in result.output
    result = runner.invoke(cli, ["eval", "gsm8k", "--model", missing_model, "--data", str(good),
                                 "--fewshot", str(shots), "--log-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and "shots.jsonl:1: the answer has no '####'" in result.output
    assert not (tmp_path / "run").exists()

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "report.json").write_text("{}")
    result = runner.invoke(cli, ["eval", "gsm8k", "--model", missing_model, "--data", str(good),
                                 "--log-dir", str(tmp_path / "used")])
    assert result.exit_code == 1 and "already holds report.json" in result.output
