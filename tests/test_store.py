"""The store end to end with the tiny real teacher: dump -> shards -> reader, inspect, verify, damage, resume."""
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import rewrite_shard_metadata
from kdengine.cli import cli
from kdengine.corpus import load_corpus
from kdengine.dump import DumpConfig, DumpError, dump, resolve_rank
from kdengine.store import FORMAT_VERSION, StoreError, open_store, verify_store
from kdengine.store.codec import make_codec
from kdengine.store.format import positions_from_gaps, sample_crc32, unpack_array
from kdengine.store.inspect import SUMMARY_KEYS
from kdengine.teachers.encoding import special_prefix

K = 8
LINES = [
    {"text": "The farmer has 12 apples and buys 7 more."},
    {"prompt": "How many pencils does the student have?", "response": "She has 14 pencils.", "id": "pr-1"},
    {"question": "Each book costs 3 dollars. How much do 5 books cost?", "answer": "5 * 3 = 15 dollars. #### 15"},
    {"text": "Then the baker sells half of the 40 cars at the market every week."},
    {"messages": [{"role": "user", "content": "What is 6 + 7?"}, {"role": "assistant", "content": "6 + 7 = 13."}]},
    {"text": "They spend 9 hours a day at school, so how many minutes is that?"},
    {"prompt": "A store sells oranges.", "response": "Each orange costs 2 dollars, so ten cost 20."},
    {"text": "First he gives half of his 30 books to his teacher, then he buys 4 more."},
    {"text": "How much does it cost to buy twice as many apples as last year?"},
    {"text": "The total is 120 miles per week and 480 miles in four weeks."},
    {"text": "We take the 3 cars to the market."},
]


def _write_corpus(path, lines=LINES):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_model_dir):
    """A finished 4-shard store of LINES (3 samples a shard, batches of 2)."""
    root = tmp_path_factory.mktemp("dumped")
    data = _write_corpus(root / "data.jsonl")
    cfg = DumpConfig(teacher=str(tiny_model_dir), data=str(data), out=str(root / "store"), top_k=K,
                     batch_size=2, shard_samples=3, progress=False)
    summary = dump(cfg)
    return cfg, summary


