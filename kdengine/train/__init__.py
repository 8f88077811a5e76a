"""Training a student against a top-k store.

`main(argv)` is the one entry point behind both `scripts/train.py` and `kdengine train`;
`kdengine.train.student.make_student` builds a student from a teacher (`kdengine make-student`).

Modules: config (flags -> TrainConfig), student (initialisation), guard (tokenizer/vocab check),
data (held-out split, token-budget batches, rank split, collation), model (target-row logits),
optim (AdamW, warmup + cosine), distributed (torchrun env, DDP/FSDP2), checkpoint (atomic save,
newest-complete discovery), loop (the run).
"""
from __future__ import annotations

from kdengine.train.errors import TrainError


def main(argv: list[str] | None = None, prog: str = "scripts/train.py") -> dict:
    """Parses training flags (see `--help`) and runs training.

    Returns:
        The last logged training metrics (empty on ranks other than 0).
    Raises:
        TrainError: a problem with the inputs (message says what to do), including a store shard that
            turns out damaged while training.
        SystemExit: bad flags or --help (argparse).
    """
    from kdengine.store import StoreError
    from kdengine.train.config import parse_config
    from kdengine.train.loop import run

    cfg = parse_config(argv, prog)
    try:
        return run(cfg)
    except StoreError as exc:  # a damaged shard met while training
        raise TrainError(f"store {cfg.store}: {exc}") from exc


__all__ = ["TrainError", "main"]
