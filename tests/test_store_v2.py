"""Format v2: version 1 stores still read; the true size; adaptive K (--top-p); sections; target modes."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from kdengine.cli import cli
from kdengine.losses import sparse_kl
from kdengine.losses.reference import sparse_kl_reference
from kdengine.store import StoreError, open_store, verify_store
from kdengine.store import format as store_format
from kdengine.store.format import disk_bytes
from kdengine.store.inspect import SPLIT_KEYS, store_summary
from kdengine.store.writer import ShardBuilder, StoreHeader, StoreWriter, top_p_counts
from kdengine.train.data import collate

FIXTURES = Path(__file__).parent / "fixtures" / "store_v1"
V, K = 300, 16


def _expected():
    with safe_open(str(FIXTURES / "expected.safetensors"), framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("codec", ["sqrt_ac", "sqrt", "raw"])
def test_version_1_stores_read_verify_and_decode_the_same_values(codec, tmp_path):
    shutil.copytree(FIXTURES / codec, tmp_path / codec)
    store = open_store(tmp_path / codec)
    assert store.version == 1 and store.targets == "topk" and store.top_p is None
    want = _expected()
    for i in range(len(store)):
        s = store[i]
        np.testing.assert_array_equal(s["topk_idx"].numpy(), want[f"{codec}/{i}/topk_idx"])
        np.testing.assert_array_equal(s["topk_logp"].numpy(), want[f"{codec}/{i}/topk_logp"])
    batched = store.samples(list(range(len(store)))[::-1])[::-1]  # one decode call per shard
    for i, s in enumerate(batched):
        np.testing.assert_array_equal(s["topk_idx"].numpy(), want[f"{codec}/{i}/topk_idx"])
        np.testing.assert_array_equal(s["topk_logp"].numpy(), want[f"{codec}/{i}/topk_logp"])
    report = verify_store(tmp_path / codec, progress=False)
    assert report.ok, report.problems


@pytest.mark.parametrize("codec", ["sqrt_ac", "sqrt", "raw"])
def test_todays_encoder_writes_the_version_1_frames_byte_for_byte(codec):
    store, want = open_store(FIXTURES / codec), _expected()
    for which in range(store.num_shards):
        shard = store.shard(which)
        for j in range(len(shard)):
            i = store._starts[which] + j
            input_ids, positions, frame, _ = shard.raw(j)
            again = shard.codec.encode(want[f"{codec}/{i}/input_idx"], want[f"{codec}/{i}/input_logp"],
                                       input_ids, positions)
            assert again == frame, f"{codec} sample {i}: the frame differs from the v1 one"


# ---- synthetic v2 stores ------------------------------------------------------------------------
def _samples(n=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tokens = rng.integers(0, V, int(rng.integers(8, 30))).astype(np.int32)
        start = int(rng.integers(0, 5))
        positions = np.arange(start, len(tokens) - 1, dtype=np.int32)
        if i % 3 == 2:
            positions = positions[::2]  # not contiguous
        logits = rng.standard_normal((len(positions), V)) * rng.uniform(1, 4) - np.log(np.arange(1, V + 1)) * 1.5
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        idx = np.argsort(-logp, 1, kind="stable")[:, :K].astype(np.int32)
        out.append((i, f"s{i}", tokens, positions, idx, np.take_along_axis(logp, idx, 1).astype(np.float32)))
    return out


def _write(directory, samples, *, top_p=None, sections=None, rows=None, shard_samples=4, codec="sqrt_ac"):
    params = {"delta": 1 / 1100} if codec == "sqrt_ac" else {}
    header = StoreHeader(teacher="t", tokenizer_fingerprint="0" * 64, vocab_size=V, k=K, codec=codec,
                         codec_params=params, config={"shard_samples": shard_samples}, top_p=top_p,
                         sections=sections or {})
    writer = StoreWriter(directory, header)
    chunks = [samples[c:c + shard_samples] for c in range(0, len(samples), shard_samples)]
    for c, chunk in enumerate(chunks):
        builder = ShardBuilder(header, learn_positions=20)
        for s in chunk:
            builder.add(*s, sections=None if rows is None else {n: r[s[0]] for n, r in rows.items()})
        writer.write_shard(c, builder)
    writer.finish(len(chunks))
    return directory


def test_inspect_prints_the_sum_of_every_file_and_where_it_goes(tmp_path):
    out = _write(tmp_path / "s", _samples())
    summary = store_summary(open_store(out))
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert summary["bytes"] == on_disk == disk_bytes(out)
    assert summary["bytes_per_position"] == round(on_disk / summary["positions"], 3)
    split = summary["split"]
    assert list(split) == list(SPLIT_KEYS)
    assert sum(v for k, v in split.items() if k not in ("payload_ids", "payload_values")) == on_disk
    assert split["payload_ids"] + split["payload_values"] == split["payload"] > 0
    assert split["payload_ids"] > 0 and split["payload_values"] > 0
    payload = sum(s["payload_bytes"] for s in open_store(out).manifest["shards"])
    assert summary["payload_bytes_per_position"] == round(payload / summary["positions"], 3)
    result = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["bytes"] == on_disk and printed["targets"] == "topk" and printed["top_p"] is None
    assert printed["entries_for_mass"]["0.9"]["p50"] >= 1
    text = CliRunner().invoke(cli, ["inspect", str(out)]).output
    assert f"{on_disk:,} (every file in the store)" in text and "entries for 99.9%" in text


def test_v2_compresses_tokens_positions_and_the_table(tmp_path):
    samples = _samples(12)
    out = _write(tmp_path / "s", samples, shard_samples=12)
    with safe_open(str(out / "shard-000000.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {*store_format.SHARD_TENSORS_V2, "id_count_codes.zst"}
        raw_tokens = sum(len(s[2]) for s in samples) * 4
        assert f.get_tensor("position_gaps.zst").size < sum(len(s[3]) for s in samples) * 4 / 4
        assert f.get_tensor("id_count_codes.zst").size < V * 4 / 2
        assert f.get_tensor("input_ids.zst").size < raw_tokens
    store = open_store(out)
    for s in samples:
        got = store[s[0]]
        np.testing.assert_array_equal(got["input_ids"].numpy(), s[2])
        np.testing.assert_array_equal(got["positions"].numpy(), s[3])


def test_corrupt_compressed_tokens_are_refused_naming_the_shard(tmp_path):
    out = _write(tmp_path / "s", _samples())
    path = out / "shard-000000.safetensors"
    raw = bytearray(path.read_bytes())
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    start, end = header["input_ids.zst"]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"shard-000000\.safetensors: input_ids\.zst: does not decompress"):
        open_store(out)[0]


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logp = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.95, 0.02, 0.02, 0.01], [0.3, 0.3, 0.2, 0.1]]))
    assert top_p_counts(logp, 0.8).tolist() == [2, 1, 3]
    assert top_p_counts(logp, 0.99).tolist() == [4, 3, 4]  # capped at K; at least 1
    assert top_p_counts(logp, 1e-9).tolist() == [1, 1, 1]


def test_adaptive_k_store_round_trips_verifies_and_inspects(tmp_path):
    samples = _samples(9)
    fixed = open_store(_write(tmp_path / "fixed", samples))
    out = _write(tmp_path / "adaptive", samples, top_p=0.9)
    store = open_store(out)
    assert store.top_p == 0.9 and store.manifest["top_p"] == 0.9
    widths = []
    for s in samples:
        got, full = store[s[0]], fixed[s[0]]
        counts = top_p_counts(s[5], 0.9)
        idx, logp = got["topk_idx"].numpy(), got["topk_logp"].numpy()
        assert idx.shape == (len(s[3]), counts.max())
        for r, n in enumerate(counts):
            assert sorted(idx[r, :n]) == sorted(s[4][r, :n])  # exactly the kept ids
            assert (idx[r, n:] == -1).all() and np.isneginf(logp[r, n:]).all()
            tail = 1 - np.exp(s[5][r, :n].astype(np.float64)).sum()
            assert 1 - np.exp(logp[r, :n].astype(np.float64)).sum() == pytest.approx(tail, abs=3e-3)
        widths.extend(counts)
        assert full["topk_idx"].shape[1] == K
    assert min(widths) < K
    assert verify_store(out, progress=False).ok
    summary = store_summary(store)
    assert summary["entries_per_position"]["max"] == max(widths)
    assert summary["payload_bytes_per_position"] < store_summary(fixed)["payload_bytes_per_position"]


def test_adaptive_k_needs_the_sqrt_ac_codec(tmp_path):
    with pytest.raises(ValueError, match=r"adaptive K \(--top-p\) needs codec 'sqrt_ac'"):
        _write(tmp_path / "s", _samples(2), top_p=0.9, codec="raw")


def test_the_kernel_gives_the_references_result_on_padded_ragged_rows():
    torch.manual_seed(0)
    n, vocab = 37, 211
    counts = torch.randint(1, 13, (n,))
    width = int(counts.max())
    logits = (torch.randn(n, vocab) * 3).requires_grad_()
    logp_full = torch.log_softmax(torch.randn(n, vocab) * 2, -1)
    top = logp_full.topk(width, dim=-1)
    keep = torch.arange(width)[None] < counts[:, None]
    idx = torch.where(keep, top.indices, -1).int()
    logp = torch.where(keep, top.values, float("-inf"))
    labels = torch.randint(0, vocab, (n,))
    for tail, alpha, temperature, div in ((True, 1.0, 1.0, "fkl"), (False, 0.7, 2.0, "fkl"), (True, 0.5, 1.5, "fkl"),
                                          (True, 1.0, 1.0, "rkl"), (True, 0.8, 1.0, "jsd")):
        kw = dict(tail=tail, alpha=alpha, temperature=temperature, divergence=div)
        got = sparse_kl(logits, idx, logp, labels, **kw)
        (g_got,) = torch.autograd.grad(got, logits)
        ref = sparse_kl_reference(logits.double(), idx, logp.double(), labels, **kw)
        (g_ref,) = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_got.double(), g_ref.double(), rtol=1e-4, atol=1e-8)
        # padding is neutral: each row alone, with only its own entries, gives the same loss
        rows = torch.stack([sparse_kl_reference(logits[r:r + 1].double(), idx[r:r + 1, :counts[r]],
                                                logp[r:r + 1, :counts[r]].double(), labels[r:r + 1], **kw)
                            for r in range(n)])
        torch.testing.assert_close(ref, rows.mean(), rtol=1e-9, atol=1e-12)


def test_collate_pads_adaptive_rows_to_the_batch_width(tmp_path):
    samples = _samples(4)
    store = open_store(_write(tmp_path / "s", samples, top_p=0.8))
    batch = collate([store[i] for i in range(4)], pad_id=0)
    width = max(store[i]["topk_idx"].shape[1] for i in range(4))
    assert batch["topk_idx"].shape == (batch["targets"], width)
    padded = batch["topk_idx"] == -1
    assert padded.any() and torch.isneginf(batch["topk_logp"][padded]).all()
    logits = torch.randn(batch["targets"], V, requires_grad=True)
    loss = sparse_kl(logits, batch["topk_idx"], batch["topk_logp"], batch["labels"], tail=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# ---- sections and target modes ------------------------------------------------------------------
SECTION = {"extra": {"dtype": "float32", "width": 2, "required": False, "compressed": True}}


def _section_rows(samples):
    return {"extra": {s[0]: np.stack([s[3] * 0.5, -s[3].astype(np.float32)], 1) for s in samples}}


def test_an_optional_section_is_stored_checked_and_handed_on(tmp_path):
    samples = _samples(5)
    rows = _section_rows(samples)
    out = _write(tmp_path / "s", samples, sections=SECTION, rows=rows)
    store = open_store(out)
    for s in samples:
        np.testing.assert_array_equal(store[s[0]]["extra"].numpy(), rows["extra"][s[0]])
    assert verify_store(out, progress=False).ok
    with safe_open(str(out / "shard-000000.safetensors"), framework="numpy") as f:
        assert "section.extra.zst" in f.keys()


def test_a_required_section_this_kdengine_does_not_know_is_refused(tmp_path):
    out = _write(tmp_path / "s", _samples(3), sections=SECTION, rows=_section_rows(_samples(3)))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sections"]["extra"]["required"] = True
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"requires section 'extra', which this kdengine does not know"):
        open_store(out)


def test_an_unknown_target_mode_is_refused(tmp_path):
    out = _write(tmp_path / "s", _samples(3))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["targets"] = "mystery"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"target mode 'mystery' is not one this kdengine reads \(topk, sample\)"):
        open_store(out)


def test_a_section_row_that_changes_fails_the_sample_crc(tmp_path):
    samples = _samples(3)
    section = {"extra": dict(SECTION["extra"], compressed=False)}
    out = _write(tmp_path / "s", samples, sections=section, rows=_section_rows(samples))
    path = out / "shard-000000.safetensors"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        start, _ = json.loads(f.read(n))["section.extra"]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + n + start + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"sample 0 \(corpus index 0\) fails its crc32"):
        open_store(out)[0]


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_batch_decode_gives_the_same_samples_as_one_by_one(tmp_path, top_p):
    samples = _samples(9) + [(9, "empty", np.arange(5, dtype=np.int32), np.zeros(0, np.int32),
                              np.zeros((0, K), np.int32), np.zeros((0, K), np.float32))]
    store = open_store(_write(tmp_path / "s", samples, top_p=top_p))
    order = [3, 0, 9, 7, 1, 2, 8, 4, 6, 5]
    for i, got in zip(order, store.samples(order)):
        want = store[i]
        assert set(got) == set(want)
        for key in ("input_ids", "positions", "topk_idx", "topk_logp"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        assert (got["id"], got["index"]) == (want["id"], want["index"])


def test_batch_decode_names_the_sample_whose_frame_does_not_decode(tmp_path):
    out = _write(tmp_path / "s", _samples(4))
    store = open_store(out)
    shard = store.shard(0)
    f0, f1 = shard.frame_offsets[2:4]
    path = out / "shard-000000.safetensors"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    start = 8 + n + header["payload"]["data_offsets"][0]
    raw = bytearray(path.read_bytes())
    raw[start + f0 + 12:start + f1] = bytes(f1 - f0 - 12)  # sample 2's body zeroed ...
    tokens, positions, _, _ = shard.raw(2)
    frame = bytes(raw[start + f0:start + f1])
    crc_at = 8 + n + header["sample_crc32"]["data_offsets"][0] + 4 * 2
    raw[crc_at:crc_at + 4] = int(store_format.sample_crc32(tokens, positions, frame)).to_bytes(4, "little")
    path.write_bytes(bytes(raw))  # ... with a matching crc, as a broken encoder would write it
    with pytest.raises(StoreError, match=r"shard-000000\.safetensors: sample 2 \(corpus index 2\) does not decode"):
        open_store(out).samples([0, 1, 2, 3])
