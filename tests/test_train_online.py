"""Training against an online teacher (tiny real Llamas): dense KD against an independent full-vocabulary
KL, online top-k against a raw-codec store from the same teacher, feature KD with equal and unequal
widths (gradients, exact resume, export), and the one-line errors."""
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdengine.cli import cli
from kdengine.losses import sparse_kl
from kdengine.losses.dense_kl import dense_kl_rows
from kdengine.store import open_store
from kdengine.train import main
from kdengine.train.data import collate
from kdengine.train.hidden import PROJECTIONS_FILE, StudentWithHidden, hidden_loss_rows, layer_pairs
from kdengine.train.model import TargetLogits
from kdengine.train.sources import OnlineSource
from kdengine.train.student import make_student
from conftest import assert_same_weights

WORDS = ("apples oranges books cost each dollars how many does she buy sell give left total week day more "
         "less than twice half the a of to and in is was for on that with").split()
BASE = ["--batch-tokens", "256", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0", "--save-every", "0",
        "--seed", "0", "--workers", "0", "--warmup-steps", "2"]
K = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("online_corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 24))]
            f.write(json.dumps({"text": " ".join(words).capitalize() + "."}) + "\n")
    return path


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory, tiny_model_dir, corpus):
    out = tmp_path_factory.mktemp("online_store") / "store"
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out),
                                      "--top-k", str(K), "--codec", "raw", "--shard-samples", "32"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("online_student")
    make_student(str(tiny_model_dir), layers=1, layer_map="uniform", out=str(out))
    return out


@pytest.fixture(scope="module")
def narrow_student(tmp_path_factory, tiny_model_dir):
    """A 2-layer student 32 wide (the teacher is 64 wide): feature KD needs projections."""
    from conftest import build_model

    return build_model(tmp_path_factory.mktemp("narrow"), AutoTokenizer.from_pretrained(tiny_model_dir),
                       layers=2, hidden=32, seed=3)


def _online(student, teacher, corpus, out, *extra):
    return ["--student", str(student), "--teacher", str(teacher), "--data", str(corpus), "--out", str(out),
            *BASE, *map(str, extra)]


def _records(out, name="metrics"):
    return [json.loads(line) for line in (Path(out) / f"{name}.jsonl").read_text().splitlines()]


def _source(teacher, corpus, top_k=0):
    return OnlineSource(teacher=str(teacher), data=str(corpus), device=torch.device("cpu"), dtype="fp32", chat=False,
                        max_length=None, top_k=top_k, tail=False, progress=False)


def _batch(source, ids):
    return source.batches(lambda key: key, pad_id=0)[ids]


def test_dense_rows_equal_an_independent_full_vocabulary_kl(tiny_model_dir, corpus, student):
    source = _source(tiny_model_dir, corpus)
    b = _batch(source, [0, 3, 5, 7, 11])
    targets = source.targets(b)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    logits = TargetLogits(model)(b["input_ids"], b["attention_mask"], b["rows"])
    rows = dense_kl_rows(logits, targets.teacher_logits, b["labels"], alpha=0.5, temperature=2.0)
    # independently: full HF forwards of both models, every position, then the rows
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        t_full = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.flatten(0, 1)[b["rows"]]
        s_full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.flatten(0, 1)[b["rows"]]
    kl = F.kl_div(F.log_softmax(s_full / 2, -1), F.log_softmax(t_full / 2, -1), log_target=True,
                  reduction="none").sum(-1) * 4
    ce = F.cross_entropy(s_full, b["labels"], reduction="none")
    torch.testing.assert_close(rows.kd, kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows.loss.detach(), 0.5 * kl + 0.5 * ce, rtol=1e-4, atol=1e-5)
    assert torch.equal(targets.teacher_top1(), t_full.argmax(-1))


def test_online_top_k_gives_the_store_loss_and_gradients(tiny_model_dir, corpus, raw_store, student):
    source = _source(tiny_model_dir, corpus, top_k=K)
    store = open_store(raw_store)
    ids = [1, 2, 4, 40, 41]
    b_online = _batch(source, ids)
    b_store = collate([store[i] for i in ids], pad_id=0)
    for key in ("input_ids", "attention_mask", "rows", "labels"):
        assert torch.equal(b_online[key], b_store[key]), key
    online = source.targets(b_online)
    assert torch.equal(online.topk_idx, b_store["topk_idx"])
    torch.testing.assert_close(online.topk_logp, b_store["topk_logp"], rtol=1e-5, atol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(student)
    head = TargetLogits(model)
    grads = []
    for idx, logp in ((online.topk_idx, online.topk_logp), (b_store["topk_idx"], b_store["topk_logp"])):
        model.zero_grad()
        logits = head(b_store["input_ids"], b_store["attention_mask"], b_store["rows"])
        loss = sparse_kl(logits, idx, logp, b_store["labels"], alpha=0.7, tail=True, reduction="sum")
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grad_a, grad_b):  # the teachers' log-probs differ by float noise (other padding)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * float(gb.abs().max()))


