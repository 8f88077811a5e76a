"""The exact tempered tail: `--temperatures` stores c_T = logsumexp_V(logp / T) per position (dump and
generate), the trainer uses it at a stored T, and refuses `--tail` at another T != 1 unless told to
approximate."""
import json

import pytest
import torch
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.generate import GenerateConfig, generate
from kdengine.losses.reference import sparse_kl_reference
from kdengine.store import StoreError, open_store, verify_store
from kdengine.store.format import TEMPERED_LSE
from kdengine.teachers import load_teacher, topk_logprobs
from kdengine.train import TrainError, main
from kdengine.train.sources import OnlineSource, StoreSource
from conftest import read_records, train_args

TEMPS = (2.0, 0.5)


def _corpus(path, n=24):
    path.write_text("".join(json.dumps({"text": f"Sample {i}: the farmer sold {3 * i + 1} apples on day {i}."}) + "\n"
                            for i in range(n)))
    return path


def _dump(model, data, out, *extra):
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(model), "--data", str(data), "--out", str(out),
                                      "--top-k", "8", "--shard-samples", "8", *map(str, extra)])
    return result


@pytest.fixture(scope="module")
def tempered_store(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tempered")
    result = _dump(tiny_model_dir, _corpus(root / "corpus.jsonl"), root / "store", "--codec", "raw",
                   "--temperatures", ",".join(map(str, TEMPS)))
    assert result.exit_code == 0, result.output
    return root / "store"


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_teacher(tiny_model_dir, backend="hf")


def _full_logp(teacher, ids):
    logits = teacher.logits(ids[None], torch.tensor([len(ids)]))[0]
    return torch.log_softmax(logits.double(), -1)


def test_topk_logprobs_gives_c_t_of_the_full_vocabulary_in_any_input_dtype():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 300) * 4
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        top = topk_logprobs(logits.to(dtype), 8, temperatures=TEMPS, rows_per_chunk=4)
        assert top.tempered_lse.shape == (3, 5, 2) and top.tempered_lse.dtype == torch.float32
        logp = torch.log_softmax(logits.to(dtype).double(), -1)
        for j, t in enumerate(TEMPS):
            torch.testing.assert_close(top.tempered_lse[..., j].double(), (logp / t).logsumexp(-1), atol=2e-5, rtol=0)
    assert topk_logprobs(logits, 8).tempered_lse is None


def test_the_dump_stores_c_t_and_the_tempered_tail_is_that_of_the_full_teacher(tempered_store, teacher):
    store = open_store(tempered_store)
    spec = store.sections[TEMPERED_LSE]
    assert spec == {"dtype": "float32", "width": 2, "required": False, "params": {"temperatures": list(TEMPS)}}
    assert verify_store(tempered_store).ok
    for i in range(0, len(store), 5):
        s = store[i]
        logp_full = _full_logp(teacher, s["input_ids"])[s["positions"]]
        for j, t in enumerate(TEMPS):
            c_t = s[TEMPERED_LSE][:, j].double()
            torch.testing.assert_close(c_t, (logp_full / t).logsumexp(-1), atol=1e-5, rtol=0)
            # the tempered teacher rebuilt from the stored top-k and c_T, against the full tempered teacher
            p_t_top = (s["topk_logp"].double() / t - c_t[:, None]).exp()
            full_t = torch.softmax(logp_full / t, -1)
            in_top = torch.zeros_like(full_t, dtype=torch.bool).scatter_(1, s["topk_idx"].long(), True)
            torch.testing.assert_close(p_t_top, full_t.gather(1, s["topk_idx"].long()), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(1 - p_t_top.sum(1), (full_t * ~in_top).sum(1), atol=1e-6, rtol=1e-5)


def test_the_exact_tail_changes_the_loss_where_the_one_token_tail_understates_it(tempered_store):
    s = open_store(tempered_store)[0]
    torch.manual_seed(0)
    logits = torch.randn(len(s["positions"]), open_store(tempered_store).vocab_size)
    kw = dict(tail=True, temperature=2.0, reduction="none")
    exact = sparse_kl_reference(logits, s["topk_idx"], s["topk_logp"], **kw, tempered_lse=s[TEMPERED_LSE][:, 0])
    approx = sparse_kl_reference(logits, s["topk_idx"], s["topk_logp"], **kw)
    assert not torch.allclose(exact, approx, rtol=1e-3)


def test_a_resumed_dump_with_other_temperatures_is_refused(tempered_store, tiny_model_dir):
    result = _dump(tiny_model_dir, tempered_store.parent / "corpus.jsonl", tempered_store, "--codec", "raw",
                   "--temperatures", "2")
    assert result.exit_code != 0
    assert "was dumped with sections=" in result.output and "use another --out directory" in result.output


@pytest.mark.parametrize("value, message", [
    ("2,x", "expected comma-separated numbers such as 2 or 1.5,2, got '2,x'"),
    ("2,0", "--temperatures must be distinct finite numbers > 0, got 2.0,0.0"),
    ("2,2", "--temperatures must be distinct finite numbers > 0, got 2.0,2.0"),
])
def test_bad_temperatures_are_refused(tiny_model_dir, tmp_path, value, message):
    result = _dump(tiny_model_dir, _corpus(tmp_path / "c.jsonl", 2), tmp_path / "s", "--temperatures", value)
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "s").exists()


