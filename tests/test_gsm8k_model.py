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
