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


@torch.inference_mode()
def distill_metrics(teacher, students: Mapping[str, torch.nn.Module], samples: Sequence, *, batch_size: int = 8,
                    progress: bool = True) -> dict[str, DistillMetrics]:
    """Full-vocabulary KL to the teacher, top-1 agreement and perplexity of each student.

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
        {"teacher": its own row (KL 0, agreement 1, its perplexity), then each student's name: its row},
        all over the same positions.
    Raises:
        ValueError: no target positions, a student named "teacher", or a student with fewer token
            embeddings (input or output) than the teacher's vocabulary.
    """
    if TEACHER in students:
        raise ValueError(f"a student may not be named {TEACHER!r}: that row is the teacher's own")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    total_positions = sum(len(s.positions) for s in samples)
    if total_positions == 0:
        raise ValueError("the held-out samples have no target positions to score")
    for name, model in students.items():
        widths = (model.get_input_embeddings().num_embeddings, model.get_output_embeddings().weight.shape[0])
        if min(widths) < teacher.vocab_size:
            raise ValueError(f"student {name!r} has {min(widths)} token embeddings but the teacher's vocabulary has "
                             f"{teacher.vocab_size}; a student must share the teacher's tokenizer "
                             "(see `kdengine make-student`)")
    names = [TEACHER, *students]
    sums = {name: np.zeros(4) for name in names}  # KL, agreements, NLL, reverse KL, each summed over positions
    bins = {name: np.zeros((ECE_BINS, 3)) for name in names}  # per confidence bin: count, sum c, sum p_t(y)
    with tqdm(total=len(samples), unit="sample", desc="held-out KL", disable=not progress) as bar:
        for b in padded_batches(samples, batch_size):
            ids, lengths, rows, cols = b.input_ids, b.lengths, b.rows, b.cols
            labels = ids[rows, cols + 1]
            t_logp = teacher.logits(ids, lengths)[rows.to(teacher.device), cols.to(teacher.device)]
            t_logp = t_logp.float().log_softmax(-1).cpu()
            sums[TEACHER] += _position_sums(t_logp, t_logp, labels)
            bins[TEACHER] += _calibration_bins(t_logp, t_logp)
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            for name, model in students.items():
                s_logits = _student_logits(model, ids, mask, rows, cols, t_logp.shape[-1])
                s_logp = s_logits.float().log_softmax(-1)
                sums[name] += _position_sums(t_logp, s_logp, labels)
                bins[name] += _calibration_bins(t_logp, s_logp)
            bar.update(len(b.samples))
    return {name: DistillMetrics(kl_to_teacher=0.0 if name == TEACHER else float(s[0] / total_positions),
                                 top1_agreement=1.0 if name == TEACHER else float(s[1] / total_positions),
                                 reverse_kl=0.0 if name == TEACHER else float(s[3] / total_positions),
                                 perplexity=math.exp(s[2] / total_positions), positions=total_positions,
                                 ece_to_teacher=float(np.abs(bins[name][:, 1] - bins[name][:, 2]).sum()
                                                      / total_positions))
            for name, s in sums.items()}



def _student_logits(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    vocab: int) -> torch.Tensor:
    """The student's logits at the target positions, [P, V] on the CPU."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    return logits[rows.to(device), cols.to(device), :vocab].cpu()


def _calibration_bins(t_logp: torch.Tensor, s_logp: torch.Tensor) -> np.ndarray:
    """[ECE_BINS, 3]: per bin of the model's top-1 confidence c, (rows, sum of c, sum of the teacher's
    probability of that top-1 token)."""
    conf, top1 = s_logp.max(-1)
    conf = conf.double().exp()
    hit = t_logp.gather(1, top1[:, None])[:, 0].double().exp()
    b = (conf * ECE_BINS).long().clamp(0, ECE_BINS - 1)
    out = torch.zeros(ECE_BINS, 3, dtype=torch.float64)
    out.index_add_(0, b, torch.stack([torch.ones_like(conf), conf, hit], dim=1))
    return out.numpy()


def _position_sums(t_logp: torch.Tensor, s_logp: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[KL(p_t || p_s) summed over rows, rows where the argmaxes agree, NLL of `labels` under p_s summed,
    KL(p_s || p_t) summed] for log-probs [P, V] and labels int64 [P]."""
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    reverse = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    agree = (s_logp.argmax(-1) == t_logp.argmax(-1)).sum()
    nll = -s_logp.gather(1, labels[:, None]).sum()
    return np.array([kl.double().sum().item(), float(agree), nll.double().item(), reverse.double().sum().item()])
