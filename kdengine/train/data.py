"""From the store to training batches: held-out split, token-budget batching, the rank split, and
collation with target rows and labels.

Layout: right-padded batches with an attention mask, B x max_len <= --batch-tokens. Packing several
samples into one row would need per-sample attention masks that only some attention backends honour
(with position ids alone SDPA and eager attention let samples see each other); padding works with every
HF model. Padding waste stays small because samples are sorted by length inside windows of the
shuffled order before they are cut into batches.

Order: the batches of epoch e are a pure function of (seed, e), so a data position is just
(epoch, batch index) and a resumed run sees exactly the batches the killed one would have. The batch
stream is global: optimizer step s takes the next world x grad_accum batches, and rank r takes every
world-th of them (DistributedSampler-style), so P processes see the same batches per step as one
process with P times the accumulation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from kdengine.store.format import TEMPERED_LSE

IGNORE_INDEX = -100
_SORT_WINDOW = 512  # samples sorted by length together before being cut into batches


def split_heldout(n_samples: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Splits sample indices into (train, held-out); the held-out slice is max(1, round(fraction * n))
    samples chosen by `seed`, both lists ascending."""
    n_eval = max(1, round(fraction * n_samples))
    if n_eval >= n_samples:
        raise ValueError(f"the store has {n_samples} samples; holding out {n_eval} leaves none to train on")
    order = list(range(n_samples))
    random.Random(f"heldout-{seed}").shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def plan_batches(
    ids: list[int], lengths: list[int], batch_tokens: int, *, seed: int | None, epoch: int = 0
) -> list[list[int]]:
    """Groups sample indices into batches whose padded size (count x longest) fits `batch_tokens`.

    Args:
        ids: sample indices to batch.
        lengths: token count of every sample in the store (indexed by sample index).
        batch_tokens: padded-token budget per batch; a sample longer than it forms a batch alone.
        seed: shuffle seed; None keeps `ids` sorted by length (for evaluation).
        epoch: mixed into the shuffle so every epoch has its own order.
    Returns:
        Lists of sample indices; every id appears exactly once.
    """
    order = list(ids)
    rng = random.Random(f"batches-{seed}-{epoch}") if seed is not None else None
    if rng is not None:
        rng.shuffle(order)
    window = _SORT_WINDOW if rng is not None else len(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), max(1, window)):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = 0
        for i in chunk:
            if batch and (len(batch) + 1) * max(longest, lengths[i]) > batch_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, lengths[i])
        if batch:
            batches.append(batch)
    if rng is not None:
        rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class DataPosition:
    """The next global batch: batch `index` of epoch `epoch`."""

    epoch: int
    index: int


class BatchSchedule:
    """The global stream of training batches, epoch after epoch, and each rank's share of it."""

    def __init__(self, train_ids: list[int], lengths: list[int], batch_tokens: int, seed: int):
        self._args = (train_ids, lengths, batch_tokens)
        self._seed = seed
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            ids, lengths, budget = self._args
            self._plans = {epoch: plan_batches(ids, lengths, budget, seed=self._seed, epoch=epoch)}
        return self._plans[epoch]

    def batches_at(self, pos: "DataPosition") -> list[int]:
        """Sample indices of the batch at `pos`."""
        return self.plan(pos.epoch)[pos.index]

    def advance(self, pos: DataPosition, count: int) -> tuple[list[DataPosition], DataPosition]:
        """The next `count` global batch positions after `pos`, and the position after them."""
        taken = []
        epoch, index = pos.epoch, pos.index
        for _ in range(count):
            if index >= len(self.plan(epoch)):
                epoch, index = epoch + 1, 0
            taken.append(DataPosition(epoch, index))
            index += 1
        return taken, DataPosition(epoch, index)

    def rank_positions(
        self, start: DataPosition, steps: int, world: int, accum: int, rank: int
    ) -> Iterator[DataPosition]:
        """Positions rank `rank` reads, in order, for `steps` optimizer steps from `start`: of the
        world x accum batches of each step, micro-batch a of rank r is batch a * world + r."""
        pos = start
        for _ in range(steps):
            taken, pos = self.advance(pos, world * accum)
            yield from taken[rank::world]


def collate(samples: list[dict], *, pad_id: int) -> dict:
    """Pads samples into one batch and lines up teacher targets with the flattened logits rows.

    Args:
        samples: store items: input_ids int [T], positions int [P] (t whose next-token distribution
            is stored), topk_idx int32 [P, K], topk_logp float32 [P, K]; or, from a sampled-target
            store, sample_idx/sample_count/sample_logp [P, K_j] and sample_log_norm [P]; or corpus samples
            with neither (an online teacher computes the targets), which the batch then lacks too.
        pad_id: token id for padding (masked out; any valid id works).
    Returns:
        dict with input_ids int64 [B, L], attention_mask int64 [B, L], rows int64 [N] (indices into the
        flattened [B * L] positions), labels int64 [N] (the next input token), topk_idx int32 [N, K],
        topk_logp float32 [N, K] (or the sample_* fields, rows padded to the batch's widest with count 0),
        tempered_lse float32 [N, #T] when the store holds c_T (`kdengine dump --temperatures`),
        tokens (sum of sample lengths) and targets (N). A position at a
        sample's last token has no next token to check against and is left out. Samples of an
        adaptive-K store have different widths: K is the batch's widest, and shorter rows are padded
        with id -1 and log-prob -inf (entries the loss skips).
    """
    longest = max(int(s["input_ids"].numel()) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    rows, labels, idx, logp, lse, keeps = [], [], [], [], [], []
    for b, s in enumerate(samples):
        x = s["input_ids"].long()
        n = x.numel()
        input_ids[b, :n] = x
        mask[b, :n] = 1
        pos = s["positions"].long()
        keep = pos < n - 1
        pos = pos[keep]
        rows.append(b * longest + pos)
        labels.append(x[pos + 1])
        keeps.append(keep)
        if "topk_idx" in s:
            idx.append(s["topk_idx"][keep])
            logp.append(s["topk_logp"][keep])
        if TEMPERED_LSE in s:
            lse.append(s[TEMPERED_LSE][keep])
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "rows": torch.cat(rows),
        "labels": torch.cat(labels),
        "tokens": int(mask.sum()),
        "targets": int(sum(r.numel() for r in rows)),
    }
    if idx:
        batch["topk_idx"] = _cat_padded(idx, -1).to(torch.int32)
        batch["topk_logp"] = _cat_padded(logp, float("-inf")).float()
    if lse:
        batch[TEMPERED_LSE] = torch.cat(lse).float()
    if "sample_idx" in samples[0]:
        from kdengine.train.sampled_targets import collate_draws

        batch.update(collate_draws(samples, keeps))
    return batch


def _cat_padded(parts: list[torch.Tensor], fill) -> torch.Tensor:
    """Rows of [P_i, K_i] tensors stacked into [sum P_i, max K_i], padded on the right with `fill`."""
    width = max(int(p.shape[1]) for p in parts)
    return torch.cat([p if p.shape[1] == width else torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill)
                      for p in parts])