def test_a_damaged_section_spec_is_refused(tempered_store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(tempered_store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sections"][TEMPERED_LSE]["params"]["temperatures"] = [2.0]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="params.temperatures a list of width distinct finite temperatures"):
        open_store(copy)


def test_training_at_a_stored_temperature_passes_its_c_t(tempered_store):
    source = StoreSource(str(tempered_store), tail=True, temperature=0.5, loss_impl="kernel")
    batch = source.batches(lambda key: [0, 1, 2], pad_id=0)[0]
    targets = source.targets(batch)
    torch.testing.assert_close(targets.tempered_lse, batch[TEMPERED_LSE][:, 1])
    assert targets.tempered_lse.shape == (batch["targets"],)
    assert StoreSource(str(tempered_store), tail=True, temperature=1.0, loss_impl="kernel").targets(batch).tempered_lse \
        is None


def test_the_trainer_refuses_an_unstored_temperature_with_the_tail_unless_told_to_approximate(
        tempered_store, store_dir, student_dir, tmp_path):
    with pytest.raises(TrainError, match=r"holds no c_T for --temperature 3 \(it holds 2, 0.5\).*--temperatures 3"
                                         r".*--approx-tempered-tail"):
        main(train_args(student_dir, tempered_store, tmp_path / "a", "--steps", 2, "--tail", "--temperature", 3))
    with pytest.raises(TrainError, match=r"holds no c_T for --temperature 2 \(it holds none\)"):
        main(train_args(student_dir, store_dir, tmp_path / "b", "--steps", 2, "--tail", "--temperature", 2))
    main(train_args(student_dir, store_dir, tmp_path / "c", "--steps", 2, "--tail", "--temperature", 2,
                    "--approx-tempered-tail"))
    main(train_args(student_dir, tempered_store, tmp_path / "d", "--steps", 2, "--tail", "--temperature", 2))
    assert [r["step"] for r in read_records(tmp_path / "d")] == [1, 2]
    main(train_args(student_dir, store_dir, tmp_path / "e", "--steps", 2, "--temperature", 2))  # no tail: no c_T


def test_the_online_teacher_gives_c_t_of_its_own_logits(tiny_model_dir, tmp_path):
    source = OnlineSource(teacher=str(tiny_model_dir), data=str(_corpus(tmp_path / "c.jsonl", 4)),
                          device=torch.device("cpu"), dtype=None, chat=False, max_length=None, top_k=8, tail=True,
                          temperature=2.0, progress=False)
    batch = source.batches(lambda key: [0, 1], pad_id=0)[0]
    targets = source.targets(batch)
    logits, _ = source.teacher_outputs(batch)
    torch.testing.assert_close(targets.tempered_lse.double(),
                               (torch.log_softmax(logits.double(), -1) / 2).logsumexp(-1), atol=1e-5, rtol=0)


def test_generate_stores_c_t_at_every_generated_position(tiny_model_dir, tmp_path, teacher):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}:"}) + "\n" for i in range(3)))
    cfg = GenerateConfig(teacher=str(tiny_model_dir), data=str(data), out=str(tmp_path / "g"), top_k=8,
                         max_new_tokens=6, batch_size=3, temperatures=(2.0,), codec="raw", progress=False)
    generate(cfg, teacher=teacher)
    store = open_store(cfg.out)
    assert store.sections[TEMPERED_LSE]["params"]["temperatures"] == [2.0]
    for i in range(len(store)):
        s = store[i]
        want = (_full_logp(teacher, s["input_ids"])[s["positions"]] / 2).logsumexp(-1)
        torch.testing.assert_close(s[TEMPERED_LSE][:, 0].double(), want, atol=1e-4, rtol=0)
