"""The protocol every teacher backend implements, and the device-side top-k reduction.

A backend (hf.py, exl2.py) owns a model and its tokenizer. The dump asks it for full-vocab logits
of a right-padded batch and reduces them to top-k log-probabilities on the teacher's device with
`topk_logprobs`, so only K ids and K log-probs per position ever cross to the CPU. The evaluator asks
it to generate greedily, and `kdengine generate` asks it for logits one step at a time (`begin_decode`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union

import torch

Prompt = Union[str, Sequence[int]]  # plain text, or token ids already encoded (see encoding.py)


class TeacherError(Exception):
    """A teacher cannot be loaded or used as asked: the message names the path or option and the fix."""


@dataclass
class Generation:
    """One greedy completion.

    text: the decoded continuation, without the EOS token, the stop string or anything after it.
    new_tokens: tokens generated for it, counting the EOS or the token that completed the stop string
        (the work spent, for tokens/s).
    """

    text: str
    new_tokens: int


class Teacher(Protocol):
    name: str  # what the manifest and reports call the model (a path or a hub-style name)
    tokenizer: "object"  # a transformers PreTrainedTokenizerBase
    fingerprint: str  # tokenizer_fingerprint(tokenizer)
    vocab_size: int  # V: the last dim of logits(); logits are sliced to the tokenizer's vocabulary
    context_length: int | None  # the longest sequence logits() is valid for (None: the model states none)
    device: torch.device

    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Full-vocab next-token logits for a right-padded batch.

        Args:
            input_ids: int64 [B, T], right-padded; positions t >= lengths[b] are padding.
            lengths: int64 [B], the true length of each row.
        Returns:
            float [B, T, V] on `self.device`; rows past `lengths` hold unspecified values.
        """
        ...

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, stop: Sequence[str] = (),
                 on_step: Callable[[int], None] | None = None) -> list[Generation]:
        """Greedy continuations of already-formatted prompts, one batch, stopping at EOS or any `stop` string.

        Args:
            prompts: each either plain text (encoded with `encoding.encode_text`: the tokenizer's BOS
                convention) or token ids (e.g. `encoding.encode_chat(..., add_generation_prompt=True)`
                for a chat prompt, which must not get a second BOS).
            max_new_tokens: at most this many tokens per prompt.
            stop: strings that end a completion; they are searched in the generated text only.
            on_step: called as decoding goes with the number of tokens just generated (for a progress
                bar, kdengine.progress.TokenBar.step); the calls of one batch add up to its new_tokens.
        Returns:
            One Generation per prompt, in order.
        """
        ...

    def begin_decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> "Decoding":
        """Prefills a batch of prompts (token ids) for step-by-step decoding by kdengine.decode, which
        picks every token and captures the targets; the backend only runs the model."""
        ...


class Decoding(Protocol):
    """One batch being decoded (Teacher.begin_decode)."""

    eos_ids: Sequence[int]  # ids that end a response
    logits: torch.Tensor  # float [B, V] on the teacher's device: the next-token logits after each prompt

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends one token per row (int64 [B]; finished rows get any valid id) and returns the
        next-token logits [B, V]."""
        ...


def check_batch(input_ids: torch.Tensor, lengths: torch.Tensor, vocab: int) -> None:
    """Raises ValueError unless input_ids is an int [B, T] batch with lengths [B] in [1, T] and ids in [0, vocab)."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an int32/int64 [B, T] tensor, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if lengths.shape != input_ids.shape[:1]:
        raise ValueError(f"lengths must be [B] = [{input_ids.shape[0]}], got {tuple(lengths.shape)}")
    if input_ids.numel() == 0 or int(lengths.min()) < 1 or int(lengths.max()) > input_ids.shape[1]:
        raise ValueError(f"every length must be in [1, T={input_ids.shape[1]}], got {lengths.tolist()}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got values in [{low}, {high}]")


@dataclass
class TopK:
    """Top-k of a log-softmax, per position: ids int32 [..., K] and log-probs float32 [..., K],
    sorted by descending probability; log-probs are normalised over the full vocabulary."""

    idx: torch.Tensor
    logp: torch.Tensor
    tempered_lse: torch.Tensor | None = None  # float32 [..., len(temperatures)]: c_T per asked T



def topk_logprobs(logits: torch.Tensor, k: int, *, temperatures: Sequence[float] = (),
                  rows_per_chunk: int = 4096) -> TopK:
    """Top-k token ids and their full-vocab log-probabilities, computed where `logits` live.

    The log-softmax is taken in float32 a chunk of rows at a time so that a [B, T, V] half-precision
    input never needs a full float32 copy of itself.

    Args:
        logits: float [..., V] (fp32, bf16 or fp16), on any device.
        k: how many entries to keep, 1 <= k <= V.
        temperatures: for each T, also c_T = logsumexp over the full vocabulary of logp / T, the one
            number per position that makes the tempered teacher exact from its top-k (FORMAT.md,
            "Section tempered_lse").
    Returns:
        TopK with idx int32 [..., k] and logp float32 [..., k] (and tempered_lse float32
        [..., len(temperatures)] when asked), on the same device as `logits`.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k must be in [1, {vocab}] (the vocabulary size), got {k}")
    flat = logits.reshape(-1, vocab)
    idx = torch.empty(flat.shape[0], k, dtype=torch.int32, device=logits.device)
    logp = torch.empty(flat.shape[0], k, dtype=torch.float32, device=logits.device)
    lse_t = torch.empty(flat.shape[0], len(temperatures), dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        rows = flat[start:start + rows_per_chunk].float()
        top_val, top_idx = rows.topk(k, dim=-1, sorted=True)
        lse = rows.logsumexp(dim=-1, keepdim=True)
        logp[start:start + rows_per_chunk] = top_val - lse
        idx[start:start + rows_per_chunk] = top_idx.to(torch.int32)
        if temperatures:
            full = rows - lse
            lse_t[start:start + rows_per_chunk] = torch.stack(
                [(full / t).logsumexp(dim=-1) for t in temperatures], dim=-1)
    shape = logits.shape[:-1] + (k,)
    tempered = lse_t.reshape(logits.shape[:-1] + (len(temperatures),)) if temperatures else None
    return TopK(idx=idx.reshape(shape), logp=logp.reshape(shape), tempered_lse=tempered)
