#!/usr/bin/env python
"""Training-step throughput and peak memory: the fused head vs logits, and the kernel vs the reference loss.

Same student, store, batches and flags; only the loss path differs. The contenders:
    fused      --loss-impl kernel --fused-head     (sparse_kl_linear: no [N, V] logits)
    kernel     --loss-impl kernel --no-fused-head  (the [N, V] logits, then the compiled sparse KL)
    reference  --loss-impl reference               (the logits, then the pure-torch spec)
Runs alternate (fused, kernel, reference, fused, ...) so that load on a shared machine hits all alike;
each run is its own process so its peak memory is its own. Reports target tokens/s and input tokens/s
per training step (median over steps after the first), peak memory, and the ratios per round.

Prerequisites: a student and a store, e.g. from scripts/kd_quality.py (logs/kd_quality/student, store).
    python scripts/bench_train_step.py --student logs/kd_quality/student --store logs/kd_quality/store
Writes the table to scripts/results/train_step_throughput.md (--results elsewhere for a trial run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = {
    "fused": ["--loss-impl", "kernel", "--fused-head"],
    "kernel": ["--loss-impl", "kernel", "--no-fused-head"],
    "reference": ["--loss-impl", "reference"],
}
RATIOS = (("fused", "kernel"), ("kernel", "reference"))  # (numerator, denominator) where both ran


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma-separated, run in this order each round: {', '.join(CONTENDERS)}")
    p.add_argument("--results", default=str(REPO / "scripts" / "results" / "train_step_throughput.md"))
    args = p.parse_args()
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown or not args.contenders:
        p.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name in args.contenders:
                rows.append(_run(args, name, rep, Path(tmp) / f"{name}-{rep}"))
                print(rows[-1], flush=True)
    _report(args, rows, _loss_alone(args))


def _run(args, name: str, rep: int, out: Path) -> dict:
    """One training process of contender `name`; its medians over steps 2.. and its peak memory."""
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--student", args.student, "--store", args.store,
           "--out", str(out), "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
           *CONTENDERS[name], "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--workers", "1",
           "--keep-checkpoints", "1"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stderr=subprocess.DEVNULL)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = records[1:] or records
    return {
        "impl": name, "repeat": rep,
        "targets_per_s": statistics.median(s["targets_per_s"] for s in steps),
        "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
        "data_wait": statistics.median(s["data_wait"] for s in steps),
        "peak_mem_mib": max(s["peak_mem_mib"] for s in records),
        "targets_per_step": statistics.mean(s["targets"] for s in steps),
    }


def _loss_alone(args) -> dict:
    """Seconds for one loss forward + backward alone, per implementation, on the shape of a real first
    batch (its teacher targets; the student's vocabulary), median of 3."""
    import time

    import torch
    from transformers import AutoConfig

    sys.path.insert(0, str(REPO))
    from kdengine.losses import sparse_kl
    from kdengine.losses.reference import sparse_kl_reference
    from kdengine.store import open_store
    from kdengine.train.data import collate, plan_batches, split_heldout
    from kdengine.train.sources import _sample_lengths

    store = open_store(args.store)
    train_ids, _ = split_heldout(len(store), 0.02, 0)
    first = plan_batches(train_ids, _sample_lengths(store), args.batch_tokens, seed=0)[0]
    batch = collate([store[i] for i in first], pad_id=0)
    vocab = AutoConfig.from_pretrained(args.student).vocab_size
    logits = torch.randn(batch["targets"], vocab, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = {"targets": batch["targets"], "vocab": vocab}
    for name, fn in (("kernel", sparse_kl), ("reference", sparse_kl_reference)):
        times = []
        for _ in range(3):
            logits.grad = None
            t0 = time.perf_counter()
            fn(logits, batch["topk_idx"], batch["topk_logp"], batch["labels"], reduction="sum").backward()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def _report(args, rows, loss_alone) -> None:
    lines = [
        "# Training-step throughput: fused head vs logits, compiled sparse KL vs pure-torch reference "
        "(scripts/bench_train_step.py)",
        "",
        f"Student {args.student}, store {args.store}; --batch-tokens {args.batch_tokens}, {args.steps} steps per run "
        "(medians over steps 2..), fp32 on CPU, runs alternated; peak memory is the process's peak RSS.",
        "",
        "| loss | run | target tok/s | input tok/s | data wait | peak RSS (MiB) | targets/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['repeat'] + 1} | {r['targets_per_s']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['data_wait']:.3f} | {r['peak_mem_mib']:.0f} | {r['targets_per_step']:.0f} |")
    for rep in range(args.repeats):
        ran = {r["impl"]: r for r in rows if r["repeat"] == rep}
        for a, b in RATIOS:
            if a in ran and b in ran:
                lines += ["", f"Run {rep + 1}: {a} / {b} throughput = "
                              f"{ran[a]['targets_per_s'] / ran[b]['targets_per_s']:.2f}x, peak RSS "
                              f"{ran[a]['peak_mem_mib']:.0f} vs {ran[b]['peak_mem_mib']:.0f} MiB."]
    lines += ["", f"The loss alone, forward + backward on one batch's [{loss_alone['targets']}, {loss_alone['vocab']}] "
              f"fp32 logits: kernel {loss_alone['kernel']:.3f} s, reference {loss_alone['reference']:.3f} s "
              f"({loss_alone['reference'] / loss_alone['kernel']:.1f}x)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
