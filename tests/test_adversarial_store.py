"""The manifest cannot lie: every manifest edit an adversary can make (a codec parameter, k, the
vocabulary, the fingerprint, counts, the shard list, types) is refused by the reader and by verify,
naming both values; a damaged shard names itself; byte flips never give wrong targets silently."""
import json
import random
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import rewrite_shard_metadata
from kdengine.cli import cli
from kdengine.dump import DumpConfig, dump
from kdengine.store import StoreError, open_store, store_identity, verify_store

LINES = [{"text": f"The farmer has {n} apples and buys {n % 7} more at the market."} for n in range(10)]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    """A complete store: 10 samples in 4 shards of 3 (the last holds 1), K = 4."""
    root = tmp_path_factory.mktemp("adv_store")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    dump(DumpConfig(teacher=str(tiny_model_dir), data=str(data), out=str(root / "store"), top_k=4,
                    batch_size=4, shard_samples=3, progress=False))
    return root / "store"


@pytest.fixture
def copy(store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(store, out)
    return out


def edit_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def read_all(directory):
    s = open_store(directory)
    return [s[i] for i in range(len(s))]


def refused_everywhere(directory, message):
    """The edited store is refused (never read wrong) by the reader, verify and the CLI commands."""
    with pytest.raises(StoreError, match=message):
        read_all(directory)
    try:
        report = verify_store(directory, progress=False)
        assert not report.ok and any(__import__("re").search(message, p) for p in report.problems), report.problems
    except StoreError as exc:
        assert __import__("re").search(message, str(exc)), exc
    for args in (["verify", str(directory), "--quiet"], ["inspect", str(directory), "--sample", "0"],
                 ["inspect", str(directory), "--sample", "9"]):
        result = CliRunner().invoke(cli, args)
        if args[0] == "inspect" and result.exit_code == 0:
            continue  # that sample's shard is not the edited one
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.splitlines()[-1].startswith("Error: "), result.output


def _set(*path):
    *keys, value = path

    def change(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _shard0(key, delta):
    """Changes shard 0's `key` by delta and the manifest total with it, so the manifest stays self-consistent."""
    def change(manifest):
        manifest["shards"][0][key] += delta
        if key in manifest:
            manifest[key] += delta
    return change


MANIFEST_EDITS = [  # (edit, what the refusal names)
    (_set("codec", "params", "delta", 0.0005), r"codec_params = .*0\.000909.*the manifest says codec_params = .*0\.0005"),
    (_set("codec", "name", "sqrt"), r"the shard says codec = sqrt_ac, the manifest says codec = \"sqrt\""),
    (_set("k", 3), r"the shard says k = 4, the manifest says k = 3"),
    (_set("vocab_size", 500), r"the shard says vocab_size = \d+, the manifest says vocab_size = 500"),
    (_set("tokenizer_fingerprint", "0" * 64), r"the shard says tokenizer_fingerprint = v2:\w+, the manifest says"),
    (_set("teacher", "/elsewhere"), r"the shard says teacher = .*, the manifest says teacher = \"/elsewhere\""),
    (_shard0("tokens", 5), r"the manifest says tokens = \d+"),
    (_shard0("positions", -2), r"the manifest says positions = \d+"),
    (_shard0("payload_bytes", 1), r"the manifest says payload_bytes = \d+"),
    (_shard0("rank", 1), r"the shard says rank = 0, the manifest says rank = 1"),
    (_set("samples", 99), r"samples is 99, but its shard entries add up to 10"),
]


@pytest.mark.parametrize("change, message", MANIFEST_EDITS)
def test_a_manifest_edit_is_refused_naming_both_values(copy, change, message):
    edit_manifest(copy, change)
    refused_everywhere(copy, message)


def test_shard_samples_edit_is_refused(copy):
    def change(m):
        m["shards"][3]["samples"] = 2
        m["samples"] += 1
    edit_manifest(copy, change)
    refused_everywhere(copy, r"the shard says samples = 1, the manifest says samples = 2")


def test_a_duplicated_shard_entry_is_refused(copy):
    edit_manifest(copy, lambda m: m["shards"].insert(1, dict(m["shards"][0])))
    refused_everywhere(copy, r"chunk 0 is listed twice")


def test_a_removed_shard_entry_fails_verify(copy):
    def change(m):
        gone = m["shards"].pop(1)
        for key in ("samples", "tokens", "positions", "payload_bytes"):
            m[key] -= gone[key]
    edit_manifest(copy, change)
    report = verify_store(copy, progress=False)
    assert not report.ok
    assert any("chunks 1 of 4 are not listed" in p for p in report.problems), report.problems
    assert any(p.startswith("shard-000001.safetensors: on disk but not listed") for p in report.problems)
    result = CliRunner().invoke(cli, ["verify", str(copy), "--quiet"])
    assert result.exit_code == 1 and "OK" not in result.output


def test_an_unlisted_shard_file_fails_verify(copy):
    shutil.copy(copy / "shard-000000.safetensors", copy / "shard-000007.safetensors")
    report = verify_store(copy, progress=False)
    assert report.problems == ["shard-000007.safetensors: on disk but not listed in manifest.json (an entry was "
                               "removed, or an interrupted dump left it; re-running the dump rewrites it)"]
    assert report.bad_files == ["shard-000007.safetensors"]


def test_a_listed_shard_file_that_is_missing_fails(copy):
    (copy / "shard-000002.safetensors").unlink()
    report = verify_store(copy, progress=False)
    assert report.problems and report.problems[0].startswith("shard-000002.safetensors: missing")


def test_chunks_that_are_not_full_break_contiguity(copy):
    def change(m):  # an adversary renumbers: 4 chunks of 3 claim to be 4 chunks of 4
        m["dump"]["shard_samples"] = 4
    edit_manifest(copy, change)
    refused_everywhere(copy, r"chunk \d of 4 samples holds")


WRONG_TYPES = [
    (_set("shards", 0, "samples", "32") if False else (lambda m: m["shards"][0].update(samples="32")),
     r'samples is "32", expected an integer'),
    (lambda m: m["shards"][0].update(samples=-5), r"samples is -5, expected at least 0"),
    (lambda m: m["shards"][0].update(tokens=True), r"tokens is true, expected an integer"),
    (lambda m: m["shards"][0].update(bytes=3.5), r"bytes is 3.5, expected an integer"),
    (lambda m: m["shards"][0].update(sha256=7), r"sha256 is 7, expected 64 lowercase hex"),
    (lambda m: m["shards"][0].update(chunk=5), r"chunk 5 is stored as shard-000005.safetensors"),
    (_set("k", "4"), r'k is "4", expected an integer'),
    (_set("vocab_size", None), r"vocab_size is null, expected an integer"),
    (_set("codec", "params", [1]), r"codec is .*, expected"),
    (_set("complete", "yes"), r"key 'complete' is \"yes\", expected true or false"),
    (_set("chunks_total", -1), r"chunks_total is -1, expected at least 0"),
    (_set("shards", {}), r"key 'shards' is \{\}, expected an array"),
    (_set("tokens", "many"), r'tokens is "many", expected an integer'),
]


@pytest.mark.parametrize("change, message", WRONG_TYPES)
def test_a_wrong_type_is_a_clean_error_in_verify_inspect_and_open(copy, change, message):
    edit_manifest(copy, change)
    with pytest.raises(StoreError, match=message):
        open_store(copy)
    for args in (["verify", str(copy), "--quiet"], ["inspect", str(copy)], ["inspect", str(copy), "--json"],
                 ["inspect", str(copy), "--sample", "0"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        assert __import__("re").search(message, result.output.splitlines()[-1]), result.output


@pytest.mark.parametrize("args, message", [
    (["--sample", "10"], "sample 10 out of range: the store holds samples 0..9"),
    (["--sample", "-1"], "sample -1 out of range: the store holds samples 0..9"),
    (["--sample", "0", "--top", "-1"], "Invalid value for '--top'"),
    (["--sample", "0", "--top", "0"], "Invalid value for '--top'"),
])
def test_inspect_refuses_out_of_range_options(store, args, message):
    result = CliRunner().invoke(cli, ["inspect", str(store), *args])
    assert result.exit_code in (1, 2) and message in result.output, result.output


def test_inspect_top_shows_exactly_that_many(store):
    result = CliRunner().invoke(cli, ["inspect", str(store), "--sample", "0", "--top", "4"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("t=")]
    assert rows and all(line.split("|")[1].count(" 0.") + line.split("|")[1].count(" 1.") == 4 for line in rows)


def test_damaged_sample_ids_json_names_the_shard(copy):
    rewrite_shard_metadata(copy, "shard-000001.safetensors", sample_ids='["3", "4"')
    with pytest.raises(StoreError, match=r"shard-000001\.safetensors: __metadata__\['sample_ids'\] is not valid JSON"):
        open_store(copy)[3]
    report = verify_store(copy, progress=False)
    assert report.bad_files == ["shard-000001.safetensors"]
    rewrite_shard_metadata(copy, "shard-000001.safetensors", sample_ids='["3"]')
    with pytest.raises(StoreError, match=r"shard-000001\.safetensors: __metadata__\['sample_ids'\] is not a list of 3"):
        open_store(copy)[3]


def test_store_identity_follows_the_shards(store, copy):
    manifest = json.loads((store / "manifest.json").read_text())
    assert open_store(store).identity == store_identity(manifest) == open_store(copy).identity
    edit_manifest(copy, lambda m: m.update(dump={**m["dump"], "note": "whatever"}))
    assert open_store(copy).identity == open_store(store).identity  # the shards, not the manifest's prose
    rewrite_shard_metadata(copy, "shard-000002.safetensors", sample_ids=json.dumps(["6", "7", "x"]))
    assert open_store(copy).identity != open_store(store).identity


def _targets(shard):
    out = []
    for j in range(len(shard)):
        s = shard.sample(j)
        out.append((s["input_ids"].numpy().copy(), s["positions"].numpy().copy(), s["topk_idx"].numpy().copy(),
                    s["topk_logp"].numpy().copy(), s["index"]))
    return out


def test_byte_flip_sweep_never_gives_wrong_targets_silently(copy):
    """One bit flipped at every header byte and at 600 sampled data bytes of a shard: each read either
    raises StoreError or returns exactly the original targets."""
    path = copy / "shard-000000.safetensors"
    original = path.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    truth = _targets(open_store(copy).shard(0))
    rng = random.Random(0)
    offsets = list(range(header_end)) + rng.sample(range(header_end, len(original)), 600)
    outcomes = {"error": 0, "same": 0}
    for offset in offsets:
        flipped = bytearray(original)
        flipped[offset] ^= 1 << (offset % 8)
        path.write_bytes(flipped)
        try:
            got = _targets(open_store(copy).shard(0))
        except StoreError:
            outcomes["error"] += 1
            continue
        for a, b in zip(got, truth):
            assert all(np.array_equal(x, y) for x, y in zip(a[:4], b[:4])) and a[4] == b[4], f"offset {offset}"
        outcomes["same"] += 1
    path.write_bytes(original)
    assert outcomes["error"] > 0.9 * len(offsets), outcomes
