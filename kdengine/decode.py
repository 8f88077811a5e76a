"""Token-by-token decoding above the teacher backends: the choice of each next token (greedy, or
seeded sampling with temperature and top-p) and the capture of the teacher's targets at every step.

A backend only runs the model (`teacher.begin_decode(prompts, max_new_tokens)`: a batch of prompts
prefilled into its KV cache, then one `step(tokens)` per generated token, each returning next-token
logits [B, V]);
everything that decides what gets written lives here, once, for every backend:

- `pick_tokens`: the next token of each row. Temperature 0 is argmax (what transformers'
  `generate(do_sample=False)` does); above 0 it samples from softmax(logits / T), restricted to the
  smallest set of most likely tokens whose mass reaches top_p, with one uniform draw per row from
  that row's own generator. Each response has its own generator, seeded from (seed, prompt id,
  sample number), so a response does not depend on which other prompts share its batch, its shard or
  its rank, nor on whether the run was resumed.
- a target capture: what the store keeps at each step, computed from the raw logits (the T = 1
  distribution, never the sampling one) on the teacher's device; only its [B, K] result crosses to
  the CPU. `TopKCapture` keeps the top-k; `SampleCapture` draws RS-KD targets
  (kdengine.sampling.draw_targets), each row from its own generator, independent of the token-picking
  one, so the responses are the same whichever targets are captured.
- `decode_batch`: the loop; rows end at an EOS id, at a stop string, or at max_new_tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from kdengine.sampling import TeacherDraws, draw_targets
from kdengine.store.format import TEMPERED_LSE
from kdengine.teachers.base import topk_logprobs


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_p in (0, 1] is the nucleus mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def response_generator(seed: int, prompt_id: str, sample: int) -> torch.Generator:
    """The CPU generator of one response: a function of (seed, prompt id, sample number) only."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{sample}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def pick_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator | None],
                active: Sequence[bool]) -> torch.Tensor:
    """The next token of every row (see the module docstring).

    Args:
        logits: float [B, V], any device.
        sampling: the settings.
        generators: one per row (None when greedy).
        active: rows still generating; only they draw from their generator.
    Returns:
        int64 [B] on the device of `logits`; finished rows get an arbitrary valid id.
    """
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p  # the head whose mass first reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    cdf = probs.double().cumsum(-1)
    draws = torch.tensor([float(torch.rand((), generator=g, dtype=torch.float64)) if a else 0.0
                          for g, a in zip(generators, active)], dtype=torch.float64)
    picked = torch.searchsorted(cdf, (draws.to(cdf.device) * cdf[:, -1])[:, None], right=True)[:, 0]
    return torch.where(picked < logits.shape[-1], picked, probs.argmax(-1))  # u * mass rounded up to the mass


class TargetCapture(Protocol):
    """What the store keeps at each generated position."""

    def take(self, logits: torch.Tensor, active: Sequence[bool]) -> tuple[np.ndarray, ...]:
        """Targets of every row from its next-token logits [B, V], as arrays whose first dimension is B
        (rows not `active` have finished: they may hold anything)."""
        ...

    def targets(self, rows: list[tuple[np.ndarray, ...]]):
        """One response's targets from its rows of `take` (one per position, at least one), as the
        producer writes them (producer.py)."""
        ...


def topk_targets(idx: np.ndarray, logp: np.ndarray, tempered_lse: np.ndarray | None = None) -> tuple:
    """A top-k store's targets of P positions as the producer writes them: (idx, logp), plus the
    c_T section when temperatures were asked."""
    return (idx, logp) if tempered_lse is None else (idx, logp, {TEMPERED_LSE: tempered_lse})


class TopKCapture:
    """The teacher's top-k log-probs of its T = 1 distribution (the tail is what they leave), and c_T
    for each of `temperatures` (FORMAT.md, "Section tempered_lse")."""

    def __init__(self, k: int, temperatures: Sequence[float] = ()):
        self.k, self.temperatures = k, tuple(temperatures)

    def take(self, logits: torch.Tensor, active: Sequence[bool]) -> tuple[np.ndarray, ...]:
        top = topk_logprobs(logits, self.k, temperatures=self.temperatures)
        lse = (top.tempered_lse.cpu().numpy(),) if self.temperatures else ()
        return (top.idx.cpu().numpy(), top.logp.cpu().numpy()) + lse

    def targets(self, rows: list[tuple[np.ndarray, ...]]) -> tuple:
        return topk_targets(*(np.stack(column) for column in zip(*rows)))


