"""`kdengine generate --targets sample` on the tiny real model: the stored draws at every generated
position are the teacher's own (replayed from a teacher-forced recompute with the response's
generator), the responses are those of a top-k run, reruns and rank splits are identical, `--choices`
draws too, `train` reads the store, and the bad combinations are refused in one line."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.decode import SampleCapture
from kdengine.generate import generate, read_responses
from kdengine.sampling import draw_targets, sample_seed
from kdengine.store import open_store, verify_store
from kdengine.store.sampled_codec import LOGP_STEP
from test_generate import _cfg, _gsm8k, _samples, teacher  # noqa: F401  (teacher: the module's fixture)

M, TAU, SEED = 6, 1.5, 3
DECODING = dict(temperature=1.0, top_p=0.9, samples_per_prompt=2, seed=SEED)  # sampled decoding: both generators
SAMPLED = dict(targets="sample", samples=M, proposal_temperature=TAU, top_k=1)
DRAWS = ("sample_idx", "sample_count", "sample_logp", "sample_log_norm")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, teacher):  # noqa: F811
    tmp = tmp_path_factory.mktemp("generate_sampled")
    data = _gsm8k(tmp / "q.jsonl")
    topk = _cfg(tiny_model_dir, data, tmp / "topk", **DECODING)
    sampled = _cfg(tiny_model_dir, data, tmp / "sampled", **DECODING, **SAMPLED)
    return topk, generate(topk, teacher=teacher), sampled, generate(sampled, teacher=teacher)


def _same_draws(a, b):
    sa, sb = _samples(a), _samples(b)
    assert [s["id"] for s in sa] == [s["id"] for s in sb]
    for x, y in zip(sa, sb):
        for key in ("input_ids", "positions", *DRAWS):
            assert torch.equal(x[key], y[key]), key
    assert read_responses(a) == read_responses(b)


def test_the_store_is_a_sampled_target_store(runs):
    _, _, cfg, summary = runs
    store = open_store(cfg.out)
    assert summary.store_complete and summary.stored == len(store) == 12
    assert store.targets == "sample" and store.k == M and store.codec == "sampled"
    assert store.codec_params == {"samples": M, "proposal_temperature": TAU, "seed": SEED, "zstd_level": 3}
    assert verify_store(cfg.out).ok
    info = json.loads(CliRunner().invoke(cli, ["inspect", cfg.out, "--json"]).output)
    assert info["targets"] == "sample" and info["draws_per_position"] == M


def test_stored_draws_are_the_teachers_at_every_generated_position(runs, teacher):  # noqa: F811
    _, _, cfg, _ = runs
    checked = 0
    for s in _samples(cfg.out):
        ids, positions = s["input_ids"], s["positions"]
        assert positions.tolist() == list(range(positions[0].item(), len(ids) - 1))  # every response token
        with torch.inference_mode():
            logits = teacher.logits(ids[None], torch.tensor([len(ids)]))[0, positions]
        logp_all = torch.log_softmax(logits.float(), -1)
        idx, count, logp = s["sample_idx"].long(), s["sample_count"], s["sample_logp"]
        drawn = count > 0
        assert (count.sum(1) == M).all() and drawn[:, 0].all()
        for row in range(len(positions)):
            row_ids = idx[row][drawn[row]]
            assert len(set(row_ids.tolist())) == len(row_ids) and 0 <= row_ids.min() and row_ids.max() < teacher.vocab_size
        assert (logp - logp_all.gather(1, idx))[drawn].abs().max() <= LOGP_STEP / 2 + 1e-4
        torch.testing.assert_close(s["sample_log_norm"], torch.logsumexp(logp_all / TAU, -1), atol=1e-4, rtol=0)
        # replay: the response's own generator, one draw_targets per generated position
        generator = torch.Generator().manual_seed(sample_seed(SEED, s["index"]))
        for row in range(len(positions)):
            want = draw_targets(logits[row:row + 1], M, proposal_temperature=TAU, generator=generator)
            k = want.ids.shape[1]
            assert idx[row, :k].tolist() == want.ids[0].tolist() and count[row, :k].tolist() == want.counts[0].tolist()
            assert not drawn[row, k:].any()
            checked += 1
    assert checked == sum(len(s["positions"]) for s in _samples(cfg.out)) > 50


def test_responses_are_those_of_a_topk_run(runs):
    topk, _, sampled, _ = runs
    assert read_responses(topk.out) == read_responses(sampled.out)
    a, b = _samples(topk.out), _samples(sampled.out)
    assert [s["id"] for s in a] == [s["id"] for s in b]
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["positions"], y["positions"])


def test_rerun_and_two_ranks_give_identical_draws(runs, tiny_model_dir, tmp_path, teacher):  # noqa: F811
    _, _, cfg, _ = runs
    again = generate(cfg, teacher=teacher)
    assert again.shards_written == 0 and again.store_complete
    for rank in (1, 0):
        generate(_cfg(tiny_model_dir, cfg.data, tmp_path / "two", rank=rank, world_size=2, **DECODING, **SAMPLED),
                 teacher=teacher)
    _same_draws(cfg.out, tmp_path / "two")
    generate(_cfg(tiny_model_dir, cfg.data, tmp_path / "seed4", **{**DECODING, "seed": 4}, **SAMPLED), teacher=teacher)
    other = {s["id"]: s for s in _samples(tmp_path / "seed4")}
    assert any(s["id"] in other and not torch.equal(s["sample_idx"], other[s["id"]]["sample_idx"])
               for s in _samples(cfg.out))
    with pytest.raises(Exception, match=r"codec_params.*another --out"):
        generate(_cfg(tiny_model_dir, cfg.data, cfg.out, **DECODING, **{**SAMPLED, "samples": M + 1}), teacher=teacher)


def test_a_rows_draws_do_not_depend_on_its_batch_mates():
    logits = torch.randn(3, 50)
    seeds = [sample_seed(SEED, i) for i in range(3)]
    batched = SampleCapture(M, TAU, seeds)
    alone = [SampleCapture(M, TAU, [s]) for s in seeds]
    for _ in range(2):  # two steps: each generator goes on from where it was
        together = batched.take(logits, [True, True, True])
        for row, capture in enumerate(alone):
            single = capture.take(logits[row:row + 1], [True])
            for a, b in zip(together, single):
                assert np.array_equal(a[row], b[0])
    ids, counts, logp, log_norm = batched.take(logits, [True, False, True])
    assert (counts.sum(1) == [M, 0, M]).all() and ids.shape == (3, M)  # a finished row draws nothing


def test_choices_store_the_labels_draws(tiny_model_dir, tmp_path, teacher):  # noqa: F811
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"Review {i}: the apples were"}) + "\n"
                            for i in range(3)))
    result = CliRunner().invoke(cli, ["generate", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "s"), "--choices", "good,bad", "--targets", "sample",
                                      "--samples", str(M), "--seed", str(SEED)])
    assert result.exit_code == 0, result.output
    for record, s in zip(read_responses(tmp_path / "s"), _samples(tmp_path / "s")):
        assert record["label"] in ("good", "bad") and record["id"] == s["id"]
        ids = s["input_ids"]
        with torch.inference_mode():
            logits = teacher.logits(ids[None], torch.tensor([len(ids)]))[0, s["positions"]]
        want = draw_targets(logits, M, generator=torch.Generator().manual_seed(sample_seed(SEED, s["index"])))
        k = want.ids.shape[1]
        assert torch.equal(s["sample_idx"][:, :k], want.ids) and torch.equal(s["sample_count"][:, :k], want.counts)


def test_train_reads_a_generated_sampled_store(runs, tiny_model_dir, tmp_path):
    from kdengine.train import main as train_main

    train_main(["--student", str(tiny_model_dir), "--store", runs[2].out, "--out", str(tmp_path / "run"),
                "--steps", "2", "--batch-tokens", "256", "--eval-every", "0", "--save-every", "0", "--log-every", "1",
                "--workers", "0", "--eval-fraction", "0.2"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["targets"] > 0 and np.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("flags, code, message", [
    (["--targets", "sample", "--top-k", "8"], 2, "--top-k does not apply with --targets sample (use --samples)"),
    (["--targets", "sample", "--temperatures", "2"], 1, "--temperatures is for top-k targets"),
    ([], 2, "--targets topk needs --top-k K"),
    (["--targets", "sample", "--samples", "0"], 2, "Invalid value for '--samples'"),
])
def test_bad_combinations_are_refused_in_one_line(tiny_model_dir, tmp_path, flags, code, message):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "fine"}) + "\n")
    result = CliRunner().invoke(cli, ["generate", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "s"), *flags])
    (err,) = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == code and message in err and "Traceback" not in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_generate_with_an_exact_head_stores_the_head_then_the_replayable_draws(tiny_model_dir, tmp_path,
                                                                              teacher):  # noqa: F811
    cfg = _cfg(tiny_model_dir, _gsm8k(tmp_path / "q.jsonl"), tmp_path / "head", **DECODING,
               targets="sample", samples=M, exact_top=2, top_k=1)
    generate(cfg, teacher=teacher)
    assert open_store(cfg.out).codec_params["exact_top"] == 2 and verify_store(cfg.out).ok
    for s in _samples(cfg.out)[:3]:
        ids, positions = s["input_ids"], s["positions"]
        with torch.inference_mode():
            logits = teacher.logits(ids[None], torch.tensor([len(ids)]))[0, positions]
        generator = torch.Generator().manual_seed(sample_seed(SEED, s["index"]))
        for row in range(len(positions)):
            want = draw_targets(logits[row:row + 1], M, exact_top=2, generator=generator)
            k = want.ids.shape[1]
            assert s["sample_idx"][row, :k].tolist() == want.ids[0].tolist()
            assert s["sample_count"][row, :k].tolist() == want.counts[0].tolist()
            assert s["sample_count"][row, :2].tolist() == [1, 1] and int(s["sample_count"][row].sum()) == M + 2
