"""Checkpoints on disk: one directory per step under OUT/checkpoints/, written whole or not at all, and
read without pickle (safetensors and JSON only: a crafted checkpoint cannot run code).

    step-00000500/
      config.json, model.safetensors, tokenizer files   the student in HF layout (full fine-tuning without
                                                       FSDP: `from_pretrained` and `kdengine eval` load it)
      adapter/                                         LoRA: the adapter alone (peft layout, safetensors)
      optimizer.safetensors + .json                    the optimizer state keyed by parameter name (not FSDP)
      scheduler.json (+ .safetensors)                  the LR scheduler's state
      rank-00000.safetensors + .json, one per rank     that rank's RNG states; with FSDP also its own shards
                                                       of the model and the optimizer state (no gather)
      config.yaml                                      the run's resolved options
      trainer_state.json                               step, data position, world size, store identity (last)
      projections.safetensors                          feature KD's learned maps, when it has any (train/hidden.py)

Every rank writes its own files into one staging directory `.tmp-step-N` (on a filesystem all ranks
share, as torch.distributed.checkpoint assumes), fsyncs them, and after a barrier rank 0 writes
trainer_state.json and renames the directory into place: a run killed at any moment leaves the previous
checkpoints intact and at most a staging directory, which the next run removes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from kdengine.durable import fsync_path
from kdengine.train.errors import TrainError

FORMAT_VERSION = 2  # 1: torch.save pickles (trainer.pt, optimizer.pt), no longer read
_STEP_DIR = re.compile(r"step-(\d{8})")
_TMP_PREFIX = ".tmp-"
# Fields whose change makes a resumed run see other data (a different batch order or held-out split):
# a resume refuses them. Every other changed field is a warning, except these that change nothing
# (fused_head: the same loss and gradients, computed without the [N, V] logits):
DATA_ORDER_FIELDS = ("seed", "batch_tokens", "eval_fraction")
_NEUTRAL_FIELDS = {"resume", "stop_after", "workers", "keep_checkpoints", "log_every", "eval_every", "save_every",
                   "report_to", "config_file", "fused_head"}


@dataclass
class TrainState:
    """Where a run stands: `step` optimizer steps done; the next global batch is `batch_index` of epoch
    `epoch`; `world` processes; the store had `store_samples` samples and identity `store_identity`
    (a hash over its shards' sha256s); `sharded`: model and optimizer are in the per-rank files; the
    run's config as a dict."""

    step: int
    epoch: int
    batch_index: int
    world: int
    store_samples: int
    store_identity: str
    sharded: bool
    config: dict
    format_version: int = FORMAT_VERSION


def checkpoints_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def rank_state_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def staging_dir(out: str | Path, step: int) -> Path:
    return checkpoints_dir(out) / f"{_TMP_PREFIX}step-{step:08d}"


def prepare_staging(out: str | Path, step: int) -> Path:
    """Creates an empty staging directory for `step` (rank 0, before the other ranks write into it)."""
    tmp = staging_dir(out, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def fsync_tree(directory: Path, names=None) -> None:
    """fsyncs the files under `directory` (only `names` if given, else all), then the directories."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            if names is None or Path(root) != directory or name in names:
                fsync_path(Path(root) / name)
        fsync_path(root)


def commit_checkpoint(out: str | Path, tmp: Path, state: TrainState, *, keep: int) -> Path:
    """Writes trainer_state.json into the staging directory, renames it into place and prunes old
    checkpoints (rank 0, after every rank has written and fsynced its files)."""
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
    fsync_tree(tmp)
    root = tmp.parent
    final = root / tmp.name.removeprefix(_TMP_PREFIX)
    if final.exists():  # re-saving a step (a resumed run that stops where it started)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    if keep > 0:
        for old in _complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def newest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None if there is none."""
    found = _complete_checkpoints(checkpoints_dir(out))
    return found[-1] if found else None


def remove_partial_checkpoints(out: str | Path) -> list[Path]:
    """Deletes staging directories a killed run left behind; returns what it removed."""
    root = checkpoints_dir(out)
    stale = sorted(root.glob(f"{_TMP_PREFIX}*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def read_train_state(ckpt: Path) -> TrainState:
    path = ckpt / "trainer_state.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrainError(f"{path}: cannot read the training state ({exc}); delete {ckpt} to resume from the "
                         "checkpoint before it") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        version = raw.get("format_version", 1) if isinstance(raw, dict) else "?"
        raise TrainError(f"{path}: checkpoint format {version}, this kdengine reads format {FORMAT_VERSION} (format 1 "
                         "stored pickles, which are never loaded); start a new --out, or resume with the kdengine "
                         "that wrote it")
    expected = {f.name: f.type for f in fields(TrainState)}
    if set(raw) != set(expected):
        raise TrainError(f"{path}: keys {sorted(raw)} differ from {sorted(expected)}; delete {ckpt} to resume from "
                         "the checkpoint before it")
    types = {"step": int, "epoch": int, "batch_index": int, "world": int, "store_samples": int,
             "store_identity": str, "sharded": bool, "config": dict, "format_version": int}
    for key, kind in types.items():
        if not isinstance(raw[key], kind) or (kind is int and isinstance(raw[key], bool)):
            raise TrainError(f"{path}: {key} should be {kind.__name__}, got {raw[key]!r}; delete {ckpt} to resume "
                             "from the checkpoint before it")
    return TrainState(**raw)


def data_order_changes(saved: dict, current: dict) -> list[str]:
    """The fields among DATA_ORDER_FIELDS whose value differs between a checkpoint's config and now."""
    return [f"--{key.replace('_', '-')}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
            for key in DATA_ORDER_FIELDS if saved.get(key) != current.get(key)]


def config_drift(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's config and the resuming run's config, skipping
    fields that do not change the result (logging cadence, worker count, ...) and the data-order fields
    (refused separately)."""
    return [
        f"{key}: checkpoint {saved.get(key)!r} -> now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in _NEUTRAL_FIELDS and key not in DATA_ORDER_FIELDS and saved.get(key) != current.get(key)
    ]


def rng_state() -> dict:
    """This process's random number generator states (python, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    try:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TrainError(f"a checkpoint's random-number state is malformed ({exc})") from None


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))
