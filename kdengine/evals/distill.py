"""How close students are to their teacher on held-out text, measured against the teacher itself.

Teacher forcing over held-out samples (`kdengine.corpus.Sample`: token ids and target positions, as
the dump makes them); at every target position p, over the full vocabulary V, with p_t and p_s the
teacher's and the student's next-token distributions:

- KL to teacher: KL(p_t || p_s) = sum_v p_t(v) * (log p_t(v) - log p_s(v)), in nats, averaged over
  positions (the forward KL that distillation minimises, here without any top-k truncation);
- reverse KL: KL(p_s || p_t), the same the other way round (what a reverse-KL student minimises);
- top-1 agreement: the fraction of positions where argmax p_s = argmax p_t;
- perplexity: exp of the mean negative log-likelihood of the actual next token input_ids[p + 1];
- calibration error against the teacher (ECE): the student's confidence c = max_v p_s(v) in its
  top-1 token y against how likely the teacher makes that token, p_t(y) (its accuracy if the next
  token were drawn from the teacher), over ECE_BINS equal-width bins of c:
  ECE = sum_b (n_b / n) |mean_b c - mean_b p_t(y)|. A student that copies the teacher scores 0.

The teacher's own row has KL 0 and agreement 1 by definition; its perplexity is measured on the same
tokens, the bar a student's perplexity is read against.

    metrics = distill_metrics(load_teacher("teacher/"), {"student": student_model}, samples)
    metrics["student"].kl_to_teacher

`distill_sample_sums` keeps these sums per held-out text, so any resample of the texts is rescored
without a model; `paired_bootstrap` turns that into an interval for the difference between two models:

    sums = distill_sample_sums(teacher, {"a": a, "b": b}, samples)
    diff, lo, hi = paired_bootstrap(sums["a"], sums["b"], "kl_to_teacher")
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from kdengine.corpus import padded_batches

TEACHER = "teacher"  # the key of the teacher's own row in distill_metrics' result
ECE_BINS = 15


@dataclass(frozen=True)
class DistillMetrics:
    """One model's scores over `positions` held-out target positions (definitions in the module docstring)."""

    kl_to_teacher: float
    top1_agreement: float
    reverse_kl: float
    perplexity: float
    positions: int
    ece_to_teacher: float


@dataclass(frozen=True)
class SampleSums:
    """Every metric's sufficient statistics per held-out sample, in the order the samples were given, so
    any reweighting of the samples (a bootstrap resample) is scored without running a model again.

    sums: float64 [S, 4], per sample, summed over its positions: KL(p_t || p_s), top-1 agreements, NLL
        of the next token, KL(p_s || p_t).
    bins: float64 [S, ECE_BINS, 3], per sample and confidence bin: rows, sum of c, sum of p_t(y).
    positions: int64 [S], target positions per sample.
    """

    sums: np.ndarray
    bins: np.ndarray
    positions: np.ndarray

    def metrics(self, weights: np.ndarray | None = None) -> DistillMetrics:
        """The scores over all samples, or over `weights` [S] copies of each (e.g. a bootstrap resample)."""
        w = np.ones(len(self.positions)) if weights is None else np.asarray(weights, dtype=np.float64)
        n = float(w @ self.positions)
        s = w @ self.sums
        bins = np.tensordot(w, self.bins, axes=1)
        return DistillMetrics(kl_to_teacher=float(s[0] / n), top1_agreement=float(s[1] / n),
                              reverse_kl=float(s[3] / n), perplexity=math.exp(s[2] / n), positions=int(round(n)),
                              ece_to_teacher=float(np.abs(bins[:, 1] - bins[:, 2]).sum() / n))


@torch.inference_mode()
def distill_metrics(teacher, students: Mapping[str, torch.nn.Module], samples: Sequence, *, batch_size: int = 8,
                    progress: bool = True) -> dict[str, DistillMetrics]:
    """Full-vocabulary KL to the teacher, top-1 agreement, perplexity and calibration of each student.

    Args and errors: those of `distill_sample_sums`.
    Returns:
        {"teacher": its own row (KL 0, agreement 1, its perplexity), then each student's name: its row},
        all over the same positions.
    """
    return {name: sums.metrics() for name, sums in
            distill_sample_sums(teacher, students, samples, batch_size=batch_size, progress=progress).items()}


