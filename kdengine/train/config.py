"""The training configuration: one dataclass and the argparse parser that fills it.

`scripts/train.py` and `kdengine train` both parse their arguments here, so the two share one set of
flags and one `--help`.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

EXAMPLES = """\
examples:
  python scripts/train.py --student runs/student --store runs/store --out runs/kd --steps 2000
  torchrun --nproc_per_node=8 scripts/train.py --student S --store D --out O --batch-tokens 16384
  torchrun --nproc_per_node=8 scripts/train.py ... --fsdp        # shard a student that does not fit one GPU
  python scripts/train.py --student S --store D --out O --resume  # continue from the newest checkpoint
"""


@dataclass
class TrainConfig:
    """Everything a run depends on. Saved in every checkpoint; a resume warns about fields that changed."""

    student: str
    store: str
    out: str
    steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    batch_tokens: int = 8192
    grad_accum: int = 1
    alpha: float = 1.0
    temperature: float = 1.0
    tail: bool = False
    eval_every: int = 200
    eval_fraction: float = 0.02
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    workers: int = 2
    resume: bool = False
    fsdp: bool = False
    grad_checkpointing: bool = False
    stop_after: int | None = None
    loss_impl: str = "kernel"

    @property
    def warmup(self) -> int:
        """Warmup steps: the explicit value, else 5% of the run."""
        return self.warmup_steps if self.warmup_steps is not None else round(0.05 * self.steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser(prog: str = "scripts/train.py") -> argparse.ArgumentParser:
    d = TrainConfig("", "", "")
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a student against a teacher's top-k store with the sparse KL loss. Runs alone "
        "or under torchrun (DDP, or FSDP with --fsdp); CUDA when available, else CPU with gloo.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--student", metavar="DIR", required=True,
                    help="student: a local HF causal-LM directory (see `kdengine make-student`)")
    io.add_argument("--store", metavar="DIR", required=True, help="top-k store directory written by `kdengine dump`")
    io.add_argument("--out", metavar="DIR", required=True,
                    help="run directory: metrics.jsonl, eval.jsonl, checkpoints/, final/")
    io.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", metavar="N", type=int, default=d.steps,
                     help="optimizer steps in the whole run (default %(default)s)")
    opt.add_argument("--lr", metavar="X", type=float, default=d.lr,
                     help="peak AdamW learning rate (default %(default)s)")
    opt.add_argument("--min-lr-ratio", metavar="X", type=float, default=d.min_lr_ratio,
                     help="cosine decay ends at lr * this (default %(default)s)")
    opt.add_argument("--warmup-steps", metavar="N", type=int, default=None,
                     help="linear warmup steps (default: 5%% of --steps)")
    opt.add_argument("--weight-decay", metavar="X", type=float, default=d.weight_decay,
                     help="AdamW weight decay on matrices (default %(default)s)")
    opt.add_argument("--max-grad-norm", metavar="X", type=float, default=d.max_grad_norm,
                     help="clip the global gradient norm to this; 0 disables (default %(default)s)")
    opt.add_argument("--batch-tokens", metavar="N", type=int, default=d.batch_tokens,
                     help="padded tokens (batch size x longest sample) per micro-batch per process "
                     "(default %(default)s)")
    opt.add_argument("--grad-accum", metavar="N", type=int, default=d.grad_accum,
                     help="micro-batches per process per optimizer step (default %(default)s)")
    opt.add_argument("--grad-checkpointing", action="store_true",
                     help="recompute activations in backward to save memory")

    loss = p.add_argument_group("loss")
    loss.add_argument("--alpha", metavar="X", type=float, default=d.alpha,
                      help="loss = alpha * KD + (1 - alpha) * CE on the next token; 1 = pure KD, 0 = plain CE "
                      "(default %(default)s)")
    loss.add_argument("--temperature", metavar="X", type=float, default=d.temperature,
                      help="KD temperature (default %(default)s)")
    loss.add_argument("--tail", action="store_true",
                      help="add the teacher's probability mass outside its top-k as one extra KL bucket")
    loss.add_argument("--loss-impl", choices=["kernel", "reference"], default=d.loss_impl,
                      help="kernel: the compiled sparse KL op; reference: the pure-torch spec (slow; for checks)")

    run = p.add_argument_group("evaluation, logging, checkpoints")
    run.add_argument("--eval-every", metavar="N", type=int, default=d.eval_every,
                     help="evaluate on the held-out slice every N steps, before the first and after the last; "
                     "0 disables (default %(default)s)")
    run.add_argument("--eval-fraction", metavar="X", type=float, default=d.eval_fraction,
                     help="fraction of store samples held out of training for evaluation, chosen by --seed "
                     "(default %(default)s; at least one sample)")
    run.add_argument("--save-every", metavar="N", type=int, default=d.save_every,
                     help="checkpoint every N steps; one is always written at the end (default %(default)s)")
    run.add_argument("--keep-checkpoints", metavar="N", type=int, default=d.keep_checkpoints,
                     help="how many of the newest checkpoints to keep; 0 keeps all (default %(default)s)")
    run.add_argument("--log-every", metavar="N", type=int, default=d.log_every,
                     help="log every N steps (default %(default)s)")
    run.add_argument("--stop-after", metavar="STEP", type=int, default=None,
                     help="stop after this global step with a checkpoint, keeping the schedule of --steps "
                     "(for jobs with a wall-time limit; continue with --resume)")

    misc = p.add_argument_group("misc")
    misc.add_argument("--seed", metavar="N", type=int, default=d.seed,
                      help="seed for shuffling, the held-out split and init (default %(default)s)")
    misc.add_argument("--workers", metavar="N", type=int, default=d.workers,
                      help="DataLoader worker processes per training process for store decoding "
                      "(default %(default)s)")
    misc.add_argument("--fsdp", action="store_true",
                      help="shard the student with FSDP (fully_shard per decoder layer) instead of DDP")
    return p


def parse_config(argv: list[str] | None, prog: str = "scripts/train.py") -> TrainConfig:
    """Parses command-line arguments into a validated TrainConfig (argparse exits with a message on bad input)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    for problem in _problems(cfg):
        parser.error(problem)
    return cfg


def _problems(cfg: TrainConfig) -> list[str]:
    checks = [
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}"),
        (cfg.warmup_steps is None or 0 <= cfg.warmup_steps <= cfg.steps,
         f"--warmup-steps must be in [0, --steps={cfg.steps}], got {cfg.warmup_steps}"),
        (cfg.batch_tokens >= 1, f"--batch-tokens must be >= 1, got {cfg.batch_tokens}"),
        (cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}"),
        (0 <= cfg.alpha <= 1, f"--alpha must be in [0, 1], got {cfg.alpha}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (0 < cfg.eval_fraction < 1, f"--eval-fraction must be in (0, 1), got {cfg.eval_fraction}"),
        (min(cfg.eval_every, cfg.save_every, cfg.keep_checkpoints, cfg.workers) >= 0,
         "--eval-every, --save-every, --keep-checkpoints and --workers must be >= 0"),
        (cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}"),
        (cfg.stop_after is None or cfg.stop_after >= 1, f"--stop-after must be >= 1, got {cfg.stop_after}"),
    ]
    return [msg for ok, msg in checks if not ok]
