"""`kdengine generate` on a tiny real model: responses against transformers' generate, stored top-k
against a teacher-forced recompute, seeded sampling, ranks, resume, rejection sampling, choices and
the refusals of bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.decode import Sampling, TopKCapture, decode_batch, pick_tokens, response_generator
from kdengine.evals.gsm8k import extract_answer
from kdengine.generate import GenerateConfig, GenerateError, generate, read_responses
from kdengine.store import open_store, verify_store
from kdengine.store.codec import make_codec
from kdengine.teachers import load_teacher

ROOT = Path(__file__).resolve().parents[1]
K = 8
QUESTIONS = [f"The farmer has {i} apples and buys {2 * i + 1} more. How many apples" for i in range(6)]


def _gsm8k(path, questions=QUESTIONS, answers=None):
    answers = answers or [str(3 * i + 1) for i in range(len(questions))]
    path.write_text("".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) + "\n"
                            for q, a in zip(questions, answers)))
    return path


def _cfg(model, data, out, **kw):
    base = dict(teacher=str(model), data=str(data), out=str(out), top_k=K, max_new_tokens=10, batch_size=3,
                shard_prompts=2, progress=False)
    return GenerateConfig(**{**base, **kw})


def _samples(out):
    store = open_store(out)
    return [store[i] for i in range(len(store))]


def _same_store(a, b):
    sa, sb = _samples(a), _samples(b)
    assert [s["id"] for s in sa] == [s["id"] for s in sb]
    for x, y in zip(sa, sb):
        for key in ("input_ids", "positions", "topk_idx", "topk_logp"):
            assert torch.equal(x[key], y[key]), key
    assert read_responses(a) == read_responses(b)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model decoded step by step: more threads only contend on a busy machine
    yield load_teacher(tiny_model_dir, backend="hf")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def greedy(tiny_model_dir, tmp_path_factory, teacher):
    tmp = tmp_path_factory.mktemp("generate_greedy")
    cfg = _cfg(tiny_model_dir, _gsm8k(tmp / "q.jsonl"), tmp / "store")
    return cfg, generate(cfg, teacher=teacher)


def test_greedy_responses_equal_transformers_generate(greedy, teacher):
    cfg, summary = greedy
    assert summary.store_complete and summary.responses == len(QUESTIONS) == summary.stored
    model, tok = teacher.model, teacher.tokenizer
    responses = read_responses(cfg.out)
    for sample, record in zip(_samples(cfg.out), responses):
        assert sample["id"] == record["id"]
        p = sample["positions"][0].item() + 1  # the prompt's length
        prompt, response = sample["input_ids"][:p], sample["input_ids"][p:].tolist()
        with torch.no_grad():
            out = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, p, dtype=torch.long),
                                 do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=teacher._eos_ids,
                                 pad_token_id=tok.pad_token_id)
        expected = out[0, p:].tolist()
        if record["finish"] == "stop":  # our response ends before the token that completed "Question:"
            assert expected[:len(response)] == response and "Question:" in tok.decode(expected)
            assert "Question:" in tok.decode(expected[:record["new_tokens"]])
        else:
            assert response == expected and record["new_tokens"] == len(response), record["id"]
            assert record["finish"] == ("eos" if expected[-1] in teacher._eos_ids else "length")


def test_batched_left_padded_decoding_equals_generate_on_the_same_batch(teacher):
    tok = teacher.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("the farmer has 12 apples", "how many", "Question: 3 + 4 = 7. 5 * 2")]
    got = decode_batch(teacher, prompts, [None] * 3, sampling=Sampling(), max_new_tokens=12)
    width = max(map(len, prompts))
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = teacher.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                     eos_token_id=teacher._eos_ids, pad_token_id=tok.pad_token_id)
    for row, d in enumerate(got):
        assert d.tokens == out[row, width:width + len(d.tokens)].tolist()


def test_a_stop_string_ends_the_response_before_it(teacher):
    tok = teacher.tokenizer
    prompt = tok("the farmer has 12 apples")["input_ids"]
    (full,) = decode_batch(teacher, [prompt], [None], sampling=Sampling(), max_new_tokens=16)
    text = tok.decode(full.tokens, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    (cut,) = decode_batch(teacher, [prompt], [None], sampling=Sampling(), max_new_tokens=16, stop=[stop],
                          capture=TopKCapture(K))
    assert cut.finish == "stop" and cut.text == text[:text.find(stop)]
    assert cut.tokens == full.tokens[:len(cut.tokens)] and stop not in tok.decode(cut.tokens)
    assert cut.targets[0].shape == (len(cut.tokens), K)


def test_stored_topk_equals_a_teacher_forced_recompute(greedy, teacher):
    cfg, _ = greedy
    store = open_store(cfg.out)
    codec = make_codec(store.codec, k=K, vocab_size=teacher.vocab_size, **store.codec_params)
    checked = total = 0
    for s in _samples(cfg.out):
        ids, positions = s["input_ids"], s["positions"]
        assert positions.tolist() == list(range(positions[0].item(), len(ids) - 1))  # every response token
        logits = teacher.logits(ids[None], torch.tensor([len(ids)]))[0]
        ref_val, ref_idx = torch.log_softmax(logits.float(), -1)[positions].topk(K + 1, dim=-1)
        for row in range(len(positions)):
            total += 1
            if ref_val[row, K - 1] - ref_val[row, K] < 1e-4:  # a near-tie at the K-th place
                continue
            checked += 1
            got_ids = s["topk_idx"][row].tolist()
            assert sorted(got_ids) == sorted(ref_idx[row, :K].tolist())
            true = dict(zip(ref_idx[row, :K].tolist(), ref_val[row, :K].double().tolist()))
            err = (torch.tensor([true[t] for t in got_ids]).exp().sqrt() - s["topk_logp"][row].double().exp().sqrt())
            assert err.abs().max() <= codec.sqrt_prob_error_bound
    assert total == sum(r["new_tokens"] for r in read_responses(cfg.out) if r["finish"] != "stop") + sum(
        len(s["positions"]) for s, r in zip(_samples(cfg.out), read_responses(cfg.out)) if r["finish"] == "stop")
    assert checked >= 0.95 * total
    assert verify_store(cfg.out).ok


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(greedy, tiny_model_dir, tmp_path, teacher):
    greedy_cfg, _ = greedy
    runs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = _cfg(tiny_model_dir, greedy_cfg.data, tmp_path / name, temperature=1.0, top_p=0.9,
                   samples_per_prompt=2, seed=seed)
        generate(cfg, teacher=teacher)
        runs.append([r["response"] for r in read_responses(cfg.out)])
    _same_store(tmp_path / "a", tmp_path / "b")
    greedy_texts = [r["response"] for r in read_responses(greedy_cfg.out)]
    assert runs[0] != runs[2]
    assert runs[0][0::2] != greedy_texts and runs[0][0::2] != runs[0][1::2]


def test_sampling_uses_one_generator_per_response():
    logits = torch.randn(3, 50)
    sampling = Sampling(temperature=0.8, top_p=0.5)
    g = [response_generator(0, "p", j) for j in range(3)]
    alone = [pick_tokens(logits[j:j + 1], sampling, [response_generator(0, "p", j)], [True]).item() for j in range(3)]
    assert pick_tokens(logits, sampling, g, [True] * 3).tolist() == alone  # batch-mates change nothing
    sorted_p, order = torch.softmax(logits / 0.8, -1).sort(descending=True)
    for row in range(3):  # top-p: only the head whose mass first reaches 0.5 is ever drawn
        head = int((sorted_p[row].cumsum(0) < 0.5).sum()) + 1
        draws = {pick_tokens(logits[row:row + 1], sampling, [response_generator(s, "p", 0)], [True]).item()
                 for s in range(40)}
        assert draws <= set(order[row, :head].tolist())


def test_two_ranks_equal_one(greedy, tiny_model_dir, tmp_path, teacher):
    for rank in (0, 1):
        generate(_cfg(tiny_model_dir, greedy[0].data, tmp_path / "two", rank=rank, world_size=2), teacher=teacher)
    shards = {s["file"]: s["rank"] for s in json.loads((tmp_path / "two" / "manifest.json").read_text())["shards"]}
    assert shards == {"shard-000000.safetensors": 0, "shard-000001.safetensors": 1, "shard-000002.safetensors": 0}
    _same_store(greedy[0].out, tmp_path / "two")


def test_rerun_writes_nothing_and_other_settings_are_refused(greedy, tiny_model_dir, teacher):
    cfg, _ = greedy
    again = generate(cfg, teacher=teacher)
    assert again.shards_written == 0 and again.shards_already_done == 3 and again.store_complete
    manifest = json.loads((Path(cfg.out) / "manifest.json").read_text())
    assert manifest["dump"]["mode"] == "generate" and manifest["dump"]["temperature"] == 0.0
    with pytest.raises(Exception, match=r"max_new_tokens=10, this run has max_new_tokens=11.*another --out"):
        generate(_cfg(tiny_model_dir, cfg.data, cfg.out, max_new_tokens=11), teacher=teacher)


def test_keep_correct_stores_exactly_the_right_answers(tiny_model_dir, tmp_path, teacher):
    sampled = dict(temperature=1.5, samples_per_prompt=3, seed=3)  # random text: numbers in many responses
    first_cfg = _cfg(tiny_model_dir, _gsm8k(tmp_path / "q0.jsonl"), tmp_path / "all", **sampled)
    generate(first_cfg, teacher=teacher)
    first = read_responses(first_cfg.out)
    answered = [i for i, r in enumerate(first) if r["rule"] != "none" and r["sample"] == 0]
    assert len(answered) >= 2, "the tiny teacher wrote too few numbers for this test"
    # give some prompts their first response's own prediction as the reference: it becomes correct
    answers = [str(first[3 * p]["prediction"]) if 3 * p in answered[::2] else "-7" for p in range(len(QUESTIONS))]
    cfg = _cfg(tiny_model_dir, _gsm8k(tmp_path / "q.jsonl", answers=answers), tmp_path / "kept",
               keep_correct="gsm8k", **sampled)
    summary = generate(cfg, teacher=teacher)
    records = read_responses(cfg.out)
    assert [r["response"] for r in records] == [r["response"] for r in first]  # the reference is not in the prompt
    right = []
    for i, r in enumerate(records):
        prediction, rule = extract_answer(r["response"])
        assert (r["prediction"], r["rule"]) == (prediction, rule)
        correct = rule != "none" and str(prediction) == answers[i // 3]
        assert r["correct"] == r["stored"] == correct
        right += [r["id"]] if correct else []
    assert set(answered[::2]) <= {i for i, r in enumerate(records) if r["correct"]}
    assert [s["id"] for s in _samples(cfg.out)] == right
    assert summary.stored == len(right) and summary.acceptance == pytest.approx(len(right) / len(records))
    assert verify_store(cfg.out).ok


@pytest.mark.parametrize("alpha", ["1", "0"])
def test_train_reads_a_generated_store_unchanged(greedy, tiny_model_dir, tmp_path, alpha):
    from kdengine.train import main as train_main

    train_main(["--student", str(tiny_model_dir), "--store", greedy[0].out, "--out", str(tmp_path / "run"),
                "--steps", "2", "--batch-tokens", "256", "--alpha", alpha, "--eval-every", "0", "--save-every", "0",
                "--log-every", "1", "--workers", "0", "--eval-fraction", "0.2"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["targets"] > 0 and np.isfinite(m["loss"]) for m in metrics)


def test_choices_give_the_normalised_distribution_and_store_the_label(tiny_model_dir, tmp_path, teacher):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"Review {i}: the apples were"}) + "\n"
                            for i in range(3)))
    choices = ["good", "bad", "more than twice"]
    result = CliRunner().invoke(cli, ["generate", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "s"), "--top-k", str(K), "--choices", ",".join(choices)])
    assert result.exit_code == 0, result.output
    tok = teacher.tokenizer
    for record, sample in zip(read_responses(tmp_path / "s"), _samples(tmp_path / "s")):
        assert list(record["choices"]) == choices and sum(record["choices"].values()) == pytest.approx(1)
        prompt = tok(record["prompt"])["input_ids"]
        scores = []
        for choice in choices:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + cont])
            logp = torch.log_softmax(teacher.model(ids).logits[0].float(), -1)
            scores.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont)))
        want = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        assert list(record["choices"].values()) == pytest.approx(want, abs=1e-5)
        assert record["label"] == record["response"] == choices[int(np.argmax(want))]
        label = tok(" " + record["label"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert sample["input_ids"].tolist() == prompt + label
        assert sample["positions"].tolist() == list(range(len(prompt) - 1, len(prompt) + len(label) - 1))


def _cli(*args):
    return CliRunner().invoke(cli, ["generate", *map(str, args)])


@pytest.mark.parametrize("line, message", [
    ({"text": "no prompt here"}, r":2: no prompt field: give exactly one of \"prompt\", \"question\""),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     r":2: \"messages\" ends with a assistant turn; .* must be the user's: drop the trailing turns"),
])
def test_bad_lines_are_refused_with_file_line_and_fix(tiny_model_dir, tmp_path, line, message):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(line) + "\n")
    result = _cli("--teacher", tiny_model_dir, "--data", data, "--out", tmp_path / "s", "--top-k", K)
    assert result.exit_code == 1
    (err,) = result.output.strip().splitlines()
    assert err.startswith(f"Error: {data}:2: ") and __import__("re").search(message, err), err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "100000"], "--top-k 100000 is larger than the teacher's vocabulary (384); use --top-k 384 or less"),
    (["--top-k", str(K), "--samples-per-prompt", "0"], "--samples-per-prompt must be at least 1"),
])
def test_bad_settings_are_refused_before_anything_is_written(tiny_model_dir, tmp_path, flags, message):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "fine"}) + "\n")
    result = _cli("--teacher", tiny_model_dir, "--data", data, "--out", tmp_path / "s", *flags)
    (err,) = [line for line in result.output.splitlines() if "Error" in line]  # beside the weights' loading bar
    assert result.exit_code == 1 and err.startswith("Error: ") and message in err and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_keep_correct_needs_references(tiny_model_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "How many?", "answer": "4 #### 4"}) + "\n"
                    + json.dumps({"question": "How many more?"}) + "\n")
    with pytest.raises(GenerateError, match=r"p.jsonl:2: --keep-correct gsm8k needs GSM8K lines"):
        generate(_cfg(tiny_model_dir, data, tmp_path / "s", keep_correct="gsm8k"))


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, teacher):
    data = _gsm8k(tmp_path / "q.jsonl", [f"{q} now {i}" for i in range(2) for q in QUESTIONS[:5]])
    base = ["generate", "--teacher", str(tiny_model_dir), "--data", str(data), "--top-k", str(K),
            "--max-new-tokens", "16", "--batch-size", "2", "--shard-prompts", "2", "--samples-per-prompt", "2",
            "--temperature", "0.9", "--seed", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdengine", *base, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "shard-000001.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run wrote no second shard in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    resumed = subprocess.run([sys.executable, "-m", "kdengine", *base, "--out", str(out)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout and "(0 already done)" not in resumed.stdout
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "whole")])
    assert result.exit_code == 0, result.output
    _same_store(out, tmp_path / "whole")
    assert verify_store(out).ok and len(read_responses(out)) == 20


# --- the exl2 backend's decoding: its CPU side and its refusal here -----------------------------

def test_exl2_left_padded_batch_matches_exllamav2s_encoding_conventions():
    from kdengine.teachers.exl2 import left_padded_batch

    ids, offsets, mask = left_padded_batch([[5, 6, 7], [9], [0, 0]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9], [0, 0, 0]]
    assert offsets.dtype == torch.int32 and offsets.tolist() == [0, -2, -1]  # tokenizer.encode(return_offsets=True)
    assert mask.dtype == torch.float16 and torch.isinf(mask).tolist() == [[False] * 3, [True, True, False],
                                                                          [True, False, False]]
    assert (mask[~torch.isinf(mask)] == 0).all()  # a real token equal to the pad id (row 3) is not masked
    with pytest.raises(ValueError, match="at least one token"):
        left_padded_batch([[1], []], pad_id=0)


def test_exl2_left_padding_is_what_the_hf_path_computes(teacher):
    """The exl2 decoding's inputs (ids, -inf mask, offsets = minus the padding) carry what the HF
    decoding uses for the same batch: the same ids, the same attention mask, the same positions."""
    from kdengine.teachers.exl2 import left_padded_batch
    from kdengine.teachers.hf import HFDecoding

    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    ids, offsets, mask = left_padded_batch(prompts, teacher.tokenizer.pad_token_id)
    decoding = HFDecoding(teacher, prompts)
    assert torch.equal(decoding._mask.bool(), ~torch.isinf(mask))
    positions = torch.arange(ids.shape[1])[None] + offsets[:, None].long()
    assert torch.equal(decoding._next[:, 0], positions[:, -1] + 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_generate_with_exl2_backend_fails_with_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    from kdengine.teachers.exl2 import UNAVAILABLE

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "the farmer has 12 apples"}) + "\n")
    result = _cli("--teacher", tiny_model_dir, "--backend", "exl2", "--data", data, "--out", tmp_path / "s",
                  "--top-k", K)
    assert result.exit_code == 1 and UNAVAILABLE in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
