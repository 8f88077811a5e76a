"""Training a student against a top-k store, or against a teacher running in the training process.

`kdengine train` (`command.train_command`, also run by `scripts/train.py` under torchrun) parses the
options into a `TrainConfig` and calls `train(cfg)`; `main(argv)` does the same from Python.
`kdengine.train.student.make_student` builds a student from a teacher (`kdengine make-student`).

Modules: config (TrainConfig: every option, its help and bounds), command (the click command built from
it, `--config` files), sources (store or online teacher: where a batch's targets come from), hidden
(feature KD), student (initialisation), guard (tokenizer/vocab check), data (held-out split,
token-budget batches, rank split, collation), model (target-row logits), optim (AdamW, warmup + cosine),
distributed (torchrun env, DDP/FSDP2), checkpoint (atomic save, newest-complete discovery), loop (the run).
"""
from __future__ import annotations

from kdengine.train.errors import TrainError


def train(cfg) -> dict:
    """Runs training per a TrainConfig.

    Returns:
        The last logged training metrics (empty on ranks other than 0).
    Raises:
        TrainError: a problem with the inputs (message says what to do), including a store shard that
            turns out damaged while training.
    """
    from kdengine.store import StoreError
    from kdengine.train.loop import run

    try:
        return run(cfg)
    except StoreError as exc:  # a damaged shard met while training
        raise TrainError(f"store {cfg.store}: {exc}") from exc


def main(argv: list[str] | None = None, prog: str = "scripts/train.py") -> dict:
    """Parses training flags (see `--help`) and runs training; see `train`.

    Raises:
        TrainError: as `train`.
        SystemExit: bad flags or --help.
    """
    from kdengine.train.command import parse_config

    return train(parse_config(argv, prog))


__all__ = ["TrainError", "main", "train"]
