"""Checkpoints on disk: one directory per step under OUT/checkpoints/, written whole or not at all.

A checkpoint directory is itself an HF model directory (config, model safetensors, tokenizer), so
`from_pretrained` and `kdengine eval gsm8k --model` load it, plus the training state in plain files:

    step-00000500/
      config.json, model.safetensors, tokenizer files ...   the student (HF layout)
      optimizer.pt        full (unsharded) optimizer state, keyed by parameter name
      trainer.pt          LR scheduler state and every rank's RNG states
      trainer_state.json  step, data position, world size, store size, run config (written last)
      projections.safetensors  feature KD's learned maps, when it has any (train/hidden.py)

It is written under a temporary name and renamed into place after every file is flushed to disk, so a
run killed at any moment leaves either the complete checkpoint or none; a leftover temporary directory
is removed by the next run.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kdengine.durable import fsync_path
from kdengine.train.errors import TrainError

_STEP_DIR = re.compile(r"step-(\d{8})")
_TMP_PREFIX = ".tmp-"
# Fields that may change between a run and its resume without changing the result.
_NEUTRAL_FIELDS = {"resume", "stop_after", "workers", "keep_checkpoints", "log_every", "eval_every", "save_every"}


@dataclass
class TrainState:
    """Where a run stands: `step` optimizer steps done; the next global batch is `batch_index` of epoch
    `epoch`; `world` processes; the store had `store_samples` samples; the run's config as a dict."""

    step: int
    epoch: int
    batch_index: int
    world: int
    store_samples: int
    config: dict


def checkpoints_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(
    out: str | Path,
    state: TrainState,
    *,
    write_model: Callable[[Path], None],
    optimizer_state: dict,
    scheduler_state: dict,
    rng_states: list[dict],
    keep: int,
) -> Path:
    """Writes a checkpoint atomically and prunes old ones (call on rank 0 only).

    Args:
        state: the position to resume from.
        write_model: writes the student (HF layout, tokenizer included) into the directory it is given.
        optimizer_state: full optimizer state dict (parameter names as keys).
        scheduler_state: the LR scheduler's state_dict().
        rng_states: `rng_state()` of every rank, in rank order.
        keep: keep this many newest checkpoints (0 = all).
    Returns:
        The checkpoint directory.
    """
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:08d}"
    tmp = root / f"{_TMP_PREFIX}{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler_state, "rng": rng_states}, tmp / "trainer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    final = root / name
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
    """Deletes temporary directories a killed run left behind; returns what it removed."""
    root = checkpoints_dir(out)
    stale = sorted(root.glob(f"{_TMP_PREFIX}*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def read_train_state(ckpt: Path) -> TrainState:
    try:
        return TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise TrainError(f"{ckpt / 'trainer_state.json'}: cannot read the training state ({exc}); "
                         "delete this checkpoint directory to resume from the one before it") from exc


def read_optimizer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)


def read_trainer_extras(ckpt: Path) -> dict:
    """{"scheduler": scheduler state_dict, "rng": [rng state per rank]}."""
    return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)


def config_drift(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's config and the resuming run's config, skipping
    fields that do not change the result (logging cadence, worker count, ...)."""
    return [
        f"{key}: checkpoint {saved.get(key)!r} -> now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in _NEUTRAL_FIELDS and saved.get(key) != current.get(key)
    ]


def rng_state() -> dict:
    """This process's random number generator states (python, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))
