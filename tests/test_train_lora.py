"""LoRA students (peft): they learn, only adapters change, the merged final/ equals base + adapter,
resume is exact after kill -9, and two gloo processes (FSDP) give the result of one."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, read_records, train_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kdengine.train import main

REPO = Path(__file__).resolve().parents[1]
LORA = ["--lora-rank", 4, "--lora-dropout", 0.1, "--alpha", 0.5, "--lr", 2e-3]


@pytest.fixture(scope="module")
def lora_run(store_dir, student_dir, tmp_path_factory):
    """12 LoRA steps in one go: the reference for the other tests."""
    out = tmp_path_factory.mktemp("lora")
    main(train_args(student_dir, store_dir, out, "--steps", 12, "--eval-every", 12, *LORA))
    return out


def test_lora_learns_and_trains_only_the_adapters(lora_run, student_dir):
    evals = read_records(lora_run, "eval")
    assert [e["step"] for e in evals] == [0, 12] and evals[1]["eval_kd"] < 0.97 * evals[0]["eval_kd"]
    ckpt = lora_run / "checkpoints" / "step-00000012"
    assert not (ckpt / "model.safetensors").exists()  # a LoRA checkpoint holds the adapter alone
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0
    base, final = load_file(str(student_dir / "model.safetensors")), load_file(str(lora_run / "final" / "model.safetensors"))
    assert base.keys() == final.keys()
    for key in base:  # embeddings, norms and the head are untouched; every projection got its B @ A
        changed = not torch.equal(base[key], final[key])
        assert changed == key.endswith("_proj.weight"), key


def test_merged_final_gives_the_logits_of_base_plus_adapter(lora_run, student_dir):
    from peft import PeftModel

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir),
                                        lora_run / "final" / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_resume_after_kill_9_is_exact(lora_run, store_dir, student_dir, tmp_path):
    args = train_args(student_dir, store_dir, tmp_path, "--steps", 12, "--eval-every", 12, "--save-every", 3, *LORA)
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "final").exists()
    main([*args, "--resume"])
    assert [r["loss"] for r in read_records(tmp_path)] == pytest.approx(
        [r["loss"] for r in read_records(lora_run)], rel=1e-6)
    assert_same_weights(lora_run / "final", tmp_path / "final")


def test_lora_with_gradient_checkpointing_takes_the_same_steps(store_dir, student_dir, tmp_path):
    flags = ["--steps", 3, "--lora-rank", 4, "--lora-targets", "q_proj,v_proj"]
    main(train_args(student_dir, store_dir, tmp_path / "plain", *flags))
    main(train_args(student_dir, store_dir, tmp_path / "ckpt", *flags, "--grad-checkpointing"))
    assert [r["loss"] for r in read_records(tmp_path / "ckpt")] == pytest.approx(
        [r["loss"] for r in read_records(tmp_path / "plain")], rel=1e-6)
    adapter = load_file(str(tmp_path / "plain" / "final" / "adapter" / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj"}


@pytest.mark.slow
def test_lora_under_two_gloo_processes_with_fsdp_matches_one(store_dir, student_dir, tmp_path):
    import os

    common = ["--steps", 4, "--batch-tokens", 128, "--lora-rank", 4, "--alpha", 0.5, "--lr", 2e-3]
    main(train_args(student_dir, store_dir, tmp_path / "one", *common, "--grad-accum", 4))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra in (["--stop-after", 2], ["--resume"]):  # with a sharded checkpoint in between
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "scripts" / "train.py"),
               *train_args(student_dir, store_dir, tmp_path / "two", *common, "--grad-accum", 2, "--fsdp", *extra)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-4000:]
    assert [r["loss"] for r in read_records(tmp_path / "two")] == pytest.approx(
        [r["loss"] for r in read_records(tmp_path / "one")], rel=1e-5)
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", atol=1e-5)
