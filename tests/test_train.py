"""The trainer end to end on a real store dumped from the tiny Llama: learning, exact resume (stop and
kill -9), two gloo processes against one, the tokenizer guard and the other setup errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdengine.cli import cli
from kdengine.store import open_store
from kdengine.train import TrainError, main
from kdengine.train.data import collate
from kdengine.train.model import TargetLogits

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = str(REPO / "scripts" / "train.py")
from conftest import assert_same_weights as _assert_same_weights
from conftest import read_records as _records
from conftest import train_args as _args


def test_targets_line_up_with_labels_and_logits(store_dir, student_dir):
    store = open_store(store_dir)
    batch = collate([store[i] for i in range(5)], pad_id=0)
    flat = batch["input_ids"].flatten()
    assert torch.equal(batch["labels"], flat[batch["rows"] + 1])
    assert bool(batch["attention_mask"].flatten()[batch["rows"] + 1].all())
    assert batch["targets"] == sum(store[i]["positions"].numel() for i in range(5)) == batch["rows"].numel()
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        ours = TargetLogits(model)(batch["input_ids"], batch["attention_mask"], batch["rows"])
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, full.flatten(0, 1)[batch["rows"]], atol=1e-5)


def test_training_lowers_heldout_kd_and_raises_agreement(store_dir, student_dir, tmp_path):
    main(_args(student_dir, store_dir, tmp_path, "--steps", 30, "--eval-every", 15, "--eval-fraction", 0.1))
    evals = _records(tmp_path, "eval")
    assert [e["step"] for e in evals] == [0, 15, 30]
    first, last = evals[0], evals[-1]
    assert first["eval_samples"] == 16 and first["eval_targets"] > 100
    assert last["eval_kd"] < 0.7 * first["eval_kd"], evals
    assert last["eval_top1"] > first["eval_top1"] + 0.1, evals
    metrics = _records(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert {"loss", "kd", "ce", "lr", "tokens_per_s", "peak_mem_mib", "data_wait"} <= metrics[0].keys()
    final = tmp_path / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(final)) == len(AutoTokenizer.from_pretrained(student_dir))
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"question": "Each of 3 books costs 4 dollars. How many dollars?",
                                    "answer": "3 * 4 = 12\n#### 12"}) + "\n")
    result = CliRunner().invoke(cli, ["eval", "gsm8k", "--model", str(final), "--data", str(problems),
                                      "--max-new-tokens", "4", "--log-dir", str(tmp_path / "gsm8k")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gsm8k" / "report.json").is_file()


@pytest.fixture(scope="module")
def straight_run(store_dir, student_dir, tmp_path_factory):
    """40 steps in one go, the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    main(_args(student_dir, store_dir, out, "--steps", 40, "--alpha", 0.5))
    return out


def test_stop_and_resume_is_exact(store_dir, student_dir, straight_run, tmp_path, capsys):
    main(_args(student_dir, store_dir, tmp_path, "--steps", 40, "--alpha", 0.5, "--stop-after", 17))
    assert not (tmp_path / "final").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000017"]
    capsys.readouterr()
    main(_args(student_dir, store_dir, tmp_path, "--steps", 40, "--alpha", 0.5, "--resume"))
    assert "step-00000017 (step 17)" in capsys.readouterr().err
    _assert_same_weights(straight_run / "final", tmp_path / "final")
    straight, resumed = _records(straight_run), _records(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)