@torch.inference_mode()
def distill_sample_sums(teacher, students: Mapping[str, torch.nn.Module], samples: Sequence, *, batch_size: int = 8,
                        progress: bool = True) -> dict[str, SampleSums]:
    """The per-sample sums behind `distill_metrics` (for confidence intervals: `paired_bootstrap`).

    Each batch runs through the teacher once and through every student, so the teacher's [P, V]
    distributions are never stored for the whole set.

    Args:
        teacher: a `kdengine.teachers.Teacher` (its `logits(input_ids, lengths)` gives [B, T, V]).
        students: name -> transformers causal LM over the teacher's vocabulary (its logits may be wider
            than V, a padded output layer; the extra columns are dropped). No name may be "teacher".
        samples: `kdengine.corpus.Sample`s (input_ids int32 [T], positions int32 [P]), e.g. from
            `kdengine.corpus.load_corpus` with the teacher's tokenizer.
        batch_size: samples per forward (right-padded, sorted by length).
        progress: show a tqdm bar over samples.
    Returns:
        {"teacher": its own sums, then each student's name: its sums}, rows in the order of `samples`.
    Raises:
        ValueError: no target positions, a student named "teacher", or a student with fewer token
            embeddings (input or output) than the teacher's vocabulary.
    """
    if TEACHER in students:
        raise ValueError(f"a student may not be named {TEACHER!r}: that row is the teacher's own")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if sum(len(s.positions) for s in samples) == 0:
        raise ValueError("the held-out samples have no target positions to score")
    for name, model in students.items():
        widths = (model.get_input_embeddings().num_embeddings, model.get_output_embeddings().weight.shape[0])
        if min(widths) < teacher.vocab_size:
            raise ValueError(f"student {name!r} has {min(widths)} token embeddings but the teacher's vocabulary has "
                             f"{teacher.vocab_size}; a student must share the teacher's tokenizer "
                             "(see `kdengine make-student`)")
    names = [TEACHER, *students]
    order = {id(s): i for i, s in enumerate(samples)}
    sums = {name: torch.zeros(len(samples), 4, dtype=torch.float64) for name in names}
    bins = {name: torch.zeros(len(samples) * ECE_BINS, 3, dtype=torch.float64) for name in names}
    with tqdm(total=len(samples), unit="sample", desc="held-out KL", disable=not progress) as bar:
        for b in padded_batches(samples, batch_size):
            ids, lengths, rows, cols = b.input_ids, b.lengths, b.rows, b.cols
            labels = ids[rows, cols + 1]
            owner = torch.tensor([order[id(s)] for s in b.samples], dtype=torch.long)[rows]
            t_logp = teacher.logits(ids, lengths)[rows.to(teacher.device), cols.to(teacher.device)]
            t_logp = t_logp.float().log_softmax(-1).cpu()
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            for name in names:
                if name == TEACHER:
                    s_logp = t_logp
                else:
                    s_logits = _student_logits(students[name], ids, mask, rows, cols, t_logp.shape[-1])
                    s_logp = s_logits.float().log_softmax(-1)
                sums[name].index_add_(0, owner, _position_terms(t_logp, s_logp, labels))
                bin_of, values = _calibration_terms(t_logp, s_logp)
                bins[name].index_add_(0, owner * ECE_BINS + bin_of, values)
            bar.update(len(b.samples))
    positions = np.array([len(s.positions) for s in samples], dtype=np.int64)
    return {name: SampleSums(sums=sums[name].numpy(), bins=bins[name].view(len(samples), ECE_BINS, 3).numpy(),
                             positions=positions) for name in names}


def paired_bootstrap(base: SampleSums, other: SampleSums, metric: str, *, resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """`metric` of `other` minus that of `base` on the held-out set, with a percentile interval.

    Resamples the held-out samples (texts, not positions: positions within one text are correlated)
    with replacement, the same resample for both models (paired), and scores both on it. The interval
    covers held-out sampling only, not training randomness (seeds).

    Args:
        metric: a `DistillMetrics` field, e.g. "kl_to_teacher", "ece_to_teacher".
    Returns:
        (difference on the whole set, lower, upper) at `level`.
    """
    if metric not in DistillMetrics.__dataclass_fields__:
        raise ValueError(f"unknown metric {metric!r}; one of {sorted(DistillMetrics.__dataclass_fields__)}")
    if not np.array_equal(base.positions, other.positions):
        raise ValueError("the two models were scored on different held-out samples")
    rng = np.random.default_rng(seed)
    n = len(base.positions)
    diffs = np.empty(resamples)
    for r in range(resamples):
        w = np.bincount(rng.integers(0, n, n), minlength=n)
        diffs[r] = getattr(other.metrics(w), metric) - getattr(base.metrics(w), metric)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return getattr(other.metrics(), metric) - getattr(base.metrics(), metric), float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The mean of `values` and the half-width of its `level` t interval (Student's t, n - 1 degrees of
    freedom); the half-width is nan for fewer than 2 values. For differences paired by seed, this is
    the interval that covers training randomness, which `paired_bootstrap`'s does not."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def _student_logits(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    vocab: int) -> torch.Tensor:
    """The student's logits at the target positions, [P, V] on the CPU."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    return logits[rows.to(device), cols.to(device), :vocab].cpu()


def _calibration_terms(t_logp: torch.Tensor, s_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin of the model's top-1 confidence c (of ECE_BINS), and float64 [P, 3] (1, c, the
    teacher's probability of that top-1 token)."""
    conf, top1 = s_logp.max(-1)
    conf = conf.double().exp()
    hit = t_logp.gather(1, top1[:, None])[:, 0].double().exp()
    return (conf * ECE_BINS).long().clamp(0, ECE_BINS - 1), torch.stack([torch.ones_like(conf), conf, hit], dim=1)


def _position_terms(t_logp: torch.Tensor, s_logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [P, 4] per row: KL(p_t || p_s), 1 where the argmaxes agree, NLL of `labels` under p_s,
    KL(p_s || p_t), for log-probs [P, V] and labels int64 [P]."""
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    reverse = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    agree = s_logp.argmax(-1) == t_logp.argmax(-1)
    nll = -s_logp.gather(1, labels[:, None])[:, 0]
    return torch.stack([kl.double(), agree.double(), nll.double(), reverse.double()], dim=1)