class SampleCapture:
    """`samples` draws per position from the teacher's T = 1 distribution tempered by
    `proposal_temperature` (kdengine.sampling.draw_targets), row i from its own generator seeded with
    `seeds[i]` (made on the logits' device at the first step): a response's draws depend on its seed
    alone, not on its batch-mates. Each row is padded to `samples` (+ `exact_top`) slots with count 0,
    as TeacherDraws pads, so the rows of a response stack."""

    def __init__(self, samples: int, proposal_temperature: float, seeds: Sequence[int], exact_top: int = 0):
        self.samples, self.proposal_temperature, self.seeds = samples, float(proposal_temperature), list(seeds)
        self.exact_top = exact_top
        self._generators: list[torch.Generator] | None = None

    def take(self, logits: torch.Tensor, active: Sequence[bool]) -> tuple[np.ndarray, ...]:
        if self._generators is None:
            self._generators = [torch.Generator(device=logits.device).manual_seed(s) for s in self.seeds]
        n, m = logits.shape[0], self.samples + self.exact_top
        ids, counts = np.zeros((n, m), np.int32), np.zeros((n, m), np.int32)
        logp, log_norm = np.zeros((n, m), np.float32), np.zeros(n, np.float32)
        for row in (r for r in range(n) if active[r]):
            d = draw_targets(logits[row:row + 1], self.samples, proposal_temperature=self.proposal_temperature,
                             exact_top=self.exact_top, generator=self._generators[row])
            k = d.ids.shape[1]
            ids[row, :k], counts[row, :k], logp[row, :k] = d.ids[0].numpy(), d.counts[0].numpy(), d.logp[0].numpy()
            log_norm[row] = d.log_norm[0].item()
        return ids, counts, logp, log_norm

    def targets(self, rows: list[tuple[np.ndarray, ...]]) -> TeacherDraws:
        return TeacherDraws(*(torch.from_numpy(np.stack(column)) for column in zip(*rows)))


@dataclass
class Decoded:
    """One response: its token ids (EOS included when it ended on one), why it ended, and the
    captured targets of its positions (row i predicts tokens[i]) as the capture's `targets` gives
    them (top-k: (idx [P, K], logp [P, K]) and the c_T section; sampled: a TeacherDraws); None
    without a capture or without a position. `generated` counts every token the teacher produced, the
    ones cut with a stop string included."""

    tokens: list[int]
    finish: str
    generated: int
    targets: object = None
    text: str = ""


def decode_batch(teacher, prompts: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None], *,
                 sampling: Sampling, max_new_tokens: int, capture: TargetCapture | None = None,
                 stop: Sequence[str] = (), on_step: Callable[[int], None] | None = None) -> list[Decoded]:
    """Decodes one batch of prompts (token ids) through `teacher.begin_decode`.

    Args:
        teacher: a backend with `begin_decode` and `tokenizer` (base.Teacher).
        prompts: token ids, one list per row.
        generators: one per row (`response_generator`); None entries when greedy.
        sampling: how tokens are picked.
        max_new_tokens: the most tokens a row generates.
        capture: what to keep at each step; None keeps nothing (generation alone, for benchmarks).
        stop: strings that end a row once its decoded text contains one; the response keeps the tokens
            before the one that completed it and its text is cut at the string.
        on_step: called after every step with the number of rows that generated a token in it.
    Returns:
        One Decoded per prompt, in order; `text` is the decoded response without special tokens,
        cut at the stop string.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    n = len(prompts)
    decoding = teacher.begin_decode([list(map(int, p)) for p in prompts], max_new_tokens)
    eos = set(decoding.eos_ids)
    tokenizer = teacher.tokenizer
    tokens: list[list[int]] = [[] for _ in range(n)]
    captured: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    window = max((len(s.encode("utf-8")) for s in stop), default=0) + 1
    logits = decoding.logits
    with torch.inference_mode():
        for step in range(max_new_tokens):
            active = [f is None for f in finish]
            if capture is not None:
                taken = capture.take(logits, active)
            picked = pick_tokens(logits, sampling, generators, active).tolist()
            for row in range(n):
                if not active[row]:
                    continue
                tokens[row].append(picked[row])
                if capture is not None:
                    captured[row].append(tuple(a[row] for a in taken))
                if picked[row] in eos:
                    finish[row] = "eos"
                elif stop and any(s in tokenizer.decode(tokens[row][-window:]) for s in stop):
                    finish[row] = "stop"
            if on_step is not None:
                on_step(sum(active))
            if all(f is not None for f in finish) or step == max_new_tokens - 1:
                break
            logits = decoding.step(torch.tensor(picked, dtype=torch.long))
    out = []
    for row in range(n):
        text, kept = _response_text(tokenizer, tokens[row], finish[row] or "length", stop, eos)
        d = Decoded(tokens=tokens[row][:kept], finish=finish[row] or "length", generated=len(tokens[row]), text=text)
        if capture is not None and kept:
            d.targets = capture.targets(captured[row][:kept])
        out.append(d)
    return out


def _response_text(tokenizer, tokens: list[int], finish: str, stop: Sequence[str], eos: set) -> tuple[str, int]:
    """(text, number of tokens kept): a stop-ended response loses the tokens from the one that
    touches the stop string on, and its text is cut where the string starts."""
    if finish != "stop":
        body = tokens[:-1] if finish == "eos" else tokens
        return tokenizer.decode(body, skip_special_tokens=True), len(tokens)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = min(i for i in (full.find(s) for s in stop) if i >= 0)
    kept = len(tokens)
    while kept > 0 and len(tokenizer.decode(tokens[:kept], skip_special_tokens=True)) > cut:
        kept -= 1
    return full[:cut], kept
