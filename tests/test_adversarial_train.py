"""The trainer attacked (issue 12): crafted pickles in checkpoints, two writers on one run directory,
resuming onto other data, a crash between the last checkpoint and final/, impossible option values,
unwritable output, and store errors inside DataLoader workers."""
import json
import os
import pickle
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import assert_same_weights, read_records, train_args

from kdengine.cli import cli
from kdengine.train import TrainError, main

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates the directory `marker`: proof that the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _one_step_run(student_dir, store_dir, out):
    main(train_args(student_dir, store_dir, out, "--steps", 1, "--warmup-steps", 0))
    return out / "checkpoints" / "step-00000001"


# Files the resume reads: each one replaced by a pickle must be refused.
_READ_ON_RESUME = ("trainer_state.json", "model.safetensors", "config.json", "optimizer.safetensors",
                   "optimizer.json", "scheduler.json", "scheduler.safetensors", "rank-00000.safetensors",
                   "rank-00000.json")


def test_a_crafted_pickle_in_any_checkpoint_file_is_refused_without_running(store_dir, student_dir, tmp_path):
    ckpt = _one_step_run(student_dir, store_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "final")
    names = sorted(p.name for p in ckpt.iterdir())
    assert set(_READ_ON_RESUME) <= set(names)
    # Pickle files the old format had, and HF's pickle fallbacks: present, never opened.
    names += ["trainer.pt", "optimizer.pt", "pytorch_model.bin"]
    for name in names:
        case = tmp_path / f"case-{name}"
        shutil.copytree(tmp_path / "run", case)
        marker = tmp_path / f"ran-{name}"
        (case / "checkpoints" / "step-00000001" / name).write_bytes(pickle.dumps(_Payload(marker)))
        try:
            main(train_args(student_dir, store_dir, case, "--steps", 1, "--warmup-steps", 0, "--resume"))
            refused = False
        except TrainError as exc:
            refused = True
            assert "\n" not in str(exc) and name in str(exc) or "step-00000001" in str(exc), str(exc)
        assert not marker.exists(), f"the pickle in {name} ran"
        if name in _READ_ON_RESUME:
            assert refused, f"a pickle in {name} was accepted"
        else:
            assert (case / "final" / "model.safetensors").is_file(), name


def _errors(output: str) -> list[str]:
    """The `Error: ...` messages in a command's output (progress bars share its lines)."""
    return re.findall(r"Error: [^\r\n]*", output)


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_two_trainers_on_one_out_the_second_refuses(store_dir, student_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"),
                              *train_args(student_dir, store_dir, out, "--steps", 100000)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text())
        result = CliRunner().invoke(cli, ["train", *train_args(student_dir, store_dir, out, "--steps", 2)])
        assert result.exit_code == 1
        error = _errors(result.output)
        assert len(error) == 1 and "Traceback" not in result.output, result.output
        assert f"is already running (pid {first.pid} on host {socket.gethostname()} since " in error[0]
        with pytest.raises(TrainError, match=f"pid {first.pid}"):
            main(train_args(student_dir, store_dir, out, "--steps", 2, "--resume"))
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    main(train_args(student_dir, store_dir, tmp_path / "run", "--steps", 100000, "--stop-after", 1, "--resume"))


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", 1, "--seed: checkpoint 0, now 1"),
    ("--batch-tokens", 128, "--batch-tokens: checkpoint 256, now 128"),
    ("--eval-fraction", 0.1, "--eval-fraction: checkpoint 0.02, now 0.1"),
])
def test_resume_refuses_a_changed_data_order(store_dir, student_dir, tmp_path, flag, value, message):
    main(train_args(student_dir, store_dir, tmp_path, "--steps", 3, "--stop-after", 1))
    before = read_records(tmp_path)
    with pytest.raises(TrainError, match=f"{message}: these decide the batch order and the held-out split"):
        main(train_args(student_dir, store_dir, tmp_path, "--steps", 3, "--resume", flag, value))
    assert read_records(tmp_path) == before


def test_resume_refuses_another_store_of_the_same_size(store_dir, student_dir, tiny_model_dir, tmp_path):
    other = tmp_path / "other-store"
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data",
                                      str(store_dir.parent / "corpus.jsonl"), "--out", str(other), "--top-k", "4",
                                      "--shard-samples", "64"])
    assert result.exit_code == 0, result.output
    main(train_args(student_dir, store_dir, tmp_path / "run", "--steps", 3, "--stop-after", 1))
    with pytest.raises(TrainError, match="was trained on another store .* resume with the original store"):
        main(train_args(student_dir, other, tmp_path / "run", "--steps", 3, "--resume"))


