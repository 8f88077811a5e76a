"""The dump as separate processes: killed with SIGKILL and resumed, and split over two ranks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdengine.store import open_store, verify_store

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the farmer has apples and buys more books for each student at the market every week".split()


def _corpus(path, n):
    lines = [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + i % 9)) + f" {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _dump_cmd(model, data, out, *extra):
    return [sys.executable, "-m", "kdengine", "dump", "--teacher", str(model), "--data", str(data), "--out", str(out),
            "--top-k", "8", "--batch-size", "2", "--shard-samples", "4", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _samples(out):
    store = open_store(out)
    return [store[i] for i in range(len(store))]


@pytest.mark.slow
def test_kill_9_mid_dump_then_the_same_command_completes(tiny_model_dir, tmp_path):
    n = 120
    data, out = _corpus(tmp_path / "data.jsonl", n), tmp_path / "store"
    cmd = _dump_cmd(tiny_model_dir, data, out)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    first = out / "shard-000000.safetensors"
    deadline = time.monotonic() + 300
    while not first.exists():  # the first shard's rename is observed: kill right there
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "the dump wrote no shard in time"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    listed = json.loads((out / "manifest.json").read_text())["shards"] if (out / "manifest.json").exists() else []
    assert len(listed) < n // 4, "the dump had finished before it was killed"

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "store " + str(out) + ": complete" in done.stdout
    samples = _samples(out)
    assert sorted(s["index"] for s in samples) == list(range(n))  # every sample exactly once
    assert verify_store(out, progress=False).ok


@pytest.mark.slow
def test_two_ranks_give_the_same_samples_as_one(tiny_model_dir, tmp_path):
    data = _corpus(tmp_path / "data.jsonl", 30)
    runs = [subprocess.Popen(_dump_cmd(tiny_model_dir, data, tmp_path / "two", "--rank", str(r), "--world-size", "2"),
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    runs.append(subprocess.Popen(_dump_cmd(tiny_model_dir, data, tmp_path / "one"), env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err

    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["ranks_finished"] == [0, 1]
    assert [(s["chunk"], s["rank"]) for s in manifest["shards"]] == [(c, c % 2) for c in range(8)]
    assert verify_store(tmp_path / "two", progress=False).ok
    one, two = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert len(one) == len(two) == 30
    for a, b in zip(one, two):
        assert a["index"] == b["index"] and a["id"] == b["id"]
        for key in ("input_ids", "positions", "topk_idx", "topk_logp"):
            assert torch.equal(a[key], b[key]), (a["index"], key)
