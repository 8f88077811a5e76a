"""Held-out distillation metrics (kdengine.evals.distill) on the tiny real Llama: a model against
itself, against a uniform student whose scores have a closed form, batching, and the errors."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdengine.corpus import load_corpus
import numpy as np

from kdengine.evals.distill import _position_terms, distill_metrics, distill_sample_sums, paired_bootstrap
from kdengine.teachers import load_teacher

QA = [("How many apples are left?", "5 - 2 = 3 apples.\n#### 3"),
      ("Each box has 12 pencils. How many in 3 boxes?", "3 * 12 = 36 pencils.\n#### 36"),
      ("She earns 7 dollars a day for 4 days. How much?", "7 * 4 = 28 dollars.\n#### 28"),
      ("How many?", "1 + 1 = 2.\n#### 2"),
      ("The store sold 40 books in the morning and 15 more after that. How many books?", "40 + 15 = 55.\n#### 55")]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_teacher(str(tiny_model_dir))


@pytest.fixture(scope="module")
def samples(tmp_path_factory, teacher):
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    return load_corpus(path, teacher.tokenizer, chat=True).samples


def test_a_model_against_itself_has_kl_0_and_agreement_1(teacher, samples, tiny_model_dir):
    same = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    metrics = distill_metrics(teacher, {"copy": same}, samples, batch_size=2, progress=False)
    assert list(metrics) == ["teacher", "copy"]
    assert abs(metrics["copy"].kl_to_teacher) < 1e-6
    assert metrics["copy"].top1_agreement == 1.0
    assert metrics["copy"].perplexity == pytest.approx(metrics["teacher"].perplexity, rel=1e-5)
    assert metrics["teacher"].kl_to_teacher == 0.0 and metrics["teacher"].top1_agreement == 1.0
    assert metrics["teacher"].ece_to_teacher < 1e-9 and metrics["copy"].ece_to_teacher < 1e-5
    assert metrics["copy"].positions == sum(len(s.positions) for s in samples) > 0


def test_uniform_student_matches_the_closed_form(teacher, samples, tiny_model_dir):
    """A student with a zero output layer predicts the uniform distribution u over V tokens:
    KL(p || u) = log V - H(p), perplexity V, and argmax 0 (the first of equal logits), so all its
    confidences 1/V fall in the first bin: ECE = |1/V - mean p(0)|."""
    uniform = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    vocab = teacher.vocab_size
    kl, agree, nll, n, p0 = 0.0, 0, 0.0, 0, 0.0
    with torch.no_grad():  # the reference: one unpadded sample at a time
        for s in samples:
            ids = torch.from_numpy(s.input_ids.astype("int64"))[None]
            logp = teacher.model(input_ids=ids).logits[0, torch.from_numpy(s.positions.astype("int64"))]
            logp = logp.double().log_softmax(-1)
            kl += float((math.log(vocab) + (logp.exp() * logp).sum(-1)).sum())
            agree += int((logp.argmax(-1) == 0).sum())
            p0 += float(logp[:, 0].exp().sum())
            nll -= float(logp.gather(1, ids[0, s.positions.astype("int64") + 1][:, None]).sum())
            n += len(s.positions)
    for batch_size in (1, 3):
        metrics = distill_metrics(teacher, {"uniform": uniform}, samples, batch_size=batch_size, progress=False)
        assert metrics["uniform"].kl_to_teacher == pytest.approx(kl / n, rel=1e-5)
        assert metrics["uniform"].top1_agreement == agree / n
        assert metrics["uniform"].perplexity == pytest.approx(vocab, rel=1e-5)
        assert metrics["uniform"].ece_to_teacher == pytest.approx(abs(1 / vocab - p0 / n), rel=1e-4)
        assert metrics["teacher"].perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_position_terms_on_a_hand_computed_pair():
    t = torch.tensor([[0.75, 0.25], [0.5, 0.5]]).log()
    s = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    kl, agree, nll, reverse = _position_terms(t, s, torch.tensor([1, 0])).sum(0).tolist()
    expected_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5) + 0.5 * math.log(0.5 / 0.9) \
        + 0.5 * math.log(0.5 / 0.1)
    assert kl == pytest.approx(expected_kl, rel=1e-6)
    expected_reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25) + 0.9 * math.log(0.9 / 0.5) \
        + 0.1 * math.log(0.1 / 0.5)
    assert reverse == pytest.approx(expected_reverse, rel=1e-6)
    assert agree == 2  # a tie (0.5, 0.5) resolves to the first index on both sides
    assert nll == pytest.approx(-math.log(0.5) - math.log(0.9), rel=1e-6)


def test_errors(teacher, samples, tiny_model_dir):
    narrow = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    narrow.resize_token_embeddings(teacher.vocab_size - 10)
    with pytest.raises(ValueError, match=r"student 'narrow' has \d+ token embeddings but the teacher's vocabulary"):
        distill_metrics(teacher, {"narrow": narrow}, samples, progress=False)
    with pytest.raises(ValueError, match="may not be named 'teacher'"):
        distill_metrics(teacher, {"teacher": narrow}, samples, progress=False)
    with pytest.raises(ValueError, match="no target positions"):
        distill_metrics(teacher, {}, [], progress=False)


def test_sample_sums_rescore_resamples_and_the_bootstrap_brackets_a_real_difference(teacher, samples, tiny_model_dir):
    """Weights of ones reproduce distill_metrics; a weight of 2 on one sample equals scoring a list with
    that sample twice; the paired interval of a model against itself is exactly 0, and that of the
    uniform student against a copy of the teacher lies wholly above 0 and brackets the point estimate."""
    same = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    uniform = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    students = {"copy": same, "uniform": uniform}
    sums = distill_sample_sums(teacher, students, samples, batch_size=2, progress=False)
    metrics = distill_metrics(teacher, students, samples, batch_size=3, progress=False)
    for name in metrics:
        for field, value in vars(sums[name].metrics()).items():
            assert value == pytest.approx(getattr(metrics[name], field), rel=1e-6, abs=1e-9), (name, field)
    doubled = distill_metrics(teacher, {"uniform": uniform}, [*samples, samples[1]], progress=False)["uniform"]
    weights = np.ones(len(samples))
    weights[1] = 2
    reweighted = sums["uniform"].metrics(weights)
    assert reweighted.positions == doubled.positions
    for field in ("kl_to_teacher", "top1_agreement", "perplexity", "ece_to_teacher"):
        assert getattr(reweighted, field) == pytest.approx(getattr(doubled, field), rel=1e-6), field
    assert paired_bootstrap(sums["copy"], sums["copy"], "kl_to_teacher", resamples=50) == (0.0, 0.0, 0.0)
    diff, lo, hi = paired_bootstrap(sums["copy"], sums["uniform"], "kl_to_teacher", resamples=200)
    assert 0 < lo <= diff <= hi
    assert diff == pytest.approx(metrics["uniform"].kl_to_teacher - metrics["copy"].kl_to_teacher, rel=1e-6)
    assert paired_bootstrap(sums["copy"], sums["uniform"], "kl_to_teacher", resamples=200) == (diff, lo, hi)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(sums["copy"], sums["uniform"], "accuracy")
