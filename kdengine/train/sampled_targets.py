"""The teacher's side of a batch from a sampled-target store (targets "sample", RS-KD): the drawn ids,
their counts and log-probabilities, and the loss against them (`kdengine.losses.sampled_kl`).

The same interface as the top-k targets: `loss` (the sum over rows, optionally with its KD and CE
parts), `eval_kd` (the KD estimate at T = 1) and `teacher_top1` (the teacher's most likely drawn id).
"""
from __future__ import annotations

import torch

from kdengine.losses import sampled_kl
from kdengine.sampling import TeacherDraws, loss_targets
from kdengine.train.errors import TrainError

BATCH_KEYS = ("sample_idx", "sample_count", "sample_logp", "sample_log_norm")


def check_sampled_options(store, *, temperature: float, tail: bool) -> None:
    """Refuses, before training, options a sampled-target store cannot serve unbiasedly."""
    tau = float(store.codec_params["proposal_temperature"])
    exact_top = int(store.codec_params.get("exact_top", 0))
    if tail:
        raise TrainError(f"store {store.path} holds sampled targets (RS-KD), which have no tail bucket; drop --tail")
    if exact_top and temperature != 1:
        raise TrainError(f"store {store.path} keeps an exact head of {exact_top} ids with its draws: its unbiased "
                         f"loss exists at --temperature 1 only, got {temperature}")
    if temperature not in (1.0, tau):
        raise TrainError(f"store {store.path} was sampled at proposal temperature {tau}: its unbiased loss exists at "
                         f"--temperature 1 or {tau} only, got {temperature}; use one of those, or dump again with "
                         f"--proposal-temperature {temperature}")


class SampledTargets:
    """Drawn ids int32 [N, K], counts int32 [N, K] (0 = padding), teacher log-probs at T = 1 float32
    [N, K] and the proposal's log-normaliser float32 [N], on the student's device; with `exact_top` H,
    slots [0, H) are the exact head (kdengine.sampling.TeacherDraws)."""

    can_fuse = False  # sampled_kl has no fused-head form: the loop gives it the student's logits

    def __init__(self, batch: dict, *, proposal_temperature: float, exact_top: int = 0, loss_fn=sampled_kl):
        self.draws = TeacherDraws(batch["sample_idx"], batch["sample_count"], batch["sample_logp"],
                                  batch["sample_log_norm"])
        self._tau, self._exact_top, self._loss_fn = float(proposal_temperature), int(exact_top), loss_fn

    def _loss(self, logits, labels, *, alpha, temperature, reduction="sum"):
        target, proposal = loss_targets(self.draws, self._tau, temperature, self._exact_top)
        return self._loss_fn(logits, self.draws.ids, self.draws.counts, target, proposal, labels, alpha=alpha,
                             temperature=temperature, reduction=reduction)

    def loss(self, logits, labels, *, alpha: float, temperature: float, with_parts: bool, validate: bool = True):
        """(loss summed over rows, [KD sum, CE sum] or None). Each part is its own forward-only
        evaluation (alpha = 1 and alpha = 0; the loss itself is one of them when alpha is 0 or 1), never
        recovered by subtraction, which cancels badly as alpha -> 1. `validate` changes nothing:
        sampled_kl always checks its inputs."""
        loss = self._loss(logits, labels, alpha=alpha, temperature=temperature)
        if not with_parts:
            return loss, None
        with torch.no_grad():
            def part(a: float) -> torch.Tensor:
                return loss.detach() if alpha == a else self._loss(logits.detach(), labels, alpha=a,
                                                                   temperature=temperature)

            return loss, torch.stack([part(1.0), part(0.0)])

    def eval_kd(self, logits: torch.Tensor) -> torch.Tensor:
        """The KD estimate at T = 1 summed over rows (unbiased for the full-vocabulary KL)."""
        return self._loss(logits, None, alpha=1.0, temperature=1.0)

    def teacher_top1(self) -> torch.Tensor:
        """Per row, the drawn id the teacher rates highest."""
        logp = torch.where(self.draws.counts > 0, self.draws.logp, float("-inf"))
        return self.draws.ids.gather(1, logp.argmax(1, keepdim=True)).squeeze(1).long()


def collate_draws(samples: list[dict], keeps: list[torch.Tensor]) -> dict:
    """The sampled-target fields of a batch: each sample's rows (those kept by `keeps[j]`) padded to the
    batch's widest row (id 0, count 0, logp 0) and concatenated in sample order."""
    width = max(int(s["sample_idx"].shape[1]) for s in samples)

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    return {
        "sample_idx": torch.cat([padded(s["sample_idx"][k]) for s, k in zip(samples, keeps)]).to(torch.int32),
        "sample_count": torch.cat([padded(s["sample_count"][k]) for s, k in zip(samples, keeps)]).to(torch.int32),
        "sample_logp": torch.cat([padded(s["sample_logp"][k]) for s, k in zip(samples, keeps)]).float(),
        "sample_log_norm": torch.cat([s["sample_log_norm"][k] for s, k in zip(samples, keeps)]).float(),
    }
