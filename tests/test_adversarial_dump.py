"""The dump as an adversary runs it: two writers on one directory, a full or read-only disk, stale
temporaries, samples past the teacher's context, a corpus without targets."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.dump import DumpConfig, DumpError, dump
from kdengine.locks import LockHeld, hold_lock
from kdengine.store import StoreError, StoreHeader, StoreWriter, open_store, verify_store
from kdengine.store.writer import drop_shards

ROOT = Path(__file__).resolve().parents[1]
LINES = [{"text": f"The farmer has {n} apples and buys {n % 7} more at the market."} for n in range(8)]


def corpus(path, lines=LINES):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def config(model, data, out, **kw):
    return DumpConfig(teacher=str(model), data=str(data), out=str(out), top_k=4, batch_size=4, shard_samples=3,
                      progress=False, **kw)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    from kdengine.teachers import load_teacher

    return load_teacher(str(tiny_model_dir))


def header():
    return StoreHeader(teacher="t", tokenizer_fingerprint="v2:" + "0" * 64, vocab_size=16, k=2, codec="raw",
                       codec_params={}, config={"world_size": 2})


def test_two_writers_of_one_rank_refuse_naming_the_first(tmp_path):
    first = StoreWriter(tmp_path / "s", header(), rank=0, world_size=2)
    host = socket.gethostname()
    with pytest.raises(StoreError, match=rf"\.rank-00000\.lock: a dump writing rank 0 is already running "
                                         rf"\(pid {os.getpid()} on host {host} since .*\); wait for it"):
        StoreWriter(tmp_path / "s", header(), rank=0, world_size=2)
    other = StoreWriter(tmp_path / "s", header(), rank=1, world_size=2)  # another rank is fine
    with pytest.raises(StoreError, match="--drop-bad must wait until no dump writes"):
        drop_shards(tmp_path / "s", [])
    other.close()
    first.close()
    StoreWriter(tmp_path / "s", header(), rank=0, world_size=2).close()  # released: the next one may start
    drop_shards(tmp_path / "s", [])


def test_lock_is_per_process_and_dies_with_it(tmp_path):
    lock = tmp_path / "x.lock"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from kdengine.locks import hold_lock; "
                              f"l = hold_lock({str(lock)!r}, 'a test'); print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=rf"a test is already running \(pid {child.pid} on host "):
            hold_lock(lock, "a test")
    finally:
        child.kill()
        child.wait()
    hold_lock(lock, "a test").release()  # kill -9 released it


def test_a_second_identical_dump_refuses_while_the_first_runs(tmp_path, tiny_model_dir):
    data, out = corpus(tmp_path / "c.jsonl"), tmp_path / "store"
    out.mkdir()
    args = [sys.executable, "-m", "kdengine", "dump", "--teacher", str(tiny_model_dir), "--data", str(data),
            "--out", str(out), "--top-k", "4", "--shard-samples", "3"]
    with hold_lock(out / ".rank-00000.lock", "a dump writing rank 0"):  # the first dump, mid-run
        second = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"a dump writing rank 0 is already running (pid {os.getpid()} on host {socket.gethostname()}" \
        in second.stderr
    assert not list(out.glob("shard-*"))


def _tmpfs(path, size):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    return path


@pytest.fixture
def small_disk(tmp_path):
    disk = _tmpfs(tmp_path / "disk", "12k")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_is_one_line_and_leaves_no_temporaries_then_resumes(tmp_path, tiny_model_dir, teacher, small_disk):
    data = corpus(tmp_path / "c.jsonl")
    out = small_disk / "store"
    with pytest.raises(StoreError, match=rf"^{out}: cannot write .*\(No space left on device\); free space"):
        dump(config(tiny_model_dir, data, out), teacher=teacher)
    leftovers = [p.name for p in out.rglob(".*tmp*")]
    assert leftovers == []
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(out), "--top-k", "4", "--batch-size", "4", "--shard-samples", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith(f"Error: {out}: cannot write")
    assert "No space left on device" in result.output.splitlines()[-1]
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    summary = dump(config(tiny_model_dir, data, out), teacher=teacher)
    assert summary.store_complete and verify_store(out, progress=False).ok
    assert summary.shards_already_done >= 0 and len(open_store(out)) == len(LINES)


def test_read_only_output_is_one_line(tmp_path, tiny_model_dir, teacher):
    disk = _tmpfs(tmp_path / "ro", "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        data = corpus(tmp_path / "c.jsonl")
        with pytest.raises(StoreError) as info:
            dump(config(tiny_model_dir, data, disk / "store"), teacher=teacher)
        assert str(info.value) == (f"{disk / 'store'}: cannot write the store directory (Read-only file "
                                   f"system); free space on that disk or choose a writable --out, then re-run the "
                                   f"same command: it continues after the last complete shard")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_stale_temporaries_are_removed_but_not_a_live_ranks(tmp_path, tiny_model_dir, teacher):
    data, out = corpus(tmp_path / "c.jsonl"), tmp_path / "store"
    dump(config(tiny_model_dir, data, out, rank=0, world_size=2), teacher=teacher)
    stale = [out / ".manifest.json.tmp-99999", out / "parts" / ".rank-00000.json.tmp-99999",
             out / ".shard-000000.safetensors.tmp-r00000"]
    live = out / "parts" / ".rank-00001.json.tmp-4242"
    for path in stale + [live]:
        path.write_bytes(b"partial")
    with hold_lock(out / ".rank-00001.lock", "a dump writing rank 1"):  # rank 1 is running
        dump(config(tiny_model_dir, data, out, rank=0, world_size=2), teacher=teacher)
    assert [p.exists() for p in stale] == [False, False, False] and live.exists()


def test_out_being_a_file_is_refused_before_the_teacher_loads(tmp_path):
    data = corpus(tmp_path / "c.jsonl")
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(StoreError, match=rf"^{out}: exists and is not a directory; choose another --out"):
        dump(config(tmp_path / "no-such-teacher", data, out))
    result = CliRunner().invoke(cli, ["dump", "--teacher", "x", "--data", str(data), "--out", str(out), "--top-k", "4"])
    assert result.exit_code == 2 and "is a file" in result.output


def test_a_sample_longer_than_the_teachers_context_is_refused_with_its_line(tmp_path, tiny_model_dir, teacher):
    long_text = " ".join(f"apples {i}" for i in range(400))  # > 512 tokens, the tiny teacher's context
    data = corpus(tmp_path / "c.jsonl", LINES[:2] + [{"text": long_text}])
    with pytest.raises(Exception, match=rf"^{data}:3: \d+ tokens, longer than the teacher's context of 512 "
                                        rf"\(max_position_embeddings\).*pass --max-length 512"):
        dump(config(tiny_model_dir, data, tmp_path / "a"), teacher=teacher)
    assert not (tmp_path / "a").exists()
    summary = dump(config(tiny_model_dir, data, tmp_path / "b", max_length=512), teacher=teacher)
    assert summary.truncated == 1 and summary.context_length == 512
    assert len(open_store(tmp_path / "b")[2]["input_ids"]) == 512
    with pytest.raises(Exception, match=r"--max-length 600 is longer than the teacher's context of 512"):
        dump(config(tiny_model_dir, data, tmp_path / "c", max_length=600), teacher=teacher)


def test_an_empty_store_fails_verify_and_inspect_says_so(tmp_path):
    writer = StoreWriter(tmp_path / "s", header(), rank=0, world_size=1)
    writer.finish(0)  # a store marked complete with nothing in it (the old dump wrote these)
    writer.close()
    report = verify_store(tmp_path / "s", progress=False)
    assert report.problems == ["manifest.json: the store holds no target position; dump a corpus with targets"]
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s"), "--sample", "0"])
    assert result.exit_code == 1 and "sample 0 out of range: the store holds no samples yet" in result.output


def test_a_corpus_without_any_target_is_an_error_not_an_empty_store(tmp_path, tiny_model_dir, teacher):
    data = corpus(tmp_path / "c.jsonl", [{"prompt": "How many apples does the farmer have?", "response": "Two."}])
    with pytest.raises(DumpError, match=rf"^{data}: no sample has a target position"):
        dump(config(tiny_model_dir, data, tmp_path / "store", max_length=3), teacher=teacher)
    assert not (tmp_path / "store").exists()
