#!/usr/bin/env python
"""Train a student on a teacher's top-k store with the sparse KL loss: the torchrun entry point of
`kdengine train` (the same click command, flags and code path).

Prerequisites: a store (`kdengine dump --teacher T --data corpus.jsonl --out STORE --top-k 64`) and a
student sharing the teacher's tokenizer (`kdengine make-student --teacher T --layers N --out STUDENT`).

    python scripts/train.py --student STUDENT --store STORE --out runs/kd --steps 2000
    torchrun --nproc_per_node=8 scripts/train.py --student STUDENT --store STORE --out runs/kd [--fsdp]
    python scripts/train.py ... --resume        # continue from the newest checkpoint in --out

Writes runs/kd/config.yaml, metrics.jsonl, eval.jsonl, checkpoints/step-*/ and final/ (HF layout); see --help.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdengine.train.command import train_command  # noqa: E402

if __name__ == "__main__":
    train_command.main(args=sys.argv[1:], prog_name="scripts/train.py")