def test_resume_after_the_last_step_writes_final(store_dir, student_dir, tmp_path, capsys):
    main(train_args(student_dir, store_dir, tmp_path, "--steps", 2))
    shutil.copytree(tmp_path / "final", tmp_path.parent / f"{tmp_path.name}-final")
    shutil.rmtree(tmp_path / "final")  # as if killed between the last checkpoint and final/
    main(train_args(student_dir, store_dir, tmp_path, "--steps", 2, "--resume"))
    assert_same_weights(tmp_path / "final", tmp_path.parent / f"{tmp_path.name}-final", atol=0)
    capsys.readouterr()
    main(train_args(student_dir, store_dir, tmp_path, "--steps", 2, "--resume"))
    assert "the run is complete (step 2 of 2" in capsys.readouterr().err
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2]


@pytest.mark.parametrize("flags, message", [
    ("--weight-decay -5", "Invalid value for '--weight-decay': must be >= 0, got -5.0"),
    ("--max-grad-norm -1", "Invalid value for '--max-grad-norm': must be >= 0, got -1.0"),
    ("--temperature inf", "Invalid value for '--temperature': must be a finite number > 0, got inf"),
])
def test_impossible_option_values_are_rejected_at_parse_time(store_dir, student_dir, tmp_path, flags, message):
    result = CliRunner().invoke(cli, ["train", *train_args(student_dir, store_dir, tmp_path / "run"), *flags.split()])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_out_being_a_file_is_a_one_line_error(store_dir, student_dir, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    result = CliRunner().invoke(cli, ["train", *train_args(student_dir, store_dir, tmp_path / "run", "--steps", 1, "--warmup-steps", 0)])
    assert result.exit_code == 1
    assert result.output.endswith(f"Error: --out {tmp_path / 'run'} is a file, not a directory; choose another "
                                  "--out\n")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(size, read_only) -> a fresh tmpfs directory (needs root and mount(8); else skip)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_output_is_a_one_line_error(store_dir, student_dir, mount_tmpfs):
    ro = mount_tmpfs("1m", read_only=True)
    result = CliRunner().invoke(cli, ["train", *train_args(student_dir, store_dir, ro / "run", "--steps", 1, "--warmup-steps", 0)])
    assert result.exit_code == 1
    assert result.output.endswith(f"Error: --out {ro / 'run'}: cannot create the run directory or its lock "
                                  "(Read-only file system); choose a writable --out\n")


def test_a_full_disk_is_a_one_line_error_and_leaves_no_partial_output(store_dir, student_dir, mount_tmpfs):
    full = mount_tmpfs("160k")  # room for the run's logs, not for a checkpoint (the student is ~400 KB)
    out = full / "run"
    result = CliRunner().invoke(cli, ["train", *train_args(student_dir, store_dir, out, "--steps", 2)])
    assert result.exit_code == 1
    error = _errors(result.output)
    assert len(error) == 1 and error[0].startswith(f"Error: {out}") and "No space left on device" in error[0]
    assert "Traceback" not in result.output
    assert not out.exists() and os.listdir(full) == []
    # A run that had checkpoints keeps them and loses only the temporaries.
    roomy = mount_tmpfs("2m")
    main(train_args(student_dir, store_dir, roomy / "run", "--steps", 3, "--stop-after", 1))
    filler = roomy / "filler"
    free = os.statvfs(roomy).f_bavail * os.statvfs(roomy).f_frsize
    filler.write_bytes(b"\0" * max(free - 64 * 1024, 0))
    result = CliRunner().invoke(cli, ["train", *train_args(student_dir, store_dir, roomy / "run", "--steps", 3,
                                                           "--resume")])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    names = sorted(p.name for p in (roomy / "run" / "checkpoints").iterdir())
    assert names == ["step-00000001"]
    assert not [p for p in (roomy / "run").iterdir() if ".tmp-" in p.name]


def _flip_payload_byte_of_last_sample(shard: Path) -> None:
    """Flips one byte of the last sample's frame (its crc32 then fails when it is decoded)."""
    raw = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    start, end = header["payload"]["data_offsets"]
    raw[8 + header_len + end - 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_a_store_error_inside_a_dataloader_worker_is_the_one_line_store_error(store_dir, student_dir, tmp_path):
    damaged = tmp_path / "store"
    shutil.copytree(store_dir, damaged)
    shard = sorted(damaged.glob("shard-*.safetensors"))[-1]
    _flip_payload_byte_of_last_sample(shard)
    args = train_args(student_dir, damaged, tmp_path / "run", "--steps", 30)
    args[args.index("--workers") + 1] = "1"
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 1, result.output
    error = _errors(result.output)
    assert len(error) == 1 and f"Error: store {damaged}: {shard}" in error[0] and "crc32" in error[0], result.output
    assert "Traceback" not in result.output and "worker process" not in result.output