def test_online_top_k_run_matches_the_store_run(tiny_model_dir, corpus, raw_store, student, tmp_path):
    common = ["--steps", 4, "--alpha", 0.8, "--tail", "--eval-every", 4]
    main(["--student", str(student), "--store", str(raw_store), "--out", str(tmp_path / "store"), *BASE,
          *map(str, common)])
    main(_online(student, tiny_model_dir, corpus, tmp_path / "online", "--online-top-k", K, *common))
    a, b = _records(tmp_path / "store"), _records(tmp_path / "online")
    assert all(r["fused_head"] for r in a + b)
    assert [r["targets"] for r in a] == [r["targets"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    ea, eb = _records(tmp_path / "store", "eval"), _records(tmp_path / "online", "eval")
    assert [e["eval_kd"] for e in eb] == pytest.approx([e["eval_kd"] for e in ea], rel=1e-5)


def test_dense_run_learns_and_exports(tiny_model_dir, corpus, student, tmp_path):
    main(_online(student, tiny_model_dir, corpus, tmp_path, "--steps", 8, "--eval-every", 8, "--alpha", 0.9))
    evals = _records(tmp_path, "eval")
    assert evals[-1]["eval_kd"] < 0.8 * evals[0]["eval_kd"], evals
    m = _records(tmp_path)
    assert not any(r["fused_head"] for r in m)  # dense KD has no fused loss: it trains on the logits
    assert {"loss", "kd", "ce"} <= m[0].keys() and "hidden" not in m[0]
    assert m[-1]["loss"] == pytest.approx(0.9 * m[-1]["kd"] + 0.1 * m[-1]["ce"], rel=1e-5)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final").config.num_hidden_layers == 1


def test_default_layer_pairs_follow_the_recorded_map_else_uniform():
    assert layer_pairs(None, student_layers=3, teacher_layers=30, recorded_map=[0, 14, 29]) == [(0, 0), (1, 14), (2, 29)]
    assert layer_pairs("", student_layers=3, teacher_layers=7, recorded_map=None) == [(0, 0), (1, 3), (2, 6)]
    assert layer_pairs("1:5, 0:2", student_layers=2, teacher_layers=6, recorded_map=None) == [(1, 5), (0, 2)]


@pytest.mark.parametrize("narrow", [False, True])
def test_feature_gradient_reaches_projection_and_student(tiny_model_dir, corpus, student, narrow_student, narrow):
    source = _source(tiny_model_dir, corpus)
    path = narrow_student if narrow else student
    model = AutoModelForCausalLM.from_pretrained(path)
    pairs = [(0, 0), (1, 1)] if narrow else [(0, 1)]
    source.capture_hidden([t for _, t in pairs])
    module = StudentWithHidden(model, pairs, source.hidden_size)
    b = _batch(source, [0, 1, 2])
    targets = source.targets(b)
    logits, hidden = module(b["input_ids"], b["attention_mask"], b["rows"])
    assert [h.shape for h in hidden] == [t.shape for t in targets.hidden] == [(b["targets"], 64)] * len(pairs)
    for kind in ("mse", "cosine"):
        module.zero_grad()
        logits, hidden = module(b["input_ids"], b["attention_mask"], b["rows"])
        hidden_loss_rows(hidden, targets.hidden, kind).sum().backward()
        layer0 = model.model.layers[0].mlp.down_proj.weight.grad
        assert layer0 is not None and float(layer0.abs().sum()) > 0, kind
        params = list(module.projections.parameters())
        assert len(params) == (len(pairs) if narrow else 0)
        assert all(float(p.grad.abs().sum()) > 0 for p in params), kind


def test_feature_kd_resume_is_exact_and_projections_stay_out_of_the_export(tiny_model_dir, corpus, narrow_student,
                                                                          tmp_path, capsys):
    flags = ["--steps", 6, "--hidden-weight", 0.5, "--hidden-loss", "mse", "--hidden-layers", "0:0,1:1"]
    main(_online(narrow_student, tiny_model_dir, corpus, tmp_path / "straight", *flags))
    main(_online(narrow_student, tiny_model_dir, corpus, tmp_path / "resumed", *flags, "--stop-after", 3))
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-00000003"
    assert set(load_file(str(ckpt / PROJECTIONS_FILE))) == {"projections.maps.0.weight", "projections.maps.1.weight"}
    main(_online(narrow_student, tiny_model_dir, corpus, tmp_path / "resumed", *flags, "--resume"))
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert all(r["hidden"] > 0 for r in straight)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    assert [r["hidden"] for r in resumed] == pytest.approx([r["hidden"] for r in straight], rel=1e-6)
    a, b = load_file(str(tmp_path / "straight" / "final" / "model.safetensors")), \
        load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and not any("projections" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "straight" / "final" / PROJECTIONS_FILE).exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final").config.hidden_size == 32


def test_feature_kd_with_the_fused_head_takes_the_steps_of_the_logits(tiny_model_dir, corpus, narrow_student,
                                                                       tmp_path):
    flags = ["--steps", 3, "--online-top-k", K, "--tail", "--temperature", 2, "--alpha", 0.8, "--hidden-weight", 0.5]
    main(_online(narrow_student, tiny_model_dir, corpus, tmp_path / "fused", *flags))
    main(_online(narrow_student, tiny_model_dir, corpus, tmp_path / "logits", *flags, "--no-fused-head"))
    fused, logits = _records(tmp_path / "fused"), _records(tmp_path / "logits")
    assert [r["fused_head"] for r in fused] == [True] * 3 and not any(r["fused_head"] for r in logits)
    for key in ("loss", "kd", "hidden"):
        assert [r[key] for r in fused] == pytest.approx([r[key] for r in logits], rel=1e-5), key


def _cli_error(*args) -> str:
    result = CliRunner().invoke(cli, ["train", *map(str, args)])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    return lines[-1]


def test_bad_inputs_are_one_line_errors(tiny_model_dir, corpus, raw_store, student, tmp_path):
    from conftest import build_model, build_tokenizer

    other = build_model(tmp_path / "other", build_tokenizer(tmp_path / "tok", vocab_size=300))
    line = _cli_error(*_online(other, tiny_model_dir, corpus, tmp_path / "a"))
    assert line.startswith(f"Error: tokenizer mismatch: student {other} has tokenizer fingerprint")
    assert f"but teacher {tiny_model_dir} has" in line and "kdengine make-student --teacher" in line
    line = _cli_error(*_online(student, tiny_model_dir, corpus, tmp_path / "b", "--hidden-weight", 1,
                               "--hidden-layers", "0:7"))
    assert line.endswith("--hidden-layers '0:7': teacher layer 7 is out of range: the teacher has 2 decoder layers "
                         "(0..1)")
    line = _cli_error(*_online(student, tiny_model_dir, corpus, tmp_path / "c", "--hidden-weight", 1,
                               "--hidden-layers", "3:0"))
    assert "student layer 3 is out of range: the student has 1 decoder layers (0..0)" in line
    line = _cli_error(*_online(student, tiny_model_dir, corpus, tmp_path / "d", "--store", raw_store))
    assert "--teacher and --store exclude each other" in line
    line = _cli_error("--student", student, "--store", raw_store, "--out", tmp_path / "e", "--hidden-weight", 1)
    assert "need --teacher (online)" in line
    line = _cli_error("--student", student, "--teacher", tiny_model_dir, "--out", tmp_path / "f")
    assert "--teacher needs --data FILE" in line
    assert not any((tmp_path / d).exists() for d in "abcdef")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_with_feature_kd(tiny_model_dir, corpus, narrow_student, tmp_path, mode):
    """The teacher replicated per rank, the projections data-parallel like the student (DDP), or
    sharded with it (FSDP)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    common = ["--steps", 3, "--batch-tokens", 128, "--alpha", 0.5, "--hidden-weight", 0.5,
              "--hidden-layers", "0:0,1:1"]
    main(_online(narrow_student, tiny_model_dir, corpus, tmp_path / "one", *common, "--grad-accum", 4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "scripts" / "train.py"),
           *_online(narrow_student, tiny_model_dir, corpus, tmp_path / "two", *common, "--grad-accum", 2),
           *(["--fsdp"] if mode == "fsdp" else [])]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["targets"] for r in two] == [r["targets"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["hidden"] for r in two] == pytest.approx([r["hidden"] for r in one], rel=1e-5)
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", atol=1e-5)
    if mode == "fsdp":  # sharded checkpoints keep the projections in the ranks' shards; the hidden losses
        return          # of steps 2 and 3 above already depend on the projections steps 1 and 2 trained
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000003" / PROJECTIONS_FILE))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000003" / PROJECTIONS_FILE))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
