"""Model mode: GSM8K prompts and batched greedy generation through the teacher protocol.

Prompts follow lm-evaluation-harness's `gsm8k` task so numbers stay comparable:
- plain (`chat=False`): each few-shot example as "Question: {q}\\nAnswer: {a}" joined by blank lines,
  then "Question: {q}\\nAnswer:"; generation stops at EOS or at the next "Question:".
- chat (`chat=True`): the tokenizer's chat template over alternating turns, user "Question:
  {q}\\nAnswer:" and assistant "{a}" for each few-shot example, then the question as the last user
  turn, with the generation prompt added (the harness's --apply_chat_template --fewshot_as_multiturn).
  These prompts are token ids (`teachers.encode_chat`), so the template's own BOS is not doubled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from kdengine.evals.data import Problem
from kdengine.evals.gsm8k import EvalError
from kdengine.progress import TokenBar

if TYPE_CHECKING:  # kdengine.teachers imports torch, which scoring a responses file never needs
    from kdengine.teachers.base import Prompt

STOP = ("Question:",)


@dataclass
class GenerationRun:
    """Completions in prompt order, the new tokens of each, and the wall time of generation."""

    texts: list[str]
    new_tokens: list[int]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


def build_prompts(questions: Sequence[str], fewshot: Sequence[Problem] = (), *, chat: bool = False,
                  tokenizer=None) -> list[Prompt]:
    """One prompt per question (formats in the module docstring): a string, or token ids with `chat`.

    Args:
        questions: the GSM8K questions.
        fewshot: worked examples placed before every question, in order.
        chat: format with `tokenizer`'s chat template instead of plain text.
        tokenizer: a transformers tokenizer; needed only when `chat` is set.
    Raises:
        EvalError: `chat` is set but the tokenizer has no chat template.
    """
    if not chat:
        shots = "".join(f"Question: {shot.question}\nAnswer: {shot.answer}\n\n" for shot in fewshot)
        return [f"{shots}Question: {question}\nAnswer:" for question in questions]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise EvalError("--chat needs a tokenizer with a chat template and this model's has none; "
                        "run with --no-chat (plain 'Question: ...\\nAnswer:' prompts)")
    from kdengine.teachers.encoding import encode_chat

    turns = []
    for shot in fewshot:
        turns += [{"role": "user", "content": f"Question: {shot.question}\nAnswer:"},
                  {"role": "assistant", "content": shot.answer}]
    return [encode_chat(tokenizer, turns + [{"role": "user", "content": f"Question: {question}\nAnswer:"}],
                        add_generation_prompt=True)
            for question in questions]


def generate_all(teacher, prompts: Sequence[Prompt], *, batch_size: int, max_new_tokens: int,
                 stop: Sequence[str] = STOP, progress: bool = True) -> GenerationRun:
    """Greedy completions of `prompts`, `batch_size` at a time, with a bar that moves every decoding
    step and shows generated tokens/s (kdengine.progress.TokenBar).

    Prompts are batched longest first so that each batch pads little and an out-of-memory batch
    shows up at the start; the results come back in the order of `prompts`.

    Args:
        teacher: an object with `generate(prompts, max_new_tokens=, stop=, on_step=) -> list[Generation]`
            (kdengine.teachers.base.Teacher).
        prompts: formatted prompts, text or token ids (build_prompts).
        batch_size: prompts per generate call.
        max_new_tokens: the cap on each completion's length.
        stop: strings that end a completion (not included in its text).
        progress: show the progress bar.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    new_tokens = [0] * len(prompts)
    start = time.perf_counter()
    with TokenBar(len(prompts), max_new_tokens, desc="generating", disable=not progress) as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            generations = teacher.generate([prompts[i] for i in batch], max_new_tokens=max_new_tokens, stop=list(stop),
                                           on_step=bar.step)
            if len(generations) != len(batch):
                raise RuntimeError(f"the teacher returned {len(generations)} completions for {len(batch)} prompts")
            for i, generation in zip(batch, generations):
                texts[i], new_tokens[i] = generation.text, generation.new_tokens
            bar.batch_done(len(batch), sum(g.new_tokens for g in generations))
    return GenerationRun(texts, new_tokens, time.perf_counter() - start)