def _copy_store(cfg, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(cfg.out, out)
    return out


def _tensor_range(path, name):
    """Byte range [start, end) of a tensor's data inside a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_round_trip_matches_the_teachers_topk(dumped, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, summary = dumped
    store = open_store(cfg.out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    corpus = load_corpus(cfg.data, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    codec = make_codec(store.codec, k=K, vocab_size=len(tokenizer), **store.codec_params)
    assert len(store) == len(corpus.samples) == summary.samples and store.complete
    checked = 0
    for i in range(len(store)):
        got, want = store[i], corpus.samples[i]
        assert got["index"] == i and got["id"] == want.id
        np.testing.assert_array_equal(got["input_ids"].numpy(), want.input_ids)
        np.testing.assert_array_equal(got["positions"].numpy(), want.positions)
        assert got["topk_idx"].dtype == torch.int32 and got["topk_logp"].dtype == torch.float32
        with torch.no_grad():
            ids = torch.from_numpy(want.input_ids[None].astype(np.int64))
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        ref_val, ref_idx = logp[got["positions"]].topk(K + 1, dim=-1)
        for row in range(len(want.positions)):
            if ref_val[row, K - 1] - ref_val[row, K] < 1e-4:  # a near-tie at the K-th place: ids may swap
                continue
            checked += 1
            ids, lps = got["topk_idx"][row].tolist(), got["topk_logp"][row].double()
            assert sorted(ids) == sorted(ref_idx[row, :K].tolist())
            true = dict(zip(ref_idx[row, :K].tolist(), ref_val[row, :K].double().tolist()))
            err = (torch.tensor([true[t] for t in ids]).exp().sqrt() - lps.exp().sqrt()).abs().max()
            assert err <= codec.sqrt_prob_error_bound
            assert torch.all(lps[1:] <= lps[:-1]) and lps.exp().sum() < 1
    assert checked >= 0.98 * store.num_positions


def test_prompt_response_targets_start_at_the_first_response_token(dumped, tiny_model_dir):
    from transformers import AutoTokenizer

    cfg, _ = dumped
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = next(s for s in (open_store(cfg.out)[i] for i in range(len(LINES))) if s["id"] == "pr-1")
    prompt_ids = special_prefix(tokenizer) + tokenizer("How many pencils does the student have?",
                                                       add_special_tokens=False)["input_ids"]
    ids, positions = sample["input_ids"].tolist(), sample["positions"].tolist()
    assert ids[:len(prompt_ids)] == prompt_ids
    assert positions[0] == len(prompt_ids) - 1  # predicts the first response token
    assert positions == list(range(len(prompt_ids) - 1, len(ids) - 1))  # ... through the EOS
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[positions[0] + 1:-1]).strip() == "She has 14 pencils."


def test_dataloader_workers_read_the_same_samples(dumped):
    cfg, _ = dumped
    store = open_store(cfg.out)
    store[0]  # handles opened in the parent must not leak into the workers
    loader = torch.utils.data.DataLoader(store, batch_size=None, num_workers=2)
    got = {s["index"]: s for s in loader}
    assert sorted(got) == list(range(len(store)))
    for i in range(len(store)):
        assert torch.equal(got[i]["topk_idx"], store[i]["topk_idx"])
        assert torch.equal(got[i]["topk_logp"], store[i]["topk_logp"])


def test_same_command_again_writes_nothing(dumped):
    cfg, _ = dumped
    before = {p.name: p.stat().st_mtime_ns for p in Path(cfg.out).glob("shard-*")}
    summary = dump(cfg)
    assert summary.shards_written == 0 and summary.shards_already_done == 4 and summary.store_complete
    after = {p.name: p.stat().st_mtime_ns for p in Path(cfg.out).glob("shard-*")}
    assert before == after


@pytest.mark.parametrize("change, key", [
    ({"top_k": 4}, "k=8"),
    ({"max_length": 12}, "max_length=None"),
    ({"codec": "raw"}, "codec='sqrt_ac'"),
    ({"shard_samples": 4}, "shard_samples=3"),
])
def test_a_different_dump_into_the_same_directory_is_refused(dumped, tmp_path, change, key):
    cfg, _ = dumped
    out = _copy_store(cfg, tmp_path)
    with pytest.raises(StoreError, match=rf"was dumped with {key}, this run has .* another --out directory"):
        dump(DumpConfig(**{**cfg.__dict__, "out": str(out), **change}))


def test_changed_data_or_teacher_is_refused_before_the_model_loads(dumped, tmp_path):
    cfg, _ = dumped
    out = _copy_store(cfg, tmp_path)
    data = _write_corpus(tmp_path / "data.jsonl", LINES[:-1])
    with pytest.raises(StoreError, match="was dumped with data="):
        dump(DumpConfig(**{**cfg.__dict__, "out": str(out), "data": str(data)}))
    shutil.copy(cfg.data, data)
    with pytest.raises(StoreError, match=r"was dumped with data=.*data\.jsonl"):  # same bytes, other file
        dump(DumpConfig(**{**cfg.__dict__, "out": str(out), "data": str(data)}))
    with pytest.raises(StoreError, match="was dumped with teacher_path="):
        dump(DumpConfig(**{**cfg.__dict__, "out": str(out), "teacher": str(tmp_path / "no-such-model")}))


def test_flipped_byte_in_a_frame(dumped, tmp_path):
    cfg, _ = dumped
    out = _copy_store(cfg, tmp_path)
    shard = out / "shard-000001.safetensors"
    start, end = _tensor_range(shard, "payload")
    _flip(shard, start + 3)  # inside the shard's first sample (corpus index 3)
    store = open_store(out)
    with pytest.raises(StoreError, match=r"shard-000001\.safetensors: sample 0 \(corpus index 3\) fails its crc32"):
        store[3]
    store[4]  # the shard's other samples still read
    report = verify_store(out, progress=False)
    assert report.bad_files == ["shard-000001.safetensors"]
    assert "sha256" in report.problems[0] and "corrupt" in report.problems[0]


def test_token_ids_changed_but_still_valid_are_caught_by_the_sample_crc(dumped, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from kdengine.store.format import pack_array, unpack_array

    cfg, _ = dumped
    out = _copy_store(cfg, tmp_path)
    shard = out / "shard-000000.safetensors"
    with safe_open(str(shard), framework="numpy") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    tokens = unpack_array(tensors["input_ids.zst"], "int32", int(tensors["token_offsets"][-1]), "test").copy()
    tokens[0] += 1  # a well-formed compressed array holding a wrong token id
    tensors["input_ids.zst"] = pack_array(tokens, "int32")
    save_file(tensors, str(shard), metadata=metadata)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard-000000\.safetensors: sample 0 .* crc32"):
        open_store(out)[0]


def test_truncated_deleted_and_outside_shards_are_refused_by_name(dumped, tmp_path):
    cfg, _ = dumped
    out = _copy_store(cfg, tmp_path)
    truncated = out / "shard-000002.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (out / "shard-000003.safetensors").unlink()
    store = open_store(out)
    with pytest.raises(StoreError, match=r"shard-000002\.safetensors: \d+ bytes, the manifest says \d+ \(truncated"):
        store[6]
    with pytest.raises(StoreError, match=r"shard-000003\.safetensors: missing"):
        store[9]
    report = verify_store(out, progress=False)
    assert report.bad_files == ["shard-000002.safetensors", "shard-000003.safetensors"]

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../outside.safetensors"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard entry 0: file '\.\./outside\.safetensors' is not a shard file name "
                                         r"inside the store directory"):
        open_store(out)


def test_unknown_format_version_is_refused(dumped, tmp_path):
    cfg, _ = dumped
    out = _copy_store(cfg, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"format version {FORMAT_VERSION + 1}, this kdengine reads versions 1, 2"):
        open_store(out)
    with pytest.raises(StoreError, match="missing; .* is not a store"):
        open_store(tmp_path)


def test_verify_cli_names_bad_shards_then_drop_bad_and_redump_repairs(dumped, tmp_path):
    cfg, _ = dumped
    out = _copy_store(cfg, tmp_path)
    shard = out / "shard-000001.safetensors"
    _flip(shard, _tensor_range(shard, "payload")[0] + 5)
    (out / "shard-000003.safetensors").unlink()
    runner = CliRunner()
    result = runner.invoke(cli, ["verify", str(out), "--quiet"])
    assert result.exit_code == 1 and not isinstance(result.exception, (ValueError, KeyError, AttributeError))
    assert "BAD shard-000001.safetensors: sha256" in result.output
    assert "BAD shard-000003.safetensors: missing" in result.output
    assert "--drop-bad" in result.output
    result = runner.invoke(cli, ["verify", str(out), "--quiet", "--drop-bad"])
    assert result.exit_code == 1 and "dropped 2 shard(s)" in result.output
    summary = dump(DumpConfig(**{**cfg.__dict__, "out": str(out)}))
    assert summary.shards_written == 2 and summary.store_complete
    result = runner.invoke(cli, ["verify", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "OK, 4 shards, 11 samples" in result.output


def test_inspect_json_keys_and_sample_view(dumped, tmp_path):
    cfg, summary = dumped
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", cfg.out, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert list(info) == list(SUMMARY_KEYS)
    assert info["samples"] == 11 and info["top_k"] == K and info["positions"] == summary.positions
    assert info["bytes_per_position"] == pytest.approx(summary.bytes_per_position, abs=1e-3)
    on_disk = sum(p.stat().st_size for p in Path(cfg.out).rglob("*") if p.is_file())
    assert info["bytes"] == on_disk and info["bytes_per_position"] == round(on_disk / info["positions"], 3)
    assert info["codec"]["name"] == "sqrt_ac" and info["targets"] == "topk"

    result = runner.invoke(cli, ["inspect", cfg.out, "--sample", "1"])
    assert result.exit_code == 0, result.output
    assert "sample id='pr-1' corpus index=1" in result.output and "t=18    next='S'" in result.output

    out = _copy_store(cfg, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["teacher"] = str(tmp_path / "moved-away")
    (out / "manifest.json").write_text(json.dumps(manifest))
    rewrite_shard_metadata(out, "shard-000000.safetensors", teacher=manifest["teacher"])
    result = runner.invoke(cli, ["inspect", str(out), "--sample", "1"])
    assert result.exit_code == 0
    assert "cannot be loaded; showing token ids" in result.output and "next=#" in result.output

    result = runner.invoke(cli, ["inspect", cfg.out, "--sample", "99"])
    assert result.exit_code == 1 and "sample 99 out of range: the store holds samples 0..10" in result.output


def test_bad_jsonl_fails_with_file_and_line_before_the_teacher_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\nnot json\n')
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tmp_path / "no-model"), "--data", str(bad),
                                      "--out", str(tmp_path / "out"), "--top-k", "4"])
    assert result.exit_code == 1
    assert f"{bad}:2: \"text\" must be a string, got a number (3)" in result.output
    assert "2 bad lines in all" in result.output and "Traceback" not in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = CliRunner().invoke(cli, ["dump", "--teacher", "x", "--data", str(empty), "--out", str(tmp_path / "o"),
                                      "--top-k", "4"])
    assert result.exit_code == 1 and f"{empty}: empty file" in result.output


def test_rank_comes_from_the_options_or_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank(None, None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank(None, None) == (3, 4)
    assert resolve_rank(1, 2) == (1, 2)
    with pytest.raises(DumpError, match="give both --rank and --world-size, or neither"):
        resolve_rank(1, None)
    with pytest.raises(DumpError, match="rank must be in \\[0, world size\\), got rank 2 of world size 2"):
        resolve_rank(2, 2)


def test_unknown_backend_is_refused_before_any_work(tmp_path):
    data = _write_corpus(tmp_path / "data.jsonl")
    result = CliRunner().invoke(cli, ["dump", "--teacher", "m", "--data", str(data), "--out", str(tmp_path / "o"),
                                      "--top-k", "4", "--backend", "nope"])
    assert result.exit_code == 2 and "'nope' is not one of 'hf', 'exl2'" in result.output
    assert not (tmp_path / "o").exists()


# ---- codecs in the store ------------------------------------------------------------------------------
def _rewrite_frame(shard, j, frame):
    """Puts `frame` (same length) in place of local sample j's frame and fixes its crc32, as a writer
    with a broken encoder would."""
    from safetensors import safe_open

    with safe_open(str(shard), framework="numpy") as f:
        offsets = f.get_tensor("frame_offsets")
        tokens, positions = f.get_tensor("token_offsets"), f.get_tensor("position_offsets")
        input_ids = unpack_array(f.get_tensor("input_ids.zst"), "int32", int(tokens[-1]), "test")[tokens[j]:tokens[j + 1]]
        gaps = unpack_array(f.get_tensor("position_gaps.zst"), "int32", int(positions[-1]), "test")
        targets = positions_from_gaps(gaps, positions)[positions[j]:positions[j + 1]]
    assert len(frame) == offsets[j + 1] - offsets[j]
    data = bytearray(shard.read_bytes())
    start = _tensor_range(shard, "payload")[0] + int(offsets[j])
    data[start:start + len(frame)] = frame
    crc_at = _tensor_range(shard, "sample_crc32")[0] + 4 * j
    data[crc_at:crc_at + 4] = struct.pack("<I", sample_crc32(input_ids, targets, frame))
    shard.write_bytes(bytes(data))


def test_damaged_sqrt_ac_payload_bytes_are_refused_by_the_store(dumped, tmp_path):
    cfg, _ = dumped
    assert open_store(cfg.out).codec == "sqrt_ac"
    out = _copy_store(cfg, tmp_path)
    shard = out / "shard-000000.safetensors"
    start, end = _tensor_range(shard, "payload")
    original = shard.read_bytes()
    for offset in range(start, end, max(1, (end - start) // 50)):  # spread over the shard's three frames
        _flip(shard, offset)
        store = open_store(out)
        with pytest.raises(StoreError, match=r"shard-000000\.safetensors: sample \d \(corpus index \d\) fails its "
                                             r"crc32"):
            for i in range(3):
                store[i]
        shard.write_bytes(original)

    frame = bytearray(original[start:start + int(open_store(out).shard(0).frame_offsets[1])])
    frame[12:] = bytes(len(frame) - 12)  # a crc-valid frame whose body does not decode
    _rewrite_frame(shard, 0, bytes(frame))
    with pytest.raises(StoreError, match=r"shard-000000\.safetensors: sample 0 \(corpus index 0\) does not decode: "):
        open_store(out)[0]
    assert open_store(out)[1]["index"] == 1


def test_sqrt_store_reads_the_same_values_and_a_missing_table_is_refused(dumped, tmp_path):
    cfg, _ = dumped
    old = DumpConfig(**{**cfg.__dict__, "out": str(tmp_path / "sqrt"), "codec": "sqrt"})
    summary = dump(old)
    assert verify_store(old.out, progress=False).ok
    new_store, old_store = open_store(cfg.out), open_store(old.out)
    assert old_store.codec == "sqrt" and new_store.manifest["payload_bytes"] < old_store.manifest["payload_bytes"]
    for i in range(len(new_store)):
        a, b = new_store[i], old_store[i]
        by_id_a = np.take_along_axis(a["topk_logp"].numpy(), np.argsort(a["topk_idx"].numpy(), 1), 1)
        by_id_b = np.take_along_axis(b["topk_logp"].numpy(), np.argsort(b["topk_idx"].numpy(), 1), 1)
        np.testing.assert_array_equal(np.sort(a["topk_idx"].numpy(), 1), np.sort(b["topk_idx"].numpy(), 1))
        np.testing.assert_allclose(by_id_a, by_id_b, rtol=1e-6, atol=1e-6)  # same quantization
    assert summary.samples == len(old_store)

    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    out = _copy_store(cfg, tmp_path)
    shard = out / "shard-000000.safetensors"
    with safe_open(str(shard), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(shard))
    del tensors["id_count_codes.zst"]
    save_file(tensors, str(shard), metadata=metadata)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard-000000\.safetensors: tensor 'id_count_codes\.zst' \(uint8\) is missing; "
                                         r"codec 'sqrt_ac' needs it"):
        open_store(out)[0]


def test_sqrt_ac_without_the_extension_fails_clearly_in_the_reader_and_before_the_dump(dumped, tmp_path, monkeypatch):
    import sys

    import kdengine

    cfg, _ = dumped
    monkeypatch.delattr(kdengine, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "kdengine._C", None)
    with pytest.raises(StoreError, match=r"shard-000000\.safetensors: cannot build codec .*needs the compiled "
                                         r"extension kdengine\._C"):
        open_store(cfg.out)[0]
    with pytest.raises(DumpError, match="needs the compiled extension kdengine._C.*or dump with --codec sqrt"):
        dump(DumpConfig(**{**cfg.__dict__, "out": str(tmp_path / "o"), "teacher": str(tmp_path / "no-model")}))
