#!/usr/bin/env python
"""Train a student on a teacher's top-k store with the sparse KL loss.

Prerequisites: a store (`kdengine dump --teacher T --data corpus.jsonl --out STORE --top-k 64`) and a
student sharing the teacher's tokenizer (`kdengine make-student --teacher T --layers N --out STUDENT`).

    python scripts/train.py --student STUDENT --store STORE --out runs/kd --steps 2000
    torchrun --nproc_per_node=8 scripts/train.py --student STUDENT --store STORE --out runs/kd [--fsdp]
    python scripts/train.py ... --resume        # continue from the newest checkpoint in --out

Writes runs/kd/metrics.jsonl, eval.jsonl, checkpoints/step-*/ and final/ (HF layout). Same flags as
`kdengine train`; see --help.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdengine.train import TrainError, main  # noqa: E402

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TrainError as exc:
        sys.exit(f"error: {exc}")
