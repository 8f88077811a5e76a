"""Sampled-target stores (RS-KD) end to end on the tiny Llama: the `sampled` codec, dump -> store ->
the teacher's own draws, identical draws across reruns, resumes and rank splits, inspect, and
training from the store (with its option refusals)."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.dump import DumpConfig, DumpError, dump
from kdengine.sampling import draw_targets, sample_seed
from kdengine.store import open_store
from kdengine.store.codec import CodecError
from kdengine.store.sampled_codec import SampledCodec
from kdengine.store.writer import drop_shards
from kdengine.teachers import load_teacher
from kdengine.train import TrainError, main as train_main
from kdengine.train.student import make_student

WORDS = "apples oranges books cost each dollars how many does she buy sell give left total week day".split()
M = 6


def _corpus(path, n=14, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = list(rng.choice(WORDS, size=int(rng.integers(4, 16))))
            f.write(json.dumps({"text": " ".join(words).capitalize() + f" {i}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sampled")
    cfg = DumpConfig(teacher=str(tiny_model_dir), data=str(_corpus(root / "data.jsonl")), out=str(root / "store"),
                     top_k=1, targets="sample", samples=M, proposal_temperature=1.5, seed=7, batch_size=3,
                     shard_samples=4, progress=False)
    return cfg, dump(cfg)


def _all(store_dir):
    store = open_store(store_dir)
    return [store[i] for i in range(len(store))]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["index"] == y["index"]
        for key in ("input_ids", "positions", "sample_idx", "sample_count", "sample_logp", "sample_log_norm"):
            assert torch.equal(x[key], y[key]), key


def test_codec_round_trip_and_corrupt_frames():
    codec = SampledCodec(k=4, vocab_size=70000, samples=4, proposal_temperature=2.0)
    ids = np.array([[69999, 3, 0, 0], [5, 6, 7, 8]])
    counts = np.array([[1, 3, 0, 0], [1, 1, 1, 1]])
    logp = np.array([[-0.5, -1.25, 0, 0], [-2, -3, -4, -70.0]])
    frame = codec.encode(ids, counts, logp, np.array([0.25, -0.5]))
    got_ids, got_counts, got_logp, got_norm = codec.decode(frame)
    assert got_ids.tolist() == [[3, 69999, 0, 0], [5, 6, 7, 8]]  # ascending by id, padded
    assert got_counts.tolist() == [[3, 1, 0, 0], [1, 1, 1, 1]]
    assert np.abs(got_logp - [[-1.25, -0.5, 0, 0], [-2, -3, -4, -65535 / 1024]]).max() <= 1 / 2048
    assert got_norm.tolist() == [0.25, -0.5]
    with pytest.raises(CodecError, match="frame is 20 bytes, its header says"):
        codec.decode(frame[:20])
    with pytest.raises(CodecError, match="not the 'sampled' codec"):
        codec.decode(b"A1" + frame[2:])
    with pytest.raises(ValueError, match="counts summing to samples = 4"):
        codec.encode(ids, counts * 2, logp, np.zeros(2))
    with pytest.raises(ValueError, match="distinct"):
        codec.encode(np.array([[5, 5]]), np.array([[2, 2]]), np.zeros((1, 2)) - 1, np.zeros(1))


def test_store_holds_the_teachers_own_seeded_draws(sampled, tiny_model_dir):
    cfg, summary = sampled
    store = open_store(cfg.out)
    assert store.targets == "sample" and store.k == M and store.complete and summary.store_complete
    teacher = load_teacher(str(tiny_model_dir))
    for i in (0, len(store) - 1):
        s = store[i]
        ids = s["input_ids"][None]
        with torch.inference_mode():
            logits = teacher.logits(ids, torch.tensor([ids.shape[1]]))[0, s["positions"]]
        want = draw_targets(logits, M, proposal_temperature=1.5,
                            generator=torch.Generator().manual_seed(sample_seed(7, s["index"])))
        k = s["sample_idx"].shape[1]
        assert torch.equal(s["sample_idx"], want.ids[:, :k]) and torch.equal(s["sample_count"], want.counts[:, :k])
        assert (s["sample_count"].sum(1) == M).all()
        drawn = s["sample_count"] > 0
        assert (s["sample_logp"][drawn] - want.logp[:, :k][drawn]).abs().max() <= 1 / 2048 + 1e-6
        assert torch.allclose(s["sample_log_norm"], want.log_norm, atol=1e-5)


def test_reruns_resumes_and_rank_splits_draw_the_same_ids(sampled, tmp_path):
    cfg, _ = sampled
    reference = _all(cfg.out)
    resumed = tmp_path / "resumed"
    shutil.copytree(cfg.out, resumed)
    drop_shards(resumed, ["shard-000001.safetensors", "shard-000003.safetensors"])
    summary = dump(DumpConfig(**{**cfg.__dict__, "out": str(resumed)}))
    assert summary.shards_written == 2
    _same(_all(resumed), reference)
    two = tmp_path / "two_ranks"
    for rank in (1, 0):
        dump(DumpConfig(**{**cfg.__dict__, "out": str(two), "rank": rank, "world_size": 2}))
    _same(_all(two), reference)
    other_seed = tmp_path / "seed8"
    dump(DumpConfig(**{**cfg.__dict__, "out": str(other_seed), "seed": 8}))
    assert any(not torch.equal(a["sample_idx"], b["sample_idx"]) for a, b in zip(_all(other_seed), reference))


def test_a_resume_with_other_sampling_settings_is_refused(sampled, tmp_path):
    cfg, _ = sampled
    out = tmp_path / "store"
    shutil.copytree(cfg.out, out)
    with pytest.raises(Exception, match="codec_params"):
        dump(DumpConfig(**{**cfg.__dict__, "out": str(out), "samples": M + 1}))
    with pytest.raises(DumpError, match="--proposal-temperature must be a finite number > 0"):
        dump(DumpConfig(**{**cfg.__dict__, "out": str(tmp_path / "o"), "proposal_temperature": 0.0}))


def test_inspect_shows_the_mode_draws_and_distinct_ids(sampled):
    cfg, summary = sampled
    result = CliRunner().invoke(cli, ["inspect", cfg.out, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    store = open_store(cfg.out)
    distinct = sum(int((store[i]["sample_count"] > 0).sum()) for i in range(len(store)))
    assert info["targets"] == "sample" and info["draws_per_position"] == M and info["proposal_temperature"] == 1.5
    assert info["distinct_ids_per_position"] == pytest.approx(distinct / summary.positions, abs=1e-3)
    assert 1 <= info["distinct_ids_per_position"] <= M
    result = CliRunner().invoke(cli, ["inspect", cfg.out, "--sample", "0"])
    assert result.exit_code == 0 and "sampled targets" in result.output and " x" in result.output
    result = CliRunner().invoke(cli, ["verify", cfg.out])
    assert result.exit_code == 0, result.output


def test_cli_dump_options(tmp_path, tiny_model_dir):
    data = _corpus(tmp_path / "d.jsonl", n=3)
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "s"), "--targets", "sample", "--top-k", "8"])
    assert result.exit_code == 2 and "--top-k does not apply with --targets sample" in result.output
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "s"), "--targets", "sample", "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert open_store(tmp_path / "s").codec_params["samples"] == 4


def test_training_from_a_sampled_store(sampled, tiny_model_dir, tmp_path):
    cfg, _ = sampled
    student = tmp_path / "student"
    make_student(str(tiny_model_dir), layers=1, layer_map="first", out=str(student))
    base = ["--student", str(student), "--store", cfg.out, "--batch-tokens", "128", "--lr", "3e-3", "--log-every",
            "1", "--eval-every", "2", "--save-every", "0", "--seed", "0", "--workers", "0", "--warmup-steps", "1",
            "--eval-fraction", "0.2"]
    train_main([*base, "--out", str(tmp_path / "run"), "--steps", "4"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records)
    assert not any(r["fused_head"] for r in records)  # sampled_kl has no fused form: logits, with a note
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert evals and all(np.isfinite(e["eval_kd"]) for e in evals)
    assert (tmp_path / "run" / "final" / "config.json").exists()
    with pytest.raises(TrainError, match="--temperature 1 or 1.5 only, got 2.0"):
        train_main([*base, "--out", str(tmp_path / "t2"), "--steps", "1", "--temperature", "2"])
    with pytest.raises(TrainError, match="no tail bucket; drop --tail"):
        train_main([*base, "--out", str(tmp_path / "tail"), "--steps", "1", "--tail"])


def test_exact_head_codec_round_trip_and_refusals():
    codec = SampledCodec(k=6, vocab_size=100, samples=4, exact_top=2)
    assert codec.params["exact_top"] == 2 and "exact_top" not in SampledCodec(k=4, vocab_size=100, samples=4).params
    ids = np.array([[3, 9, 50, 7, 0, 0], [1, 2, 5, 6, 7, 8]])  # head first (ascending), then the draws
    counts = np.array([[1, 1, 3, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    logp = np.array([[-0.2, -1.0, -3.0, -4.0, 0, 0], [-1, -1.5, -3, -4, -5, -6.0]])
    frame = codec.encode(ids, counts, logp, np.array([-1.25, -0.75]))
    assert frame[:2] == b"S2"
    got_ids, got_counts, got_logp, got_norm = codec.decode(frame)
    assert got_ids.tolist() == [[3, 9, 7, 50, 0, 0], [1, 2, 5, 6, 7, 8]]  # draws ascending after the head
    assert got_counts.tolist() == [[1, 1, 1, 3, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert np.abs(got_logp - [[-0.2, -1.0, -4.0, -3.0, 0, 0], [-1, -1.5, -3, -4, -5, -6]]).max() <= 1 / 2048
    assert got_norm.tolist() == [-1.25, -0.75]
    with pytest.raises(CodecError, match="not the 'sampled' codec's b'S1'"):
        SampledCodec(k=4, vocab_size=100, samples=4).decode(frame)
    with pytest.raises(ValueError, match="drawn id repeats one of the exact head's ids"):
        codec.encode(np.array([[3, 9, 9, 0]]), np.array([[1, 1, 4, 0]]), np.full((1, 4), -1.0), np.zeros(1))
    with pytest.raises(ValueError, match="head's ids must be distinct and ascending"):
        codec.encode(np.array([[9, 3, 5, 0]]), np.array([[1, 1, 4, 0]]), np.full((1, 4), -1.0), np.zeros(1))
    with pytest.raises(ValueError, match="head's 2 slots must each have count 1"):
        codec.encode(np.array([[3, 9, 5, 0]]), np.array([[2, 1, 3, 0]]), np.full((1, 4), -1.0), np.zeros(1))
    with pytest.raises(ValueError, match="needs proposal_temperature 1"):
        SampledCodec(k=6, vocab_size=100, samples=4, exact_top=2, proposal_temperature=2.0)
    with pytest.raises(ValueError, match="plus its exact head"):
        SampledCodec(k=4, vocab_size=100, samples=4, exact_top=2)


def test_exact_head_dump_inspect_and_train(tiny_model_dir, tmp_path):
    """`--exact-top 3`: each position holds the teacher's 3 most likely ids (count 1) then M draws off
    them; the store reads back the teacher's own draws, inspect shows the head, training runs at T = 1
    and refuses T != 1."""
    data = _corpus(tmp_path / "d.jsonl", n=6)
    out = tmp_path / "s"
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                                      "--targets", "sample", "--samples", str(M), "--exact-top", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.k == M + 3 and store.codec_params["exact_top"] == 3
    teacher = load_teacher(str(tiny_model_dir))
    s = store[1]
    ids = s["input_ids"][None]
    with torch.inference_mode():
        logits = teacher.logits(ids, torch.tensor([ids.shape[1]]))[0, s["positions"]]
    want = draw_targets(logits, M, exact_top=3, generator=torch.Generator().manual_seed(sample_seed(2, s["index"])))
    k = s["sample_idx"].shape[1]
    assert torch.equal(s["sample_idx"], want.ids[:, :k]) and torch.equal(s["sample_count"], want.counts[:, :k])
    top3 = torch.log_softmax(logits.float(), -1).topk(3).indices.sort(-1).values
    assert torch.equal(s["sample_idx"][:, :3].long(), top3) and (s["sample_count"][:, :3] == 1).all()
    assert (s["sample_count"][:, 3:].sum(1) == M).all()
    p_head = torch.log_softmax(logits.float(), -1).gather(1, top3).exp().sum(1)
    assert torch.allclose(s["sample_log_norm"], torch.log1p(-p_head), atol=1e-4)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).output)
    assert info["exact_top"] == 3 and info["distinct_ids_per_position"] > 3
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0
    student = tmp_path / "student"
    make_student(str(tiny_model_dir), layers=1, layer_map="first", out=str(student))
    base = ["--student", str(student), "--store", str(out), "--batch-tokens", "128", "--log-every", "1",
            "--eval-every", "0", "--save-every", "0", "--workers", "0", "--steps", "2"]
    train_main([*base, "--out", str(tmp_path / "run")])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    with pytest.raises(TrainError, match="exact head of 3 ids .* --temperature 1 only"):
        train_main([*base, "--out", str(tmp_path / "t2"), "--temperature", "2"])
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "bad"), "--targets", "sample", "--exact-top", "2",
                                      "--proposal-temperature", "2"])
    assert result.exit_code != 0 and "needs --proposal-temperature 1" in result.output