@pytest.mark.slow
def test_kill_9_between_saves_then_resume(store_dir, student_dir, straight_run, tmp_path, capsys):
    args = _args(student_dir, store_dir, tmp_path, "--steps", 40, "--alpha", 0.5, "--save-every", 5, "--workers", 2)
    proc = subprocess.Popen([sys.executable, TRAIN_SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (tmp_path / "final").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert killed_at < 40
    capsys.readouterr()
    main(_args(student_dir, store_dir, tmp_path, "--steps", 40, "--alpha", 0.5, "--save-every", 5, "--resume"))
    assert f"step-{killed_at:08d} (step {killed_at})" in capsys.readouterr().err
    _assert_same_weights(straight_run / "final", tmp_path / "final")
    assert [r["loss"] for r in _records(tmp_path)] == pytest.approx([r["loss"] for r in _records(straight_run)], rel=1e-6)


def _torchrun(args, nproc):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           TRAIN_SCRIPT, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = "\n".join(line for line in done.stderr.splitlines() if "it/s" not in line and "s/it" not in line)
    assert done.returncode == 0, log[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(store_dir, student_dir, tmp_path, mode):
    if mode == "fsdp":  # with a tied head, which FSDP gathers as two tensors: saved once all the same
        tied = AutoModelForCausalLM.from_pretrained(student_dir)
        tied.config.tie_word_embeddings = True
        tied.tie_weights()
        tied.save_pretrained(tmp_path / "tied")
        AutoTokenizer.from_pretrained(student_dir).save_pretrained(tmp_path / "tied")
        student_dir = tmp_path / "tied"
    common = ["--steps", 5, "--batch-tokens", 128, "--alpha", 0.5, "--eval-every", 5]
    main(_args(student_dir, store_dir, tmp_path / "one", *common, "--grad-accum", 4))
    extra = ["--fsdp"] if mode == "fsdp" else []
    _torchrun(_args(student_dir, store_dir, tmp_path / "two", *common, "--grad-accum", 2, *extra), nproc=2)
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert all(r["fused_head"] for r in one + two)  # FSDP: the head's weight is the root unit's, used in its forward
    assert [r["targets"] for r in two] == [r["targets"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", atol=1e-5)
    for a, b in zip(_records(tmp_path / "one", "eval"), _records(tmp_path / "two", "eval")):
        assert (a["step"], a["eval_targets"], a["eval_top1"]) == (b["step"], b["eval_targets"], b["eval_top1"])
        assert a["eval_kd"] == pytest.approx(b["eval_kd"], rel=1e-5)


def _cli_train(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def test_missing_store_and_student_fail_before_any_step(store_dir, student_dir, tmp_path):
    result = _cli_train(*_args(student_dir, tmp_path / "no-store", tmp_path / "run"))
    assert result.exit_code == 1
    assert f"store {tmp_path / 'no-store'} does not exist; make one with `kdengine dump" in result.output
    result = _cli_train(*_args(tmp_path / "no-student", store_dir, tmp_path / "run"))
    assert result.exit_code == 1
    assert f"student {tmp_path / 'no-student'} does not exist; make one with `kdengine make-student" in result.output
    assert not (tmp_path / "run").exists()


def test_tokenizer_mismatch_fails_before_any_step(store_dir, tmp_path):
    from conftest import build_model, build_tokenizer

    other = build_model(tmp_path / "other", build_tokenizer(tmp_path / "tok", vocab_size=300))
    with pytest.raises(TrainError, match=f"tokenizer mismatch: student {other} has tokenizer fingerprint"):
        main(_args(other, store_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_student_vocab_smaller_than_teacher_ids_fails(store_dir, student_dir, tmp_path):
    small = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher_vocab = open_store(store_dir).vocab_size
    small.resize_token_embeddings(teacher_vocab - 10)
    small.save_pretrained(tmp_path / "small")
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(tmp_path / "small")
    result = _cli_train(*_args(tmp_path / "small", store_dir, tmp_path / "run"))
    assert result.exit_code == 1
    assert (f"has {teacher_vocab - 10} output rows, but store {store_dir} holds teacher ids up to "
            f"{teacher_vocab - 1} (teacher vocab {teacher_vocab})") in result.output
    assert not (tmp_path / "run").exists()


def test_padded_student_vocab_is_accepted(store_dir, student_dir, tmp_path):
    padded = AutoModelForCausalLM.from_pretrained(student_dir)
    padded.resize_token_embeddings(open_store(store_dir).vocab_size + 13)
    padded.save_pretrained(tmp_path / "padded")
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(tmp_path / "padded")
    main(_args(tmp_path / "padded", store_dir, tmp_path / "run", "--steps", 2))
    assert len(_records(tmp_path / "run")) == 2


def test_existing_run_needs_resume_and_resume_warns_on_drift(store_dir, student_dir, tmp_path, capsys):
    main(_args(student_dir, store_dir, tmp_path, "--steps", 2))
    with pytest.raises(TrainError, match="already holds checkpoints .*pass --resume"):
        main(_args(student_dir, store_dir, tmp_path, "--steps", 2))
    capsys.readouterr()
    main(_args(student_dir, store_dir, tmp_path, "--steps", 2, "--resume"))  # nothing left to do
    assert "the run is complete (step 2 of 2" in capsys.readouterr().err
    main(_args(student_dir, store_dir, tmp_path, "--steps", 3, "--resume", "--lr", 1e-3, "--log-every", 3))
    err = capsys.readouterr().err
    assert "warning: config changed since step-00000002: lr: checkpoint 0.003 -> now 0.001" in err
    assert "steps: checkpoint 2 -> now 3" in err and "log_every" not in err
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]


def test_cli_and_script_share_flags():
    script = subprocess.run([sys.executable, TRAIN_SCRIPT, "--help"], capture_output=True, text=True, check=True)
    command = CliRunner().invoke(cli, ["train", "--help"])
    assert command.exit_code == 0
    assert command.output.startswith("Usage: cli train [OPTIONS]")
    assert script.stdout.startswith("Usage: scripts/train.py [OPTIONS]")
    # Past the usage line the two help texts are the same, options grouped under headings.
    assert command.output.split("\n", 1)[1] == script.stdout.split("\n", 1)[1]
    for heading in ("Inputs and outputs:", "Optimisation:", "Loss:", "Evaluation, logging, checkpoints:"):
        assert heading in script.stdout
    for flag in ("--student", "--store", "--out", "--steps", "--lr", "--batch-tokens", "--alpha", "--temperature",
                 "--tail", "--eval-every", "--save-every", "--log-every", "--seed", "--resume", "--fsdp", "--config"):
        assert flag in script.stdout


def test_gradient_checkpointing_takes_the_same_steps(store_dir, student_dir, tmp_path):
    from kdengine.train.model import load_student

    assert load_student(student_dir, grad_checkpointing=True).is_activation_checkpointing
    assert not load_student(student_dir, grad_checkpointing=False).is_activation_checkpointing
    flags = ["--steps", 3, "--tail", "--approx-tempered-tail", "--temperature", 2, "--alpha", 0.7]
    main(_args(student_dir, store_dir, tmp_path / "plain", *flags))
    main(_args(student_dir, store_dir, tmp_path / "ckpt", *flags, "--grad-checkpointing"))
    plain, ckpt = _records(tmp_path / "plain"), _records(tmp_path / "ckpt")
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    _assert_same_weights(tmp_path / "plain" / "final", tmp_path / "ckpt" / "final")


def test_a_run_repeats_from_its_own_config_yaml(store_dir, student_dir, tmp_path):
    main(_args(student_dir, store_dir, tmp_path / "flags", "--steps", 3, "--alpha", 0.5, "--tail"))
    saved = tmp_path / "flags" / "config.yaml"
    assert (tmp_path / "flags" / "checkpoints" / "step-00000003" / "config.yaml").read_text() == saved.read_text()
    main(["--config", str(saved), "--out", str(tmp_path / "again")])
    assert [r["loss"] for r in _records(tmp_path / "again")] == [r["loss"] for r in _records(tmp_path / "flags")]
    _assert_same_weights(tmp_path / "flags" / "final", tmp_path / "again" / "final", atol=0)


@pytest.mark.slow
def test_a_sharded_checkpoint_of_two_gloo_ranks_resumes_exactly(store_dir, student_dir, tmp_path):
    common = ["--steps", 4, "--batch-tokens", 128, "--alpha", 0.5]
    main(_args(student_dir, store_dir, tmp_path / "one", *common, "--grad-accum", 4))
    _torchrun(_args(student_dir, store_dir, tmp_path / "two", *common, "--grad-accum", 2, "--fsdp",
                    "--stop-after", 2), nproc=2)
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "model.safetensors" not in names  # no gathered model: each rank wrote its own shards
    assert {"rank-00000.safetensors", "rank-00001.safetensors", "trainer_state.json"} <= set(names)
    shard_rows = [load_file(str(ckpt / f"rank-0000{r}.safetensors")) for r in (0, 1)]
    assert sum(t.numel() for t in shard_rows[0].values()) == pytest.approx(
        sum(t.numel() for t in shard_rows[1].values()), rel=0.2)  # two halves, not two copies
    _torchrun(_args(student_dir, store_dir, tmp_path / "two", *common, "--grad-accum", 2, "--fsdp", "--resume"),
              nproc=2)
    assert [r["loss"] for r in _records(tmp_path / "two")] == pytest.approx(
        [r["loss"] for r in _records(tmp_path / "one")], rel=1e-5)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", atol=1e-5)
    with pytest.raises(TrainError, match="holds FSDP shards of 2 processes; resume under torchrun"):
        main(_args(student_dir, store_dir, tmp_path / "two", *common, "--steps", 6, "--resume"))
