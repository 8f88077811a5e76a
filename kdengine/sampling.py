"""Sampled teacher targets (RS-KD): per position, M draws from the teacher's tempered distribution,
kept as the distinct ids with their counts and log-probabilities; optionally (`exact_top` H > 0) the
teacher's H most likely ids kept exactly and the M draws made from the rest of the vocabulary.

Each corpus sample gets its own generator, seeded from (seed, sample index) only, so a rerun, a
resume and any split over ranks draw the same ids for the same sample. The draws run on the
teacher's device, on its logits, before anything crosses to the CPU.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from kdengine.corpus import Sample, padded_batches


@dataclass
class TeacherDraws:
    """Dims: P positions, K = the most distinct ids of any position (slots past a row's count are padding).

    ids: int32 [P, K], distinct ids per row in ascending order, 0 at padding slots. With an exact
        head of H ids, slots [0, H) hold the head (ascending) and the drawn ids follow (ascending).
    counts: int32 [P, K], draws of each id (sum M per row), 0 at padding slots; 1 at each head slot
        (so a row's counts sum to H + M).
    logp: float32 [P, K], the teacher's log-probability of each id at T = 1 (0 at padding).
    log_norm: float32 [P], ln sum_v p_v^(1/tau) over the ids the draws come from: the proposal is
        r_v = p_v^(1/tau) / exp(log_norm), so log r = logp / tau - log_norm (0 when tau = 1 and there
        is no head; with a head of H ids, ln(1 - P_head), the log of the probability left to draw).
    """

    ids: torch.Tensor
    counts: torch.Tensor
    logp: torch.Tensor
    log_norm: torch.Tensor


def sample_seed(seed: int, sample_index: int) -> int:
    """The generator seed of one corpus sample: a hash of (seed, index), so neighbours are unrelated."""
    digest = hashlib.sha256(f"kdengine-rskd:{int(seed)}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_targets(logits: torch.Tensor, n_samples: int, *, proposal_temperature: float = 1.0, exact_top: int = 0,
                 generator: torch.Generator | None = None) -> TeacherDraws:
    """M = `n_samples` draws per row of `logits` [P, V] (the teacher's, at T = 1) from
    softmax(log_softmax(logits) / tau), deduplicated. With `exact_top` H > 0 (tau must be 1), the H
    most likely ids are kept exactly and the M draws come from p restricted to the other ids.
    Returns CPU tensors."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not proposal_temperature > 0:
        raise ValueError(f"proposal_temperature must be > 0, got {proposal_temperature}")
    if exact_top < 0 or (exact_top and proposal_temperature != 1):
        raise ValueError(f"exact_top must be >= 0, and 0 unless proposal_temperature is 1; got {exact_top} "
                         f"at proposal_temperature {proposal_temperature}")
    if exact_top >= logits.shape[-1]:
        raise ValueError(f"exact_top {exact_top} leaves nothing to draw from a vocabulary of {logits.shape[-1]}")
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    if logits.shape[0] == 0:
        empty = torch.zeros(0, exact_top + 1, dtype=torch.int32)
        return TeacherDraws(empty, empty.clone(), torch.zeros(0, exact_top + 1), torch.zeros(0))
    if exact_top:
        return _draw_with_exact_head(logp_all, n_samples, exact_top, generator)
    log_r_all = logp_all if proposal_temperature == 1 else torch.log_softmax(logp_all / proposal_temperature, -1)
    draws = torch.multinomial(log_r_all.exp(), n_samples, replacement=True, generator=generator)
    ids, counts = dedupe_draws(draws)
    logp = torch.where(counts > 0, logp_all.gather(1, ids), 0.0)
    if proposal_temperature == 1:
        log_norm = torch.zeros(logits.shape[0], device=logits.device)
    else:
        log_norm = torch.logsumexp(logp_all / proposal_temperature, dim=-1)
    return TeacherDraws(ids.to(torch.int32).cpu(), counts.to(torch.int32).cpu(), logp.cpu(), log_norm.float().cpu())


def _draw_with_exact_head(logp_all: torch.Tensor, n_samples: int, head: int,
                          generator: torch.Generator | None) -> TeacherDraws:
    """The H = `head` most likely ids exactly, then M draws from r_v = p_v / (1 - P_head) off the head."""
    head_ids = logp_all.topk(head, dim=-1).indices.sort(dim=-1).values
    tail_logp = logp_all.scatter(1, head_ids, float("-inf"))
    log_norm = torch.logsumexp(tail_logp, dim=-1)  # ln(1 - P_head), without the cancellation of 1 - sum
    # relative to each row's largest tail entry, so a row whose tail underflows in float32 still draws
    relative = (tail_logp - tail_logp.max(dim=-1, keepdim=True).values).exp()
    draws = torch.multinomial(relative, n_samples, replacement=True, generator=generator)
    ids, counts = dedupe_draws(draws)
    ids = torch.cat([head_ids, ids], dim=1)
    counts = torch.cat([torch.ones_like(head_ids), counts], dim=1)
    logp = torch.where(counts > 0, logp_all.gather(1, ids), 0.0)
    return TeacherDraws(ids.to(torch.int32).cpu(), counts.to(torch.int32).cpu(), logp.cpu(), log_norm.float().cpu())


def teacher_draws(teacher, samples: Sequence[Sample], n_samples: int, batch_size: int, *,
                  proposal_temperature: float = 1.0, exact_top: int = 0,
                  seed: int = 0) -> Iterator[tuple[Sample, TeacherDraws]]:
    """The sampled targets of every target position of every sample, batched by length like
    `kdengine.dump.teacher_topk`; each sample's draws come from its own generator (`sample_seed`),
    on the teacher's device, so they do not depend on the batch, the rank or an earlier crash.

    Yields:
        (sample, TeacherDraws over its P positions) per sample, in batch order.
    """
    for b in padded_batches(samples, batch_size):
        with torch.inference_mode():
            logits = teacher.logits(b.input_ids, b.lengths)
            rows = logits[b.rows.to(logits.device), b.cols.to(logits.device)]
            at = 0
            for s in b.samples:
                n = len(s.positions)
                gen = torch.Generator(device=rows.device).manual_seed(sample_seed(seed, s.index))
                yield s, draw_targets(rows[at:at + n], n_samples, proposal_temperature=proposal_temperature,
                                      exact_top=exact_top, generator=gen)
                at += n


def dedupe_draws(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draws int [P, M] -> (ids, counts) int64 [P, K]: each row's distinct ids ascending with their
    counts, K the most distinct ids of any row, padding slots 0 / 0."""
    s = draws.sort(dim=1).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.long().cumsum(dim=1) - 1
    k = int(group[:, -1].max()) + 1
    counts = torch.zeros(s.shape[0], k, dtype=torch.long, device=s.device).scatter_add_(1, group, torch.ones_like(s))
    ids = torch.zeros(s.shape[0], k, dtype=torch.long, device=s.device).scatter_(1, group, s)
    return ids, counts


def loss_targets(targets: TeacherDraws, proposal_temperature: float, temperature: float, exact_top: int = 0):
    """(target_logp, proposal_logp | None) for `sampled_kl` at loss temperature T from stored targets.

    The store knows the full-vocabulary normaliser at T = 1 (log p) and at T = tau (log r), so these
    are the temperatures it serves unbiasedly (see kdengine/losses/sampled_reference.py). With an
    exact head of H ids (tau = 1, T = 1) the proposal of each slot is the one that makes the loss's
    weight w_k = c_k / (H + M) * exp(log p_k - log r_k) equal p_k on the head and
    (c_k / M) (1 - P_head) on the draws: log r = -ln(H + M) on the head, log p - log_norm + ln(M / (H + M))
    off it."""
    logp, tau = targets.logp, proposal_temperature
    if exact_top:
        if temperature != 1:
            raise ValueError(f"sampled targets with an exact head (exact_top {exact_top}) give an unbiased loss at "
                             f"temperature 1 only, got temperature {temperature}")
        total = targets.counts.sum(dim=1, keepdim=True).clamp_min(1).to(logp.dtype)
        draws = total - exact_top
        head = torch.arange(logp.shape[1], device=logp.device)[None, :] < exact_top
        tail = logp - targets.log_norm[:, None].to(logp.dtype) + torch.log(draws / total)
        return logp, torch.where(head, -torch.log(total), tail)
    log_r = logp if tau == 1 else logp / tau - targets.log_norm[:, None]
    if temperature == tau:
        return log_r, None
    if temperature == 1:
        return logp, log_r
    raise ValueError(
        f"sampled targets drawn at proposal temperature {tau} give an unbiased loss at temperature 1 or {tau} "
        f"only (the full-vocabulary normaliser is known there), got temperature {temperature}; train at one of "
        f"those, or dump again with --proposal-temperature {temperature}")
