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
    assert isinstance(prompt, list)  # token ids: the template's own special tokens, no extra BOS
    assert tokenizer.decode(prompt) == ("<|im_start|>user\nQuestion: Tom has 2 apples and buys 3. How many?\nAnswer:<|im_end|>\n"
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


@pytest.mark.parametrize("backend, exit_code, message", [("hf", 1, "no such file or directory"),
                                                         ("nope", 2, "'nope' is not one of 'hf', 'exl2'")])
def test_an_unloadable_model_is_a_one_line_error(tmp_path, backend, exit_code, message):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"question": "q", "answer": "#### 1"}])
    result = CliRunner().invoke(cli, ["eval", "gsm8k", "--model", str(tmp_path / "no-such-model"), "--backend", backend,
                                      "--data", str(good), "--log-dir", str(tmp_path / "run")])
    assert result.exit_code == exit_code and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_generate_all_returns_completions_in_prompt_order(tiny_model_dir):
    from kdengine.evals.generation import generate_all
    from kdengine.teachers import load_teacher

    teacher = load_teacher(tiny_model_dir)
    prompts = build_prompts(["a b", "the apples cost 12 dollars each day", "how many?"])
    run = generate_all(teacher, prompts, batch_size=1, max_new_tokens=5, progress=False)
    one_by_one = [teacher.generate([prompt], max_new_tokens=5, stop=["Question:"])[0] for prompt in prompts]
    assert run.texts == [generation.text for generation in one_by_one]
    assert run.new_tokens == [generation.new_tokens for generation in one_by_one]
    assert run.seconds > 0 and run.tokens_per_s == sum(run.new_tokens) / run.seconds


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_model_mode_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, chat):
    from kdengine.evals.gsm8k import extract_answer

    problems = [{"question": f"Tom has {a} apples and buys {b} more. How many apples?",
                 "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(2, 3), (10, 4), (7, 7), (1, 0), (5, 9)]]
    data = _write_jsonl(tmp_path / "data.jsonl", problems)
    shots = _write_jsonl(tmp_path / "shots.jsonl", problems[-1:])
    args = ["eval", "gsm8k", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "4", "--batch-size", "3",
            "--max-new-tokens", "12", "--fewshot", str(shots), "--log-dir", str(tmp_path / "run"),
            "--chat" if chat else "--no-chat", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    items = report["items"]
    assert report["n"] == len(items) == 4
    assert [item["index"] for item in items] == [0, 1, 2, 3]
    assert [item["reference"] for item in items] == [5, 14, 14, 1]
    assert sum(rule["count"] for rule in report["rules"].values()) == report["n"]
    assert sum(rule["correct"] for rule in report["rules"].values()) == report["correct"]
    assert report["correct"] == sum(item["correct"] for item in items)
    assert report["accuracy"] == report["correct"] / report["n"]
    for item in items:
        assert (item["prediction"], item["rule"]) == extract_answer(item["response"])
        assert "Question:" not in item["response"]
    review = (tmp_path / "run" / "manual_review.jsonl").read_text().splitlines()
    assert len(review) == report["rules"]["none"]["count"]

    assert report["model"] == str(tiny_model_dir.resolve())
    assert (report["backend"], report["device"], report["dtype"]) == ("hf", "cpu", "fp32")
    assert report["decoding"] == {"greedy": True, "max_new_tokens": 12, "batch_size": 3, "chat": chat,
                                  "fewshot": str(shots), "n_fewshot": 1, "stop": ["Question:", "EOS"]}
    assert 4 <= report["new_tokens"] <= 4 * 12 and 0 <= report["hit_max_new_tokens"] <= 4
    assert report["tokens_per_s"] > 0 and report["wall_s"] >= report["generate_s"] > 0
    assert report["first_prompt"].endswith("<|im_start|>assistant\n" if chat else "How many apples?\nAnswer:")
    assert set(report["lm_eval"]) == {"strict-match", "flexible-extract"}
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert f"({report['correct']} / 4)" in markdown and "## Prompt of item 0" in markdown
