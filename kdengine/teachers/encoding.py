"""How text becomes token ids: one convention shared by the dump (corpus.py), the evaluator and every
teacher backend, so that the prompt a model is asked to continue at evaluation time is, token for
token, the prefix the teacher was scored on when the store was dumped.

- Plain text gets the tokenizer's own leading special tokens (its BOS, if its post-processor adds one)
  and nothing at the end: an end-of-sequence token is added by whoever means it (corpus.py does after
  a response), never implicitly by a tokenizer that appends EOS to everything it encodes.
- Chat conversations are rendered by the tokenizer's chat template and the rendered text is tokenized
  without adding special tokens, exactly as `tokenizer.apply_chat_template(..., tokenize=True)` does
  (the template writes its own BOS where the model wants one).
"""
from __future__ import annotations

from typing import Mapping, Sequence

_PROBE = "a"  # any short text: only the special tokens around it matter


def special_prefix(tokenizer) -> list[int]:
    """The special-token ids the tokenizer puts before any text it encodes (usually [BOS] or [])."""
    with_special = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start:start + len(bare)] == bare:
            return with_special[:start]
    raise ValueError(
        f"cannot tell which special tokens the tokenizer adds: {_PROBE!r} encodes to {bare} bare "
        f"and to {with_special} with special tokens, which does not contain it"
    )


def encode_text(tokenizer, text: str, *, prefix: Sequence[int] | None = None) -> list[int]:
    """Token ids of plain text: the tokenizer's special prefix (see `special_prefix`), then the text.

    Args:
        tokenizer: a transformers tokenizer.
        text: the text to encode.
        prefix: `special_prefix(tokenizer)`, when the caller has it already (it costs two encodes).
    """
    head = special_prefix(tokenizer) if prefix is None else list(prefix)
    return head + tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template.

    Args:
        tokenizer: a transformers tokenizer with a `chat_template`.
        messages: [{"role": ..., "content": ...}, ...].
        add_generation_prompt: end with the template's opening of an assistant turn (what a model is
            asked to continue at evaluation time).
    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so chat formatting is unavailable; "
                         "use plain formatting (no --chat) or a tokenizer that ships a template")
    return list(tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    ))
